"""TrialConfig: the one config that flows from sampling to export to final training."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from data.augment_config import AugmentConfig
from model.config import ModelConfig

# Epochs of a trial (and of a config that names none).
DEFAULT_EPOCHS = 20
# The report's final run: 90 epochs on all 50,000 training images (train + validation).
FINAL_EPOCHS = 90
# --compile (torch.compile the model): the first is the default.
COMPILE_MODES = ("auto", "on", "off")
DEFAULT_COMPILE_MODE = COMPILE_MODES[0]
# The optimizers a run can step with: the first is the report's.
OPTIMIZERS = ("adamw", "sgd")
# Sections `hpo best` writes beside the config; `hpo train` reads past them.
REPORT_SECTIONS = ("metrics", "source", "versions")


class ConfigError(ValueError):
    """A config file or section that cannot be trained; the message names the field."""


Config = TypeVar("Config")


def from_mapping(
    cls: type[Config], raw: Any, section: str, error: type[ValueError] = ConfigError
) -> Config:
    """`cls(**raw)` for a dataclass, refusing a non-mapping and naming unknown keys.

    The one way this room reads a mapping into a config; model/ and data/ apply the same
    rule to their own configs.
    """
    if not isinstance(raw, dict):
        raise error(f"{section}: must be a mapping, got {type(raw).__name__}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        raise error(f"{section}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**raw)


# --- schedules: the arguments of each, typed, with their defaults ---------------------------


@dataclass(frozen=True)
class PlateauArgs:
    """Cut the LR by `factor` after `patience` epochs without a better validation loss."""

    factor: float = 0.1
    patience: int = 10  # epochs: scales with the run's length


@dataclass(frozen=True)
class OneCycleArgs:
    pct_start: float = 0.25  # share of the run spent warming up


@dataclass(frozen=True)
class CosineArgs:
    min_lr_ratio: float = 0.01  # the final LR, as a share of lr


@dataclass(frozen=True)
class StepArgs:
    step_size: int = 1  # epochs: scales with the run's length
    gamma: float = 0.1


@dataclass(frozen=True)
class ConstantArgs:
    pass


SCHEDULE_ARGS: dict[str, type] = {
    "plateau": PlateauArgs,
    "onecycle": OneCycleArgs,
    "cosine": CosineArgs,
    "step": StepArgs,
    "constant": ConstantArgs,
}
SCHEDULERS = tuple(SCHEDULE_ARGS)
# Arguments counted in epochs (TrainConfig.with_epochs scales them).
EPOCH_COUNTED_ARGS = ("patience", "step_size")


# Each argument's allowed values, as torch's schedulers take them, and how to say them.
SCHEDULE_ARG_BOUNDS = {
    "factor": (lambda v: 0 < v < 1, "in (0, 1)"),  # ReduceLROnPlateau refuses 1 and more
    "patience": (lambda v: v >= 0, ">= 0"),
    "pct_start": (lambda v: 0 < v < 1, "in (0, 1)"),  # a warm-up share of the run
    "min_lr_ratio": (lambda v: v > 0, "> 0"),
    "step_size": (lambda v: v >= 1, ">= 1"),  # StepLR divides by it
    "gamma": (lambda v: v > 0, "> 0"),
}


def schedule_args(scheduler: str, raw: Any) -> Any:
    """The typed arguments of `scheduler` from a mapping; unknown or mistyped keys are errors."""
    args = from_mapping(SCHEDULE_ARGS[scheduler], raw, f"train.scheduler_args ({scheduler})")
    for name, value in asdict(args).items():
        counted = name in EPOCH_COUNTED_ARGS
        if isinstance(value, bool) or not isinstance(value, int if counted else (int, float)):
            kind = "an integer" if counted else "a number"
            raise ConfigError(f"train.scheduler_args.{name}: must be {kind}, got {value!r}")
        allowed, text = SCHEDULE_ARG_BOUNDS[name]
        if not allowed(value):
            raise ConfigError(f"train.scheduler_args.{name}: must be {text}, got {value!r}")
    return args


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, loss, weight averaging, schedule and batch size of one training run.

    Every recipe knob's default is off (the report's run), so a config written before the
    knob existed trains as it did.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    batch_size: int = 256
    epochs: int = DEFAULT_EPOCHS
    scheduler: str = SCHEDULERS[0]
    scheduler_args: dict[str, float] = field(default_factory=dict)
    optimizer: str = OPTIMIZERS[0]
    momentum: float = 0.9  # SGD's (Nesterov); AdamW ignores it
    label_smoothing: float = 0.0  # of the training loss only; validation scores true labels
    # Exponential moving average of the weights, per step; 0: none. Validation, checkpoints,
    # the exported weights and the test use the average.
    ema_decay: float = 0.0
    # The LR each epoch of a search trial ran at, for `hpo train` to replay a plateau schedule
    # (which has no validation loss to watch there); empty in the search itself.
    lr_by_epoch: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"train.{name}: must be a number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr!r}")
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name}: must be an integer >= 1, got {value!r}")
        self._check_recipe()
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"train.scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        # Stored complete, so a config file shows every argument its schedule runs with.
        full = asdict(schedule_args(self.scheduler, self.scheduler_args))
        object.__setattr__(self, "scheduler_args", full)
        trace = tuple(self.lr_by_epoch)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in trace):
            raise ConfigError("train.lr_by_epoch: must be a list of positive numbers")
        object.__setattr__(self, "lr_by_epoch", tuple(float(v) for v in trace))

    def _check_recipe(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"train.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        for name in ("momentum", "label_smoothing", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"train.{name}: must be a number, got {value!r}")
            if not 0 <= value < 1:
                raise ConfigError(f"train.{name}: must lie in [0, 1), got {value!r}")
        if self.momentum == 0:  # torch's SGD refuses Nesterov without momentum
            raise ConfigError("train.momentum: must be > 0 (SGD's Nesterov momentum), got 0")

    @property
    def schedule(self) -> Any:
        """The scheduler's typed arguments (PlateauArgs, StepArgs, ...)."""
        return schedule_args(self.scheduler, self.scheduler_args)

    def with_epochs(self, epochs: int) -> TrainConfig:
        """This recipe over `epochs`, keeping its schedule: a step size keeps the number of LR
        decays the trial had, a patience (and a replayed LR trace) the same share of the run."""
        ratio = epochs / self.epochs
        args = dict(self.scheduler_args)
        if "patience" in args:
            args["patience"] = math.floor(args["patience"] * ratio + 0.5)  # half up
        if "step_size" in args:
            args["step_size"] = _step_size_for(args["step_size"], self.epochs, epochs)
        return replace(self, epochs=epochs, scheduler_args=args)

    def replayed_lr(self, epoch: int) -> float:
        """The LR of 0-based `epoch` when lr_by_epoch is replayed: the trace stretched over this
        run's epochs, each LR the trial ran at held for the same share of the run."""
        trace = self.lr_by_epoch
        return trace[min(len(trace) - 1, epoch * len(trace) // self.epochs)]

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["lr_by_epoch"] = list(self.lr_by_epoch)
        return raw


def lr_changes(step_size: int, epochs: int) -> int:
    """LR decays a StepLR run of `epochs` makes (it steps after every epoch but the last)."""
    return (epochs - 1) // step_size


def _step_size_for(step_size: int, epochs: int, new_epochs: int) -> int:
    """The step size that makes over `new_epochs` the number of decays nearest to what
    `step_size` made over `epochs` (equal, where one can); of those, the nearest scaled one."""
    decays = lr_changes(step_size, epochs)
    scaled = step_size * new_epochs / epochs
    return min(
        range(1, new_epochs + 1),
        key=lambda size: (abs(lr_changes(size, new_epochs) - decays), abs(size - scaled)),
    )


@dataclass(frozen=True)
class TrialConfig:
    model: ModelConfig
    train: TrainConfig
    augment: AugmentConfig

    def with_epochs(self, epochs: int) -> TrialConfig:
        return replace(self, train=self.train.with_epochs(epochs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "augment": self.augment.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> TrialConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config: must be a mapping with model, train and augment sections")
        unknown = set(raw) - {"model", "train", "augment", *REPORT_SECTIONS}
        if unknown:
            raise ConfigError(f"config: unknown section(s) {', '.join(sorted(unknown))}")
        if "model" not in raw:
            raise ConfigError("config: missing section 'model'")
        try:
            return cls(
                model=ModelConfig.from_dict(raw["model"]),
                train=from_mapping(TrainConfig, raw.get("train") or {}, "train"),
                augment=AugmentConfig.from_dict(raw.get("augment") or {}),
            )
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from err


def describe_recipe(cfg: TrialConfig) -> str:
    """The optimizer and every recipe lever that is on, in one line (a trial attribute)."""
    train, augment = cfg.train, cfg.augment
    parts = [f"sgd nesterov momentum {train.momentum:.3f}" if train.optimizer == "sgd" else "adamw"]
    if train.label_smoothing:
        parts.append(f"label smoothing {train.label_smoothing:.3f}")
    if train.ema_decay:
        parts.append(f"ema {train.ema_decay:.4f}")
    if augment.cuts:
        parts.append(f"cutout {augment.cutout_size}px p {augment.cutout_prob:.2f}")
    if augment.mixes:
        parts.append(f"{augment.mix} alpha {augment.mix_alpha:.2f} p {augment.mix_prob:.2f}")
    if augment.tta != "none":
        parts.append(f"tta {augment.tta}")
    return ", ".join(parts)


def load_config_file(path: Path) -> tuple[TrialConfig, dict[str, Any]]:
    """The TrialConfig in a YAML file `hpo best` wrote, and the whole document."""
    try:
        documents = list(yaml.safe_load_all(Path(path).read_text()))
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if len(documents) > 1:
        raise ConfigError(several_configs(path, documents))
    document = documents[0] if documents else None
    return TrialConfig.from_dict(document), document


def several_configs(path: Path, documents: list[Any]) -> str:
    """What to do with a file of several configs (`hpo best --pareto` writes one)."""
    sources = [d.get("source") or {} for d in documents if isinstance(d, dict)]
    trials = ", ".join(str(s["trial"]) for s in sources if "trial" in s)
    study = next((s["study"] for s in sources if "study" in s), "STUDY")
    return (
        f"config {path} holds {len(documents)} configs (trials {trials or '?'}): export one "
        f"with `hpo best --study {study} --trial N -o FILE`"
    )
