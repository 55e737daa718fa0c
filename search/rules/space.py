"""The search space over the Backbone and its training, and sampling one TrialConfig from it."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna
import yaml

from data.augment_config import MIXES, TTA_MODES, AugmentConfig
from model.config import REPORT_TABLE1, ModelConfig
from model.flops import train_flops_per_image
from search.rules.config import (
    OPTIMIZERS,
    SCHEDULERS,
    CosineArgs,
    OneCycleArgs,
    TrainConfig,
    TrialConfig,
)

IMAGE_SIZE = 32
# Every ConvLayer halves the image: 32 -> 1 allows five of them across the whole network.
MAX_POOLINGS = int(math.log2(IMAGE_SIZE))


def max_poolings(image_size: int = IMAGE_SIZE) -> int:
    """ConvLayers an image of this side allows across the network (64: six)."""
    return image_size.bit_length() - 1


RANGE_KEYS = (
    "backbones", "blocks", "layers", "width", "dropout", "lr", "weight_decay", "grad_clip",
    "sgd_lr", "momentum", "label_smoothing", "ema_decay", "cutout_size", "cutout_prob",
    "mix_alpha", "mix_prob",
)  # fmt: skip
CHOICE_KEYS = (
    "kernel_size", "batch_size", "schedulers", "optimizers", "weight_averaging", "cutout",
    "mixes", "tta",
)  # fmt: skip
# Drawn on a log scale: the low end must be above 0.
LOG_SCALE = ("lr", "weight_decay", "grad_clip", "sgd_lr", "mix_alpha")
# The config field each key's values become. The config's own check is the key's bound: the
# space has no bounds of its own, so it cannot offer a value a config refuses.
TRAIN_FIELDS = {
    "lr": "lr", "sgd_lr": "lr", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
    "batch_size": "batch_size", "schedulers": "scheduler", "optimizers": "optimizer",
    "momentum": "momentum", "label_smoothing": "label_smoothing", "ema_decay": "ema_decay",
}  # fmt: skip
AUGMENT_FIELDS = {
    "cutout_size": "cutout_size", "cutout_prob": "cutout_prob", "mixes": "mix",
    "mix_alpha": "mix_alpha", "mix_prob": "mix_prob", "tta": "tta",
}  # fmt: skip
MODEL_FIELDS = ("width", "blocks", "kernel_size", "dropout")


class SpaceError(ValueError):
    """A search space that cannot be sampled; the message names the key."""


@dataclass(frozen=True)
class SearchSpace:
    """Ranges are (low, high) inclusive; tuples of choices are categorical."""

    backbones: tuple[int, int]  # N
    blocks: tuple[int, int]  # K, per backbone
    layers: tuple[int, int]  # M, ConvLayers per block, per backbone
    width: tuple[int, int]  # output channels of each ConvLayer
    width_step: int | None  # None: log scale (Optuna allows no step there)
    kernel_size: tuple[int, ...]
    dropout: tuple[float, float]
    lr: tuple[float, float]  # log scale
    weight_decay: tuple[float, float]  # log scale
    grad_clip: tuple[float, float]  # log scale
    batch_size: tuple[int, ...]
    schedulers: tuple[str, ...]
    augment: AugmentConfig
    # Train FLOPs per image (GFLOP) above which a draw is skipped untrained (search/rules/cost.py).
    max_gflops: float
    # The recipe levers. Each switch's first choice in the default space is off (the report's
    # run); a switch whose only choice is off is no parameter at all, and its ranges unused.
    optimizers: tuple[str, ...]
    sgd_lr: tuple[float, float]  # log scale; SGD's LR (AdamW's is `lr`)
    momentum: tuple[float, float]  # SGD's Nesterov momentum
    label_smoothing: tuple[float, float]
    weight_averaging: tuple[bool, ...]  # an EMA of the weights, or not
    ema_decay: tuple[float, float]  # per step
    cutout: tuple[bool, ...]
    cutout_size: tuple[int, int]  # pixels
    cutout_prob: tuple[float, float]
    mixes: tuple[str, ...]  # none, mixup, cutmix
    mix_alpha: tuple[float, float]  # log scale
    mix_prob: tuple[float, float]
    tta: tuple[str, ...]  # test-time views: none, flip, flip_shift

    def __post_init__(self) -> None:
        for name in RANGE_KEYS:
            low, high = getattr(self, name)
            if not low <= high:  # also refuses NaN
                raise SpaceError(f"{name}: low must be <= high, got [{low}, {high}]")
        for name in LOG_SCALE:
            low, high = getattr(self, name)
            if not low > 0:
                raise SpaceError(f"{name}: needs 0 < low (log scale), got [{low}, {high}]")
        for name in CHOICE_KEYS:
            if not getattr(self, name):
                raise SpaceError(f"{name}: needs at least one choice")
        for name in ("weight_averaging", "cutout"):
            if set(getattr(self, name)) - {True, False}:
                raise SpaceError(f"{name}: needs choices among true and false")
        if self.width_step is not None and self.width_step < 1:
            raise SpaceError(f"width_step: must be >= 1 (null: log scale), got {self.width_step}")
        self._check_against_configs()
        cheapest = train_flops_per_image(self.cheapest_model()) / 1e9
        if not self.max_gflops >= cheapest:  # also refuses NaN
            raise SpaceError(
                f"max_gflops: {self.max_gflops} is below the cheapest network of this space "
                f"({cheapest:.3g} GFLOP per image): no draw could train"
            )

    def _check_against_configs(self) -> None:
        """Each end of each range and each choice, made into the config it becomes (all else at
        its default): what the config refuses, the space refuses, before anything is stored."""
        for name in (*TRAIN_FIELDS, *AUGMENT_FIELDS, *MODEL_FIELDS):
            for value in getattr(self, name):
                try:
                    self._as_config(name, value)
                except (ValueError, TypeError) as err:
                    raise SpaceError(f"{name}: {value!r} is refused by the config: {err}") from err
        # The sampler leaves each backbone still to come room for its fewest layers, so the
        # deepest draw it must make is the most backbones at the fewest layers each.
        for backbones in self.backbones:
            chains = [[3 if i == 0 else 1] + [1] * self.layers[0] for i in range(backbones)]
            try:
                ModelConfig(channels=chains, blocks=[1] * backbones)
            except (ValueError, TypeError) as err:
                raise SpaceError(
                    f"backbones, layers: {backbones} backbone(s) of {self.layers[0]} layer(s) "
                    f"each are refused by the config: {err}"
                ) from err

    def _as_config(self, name: str, value: Any) -> object:
        if name in TRAIN_FIELDS:
            return TrainConfig(**{TRAIN_FIELDS[name]: value})
        if name in AUGMENT_FIELDS:
            return replace(self.augment, **{AUGMENT_FIELDS[name]: value})
        if name == "width":
            return ModelConfig(channels=[[3, value]], blocks=[1])
        if name == "blocks":
            return ModelConfig(channels=[[3, 1]], blocks=[value])
        return ModelConfig(channels=[[3, 1]], blocks=[1], **{name: value})

    def cheapest_model(self) -> ModelConfig:
        """The network of every range's low end: cost grows with each range."""
        chains, width_in = [], 3
        for _ in range(self.backbones[0]):
            chains.append([width_in] + [self.width[0]] * self.layers[0])
            width_in = self.width[0]
        return ModelConfig(
            channels=chains,
            blocks=[self.blocks[0]] * self.backbones[0],
            kernel_size=min(self.kernel_size),
        )

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["augment"] = self.augment.to_dict()
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in raw.items()
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchSpace:
        """A stored space; one stored before the recipe levers existed keeps them off."""
        return _override(DEFAULT_SPACE, {**LEVERS_OFF, **raw})


DEFAULT_SPACE = SearchSpace(
    backbones=(1, 3),
    blocks=(1, 4),
    layers=(1, 3),
    # Log scale from 32; up to the report's widest layer, so Table 1 is inside the space.
    width=(32, REPORT_TABLE1.channels[-1][-1]),
    width_step=None,
    kernel_size=(3, 5),
    dropout=(0.0, 0.5),
    lr=(1e-4, 1e-2),
    weight_decay=(1e-6, 1e-2),
    grad_clip=(0.01, 1.0),
    batch_size=(128, 256, 512),
    schedulers=SCHEDULERS,
    augment=AugmentConfig(crop_padding=4, flip=True, rotation_degrees=5.0),
    # ~6x Table 1 (4.1 GFLOP): skips the ~4% of draws that would take a third of the GPU
    # time, leaving a mean near Table 1's cost (docs/BENCHMARKS.md, "Search space cost").
    max_gflops=25.0,
    optimizers=OPTIMIZERS,
    sgd_lr=(0.01, 0.5),
    momentum=(0.8, 0.99),
    label_smoothing=(0.0, 0.3),
    weight_averaging=(False, True),
    # Horizons of ~100 to ~2,000 steps: a fraction of an epoch to a few of them.
    ema_decay=(0.99, 0.9995),
    cutout=(False, True),
    cutout_size=(4, 16),
    cutout_prob=(0.25, 1.0),
    # Off: both slow the convergence of short trials (Zhang et al. 2018 train 200 epochs);
    # a YAML space turns them on with `mixes: [none, mixup, cutmix]`.
    mixes=(MIXES[0],),
    mix_alpha=(0.1, 1.0),
    mix_prob=(0.25, 1.0),
    tta=TTA_MODES,
)
# A stored space without the levers (created before them): each switch off.
LEVERS_OFF: dict[str, Any] = {
    "optimizers": [OPTIMIZERS[0]],
    "label_smoothing": [0.0, 0.0],
    "weight_averaging": [False],
    "cutout": [False],
    "mixes": [MIXES[0]],
    "tta": [TTA_MODES[0]],
}

TINY_SPACE = replace(
    DEFAULT_SPACE,
    backbones=(1, 2),
    blocks=(1, 2),
    layers=(1, 2),
    width=(4, 16),
    kernel_size=(3,),
    dropout=(0.0, 0.3),
    lr=(1e-3, 3e-2),
    batch_size=(64, 128),
    augment=AugmentConfig(crop_padding=2, flip=True, rotation_degrees=0.0),
    # Every lever, so the suite exercises each; short runs want short averages.
    ema_decay=(0.9, 0.99),
    cutout_size=(2, 8),
    mixes=MIXES,
)

DEFAULT_SPACE_NAME = "default"
BUILTIN_SPACES = {DEFAULT_SPACE_NAME: DEFAULT_SPACE, "tiny": TINY_SPACE}


def load_space(name_or_path: str) -> SearchSpace:
    """A built-in space by name, or a YAML file overriding any range of its `base` space."""
    if name_or_path in BUILTIN_SPACES:
        return BUILTIN_SPACES[name_or_path]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        raise SpaceError(
            f"unknown space {name_or_path!r}: use {' or '.join(BUILTIN_SPACES)} or a YAML file"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise SpaceError(f"cannot read space file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise SpaceError(
            f"space file {path} is not valid YAML: {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(raw, dict):
        raise SpaceError(f"space file {path}: must be a mapping of ranges")
    base = raw.pop("base", DEFAULT_SPACE_NAME)
    if base not in BUILTIN_SPACES:
        raise SpaceError(f"base: must be one of {', '.join(BUILTIN_SPACES)}, got {base!r}")
    return _override(BUILTIN_SPACES[base], raw)


def _override(base: SearchSpace, raw: dict[str, Any]) -> SearchSpace:
    known = {f.name for f in fields(SearchSpace)}
    unknown = set(raw) - known
    if unknown:
        raise SpaceError(
            f"unknown space key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        current = getattr(base, key)
        try:
            changes[key] = _coerce(key, value, current)
        except (TypeError, ValueError) as err:
            raise SpaceError(f"{key}: {err}") from err
    return replace(base, **changes)


def _coerce(key: str, value: Any, current: Any) -> Any:
    if key == "width_step":  # null: log scale
        return None if value is None else _as(int, value)
    if isinstance(current, AugmentConfig):
        return AugmentConfig.from_dict({**current.to_dict(), **(value or {})})
    if isinstance(current, tuple):
        if not isinstance(value, list):
            raise TypeError(f"expected a list like {list(current)}, got {value!r}")
        if key in RANGE_KEYS and len(value) != 2:
            raise ValueError(f"expected [low, high], got {value!r}")
        kind = type(current[0])
        return tuple(_as(kind, item) for item in value)
    return _as(type(current), value)


def _as(kind: type, value: Any) -> Any:
    if kind is bool and not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    if kind is not bool and (isinstance(value, bool) or not isinstance(value, (kind, int))):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return kind(value)


def sample_config(
    trial: optuna.Trial, space: SearchSpace, epochs: int, image_size: int = IMAGE_SIZE
) -> TrialConfig:
    """Ask the trial for one architecture and training recipe inside `space`, for images of
    `image_size` (a larger one allows more poolings)."""
    model = _sample_model(trial, space, image_size)
    train = _sample_train(trial, space, epochs)
    return TrialConfig(model=model, train=train, augment=_sample_augment(trial, space))


def _sample_model(trial: optuna.Trial, space: SearchSpace, image_size: int) -> ModelConfig:
    n_backbones = trial.suggest_int("backbones", *space.backbones)
    channels, blocks, in_width, poolings = [], [], 3, 0
    for i in range(n_backbones):
        blocks.append(trial.suggest_int(f"blocks_{i}", *space.blocks))
        # Leave at least the minimum number of layers to each backbone still to come.
        room = max_poolings(image_size) - poolings - (n_backbones - i - 1) * space.layers[0]
        n_layers = trial.suggest_int(f"layers_{i}", space.layers[0], min(space.layers[1], room))
        chain = [in_width]
        for j in range(1, n_layers + 1):
            chain.append(_suggest_width(trial, f"width_{i}_{j}", space))
        channels.append(chain)
        in_width, poolings = chain[-1], poolings + n_layers
    return ModelConfig(
        channels=channels,
        blocks=blocks,
        kernel_size=trial.suggest_categorical("kernel_size", space.kernel_size),
        dropout=trial.suggest_float("dropout", *space.dropout),
        image_size=image_size,
    )


def _suggest_width(trial: optuna.Trial, name: str, space: SearchSpace) -> int:
    # A width is a scale parameter: 32 -> 64 matters as much as 512 -> 1024.
    if space.width_step is None:
        return trial.suggest_int(name, *space.width, log=True)
    return trial.suggest_int(name, *space.width, step=space.width_step)


def _sample_train(trial: optuna.Trial, space: SearchSpace, epochs: int) -> TrainConfig:
    scheduler = trial.suggest_categorical("scheduler", space.schedulers)
    return TrainConfig(
        **_sample_optimizer(trial, space),
        weight_decay=trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        grad_clip=trial.suggest_float("grad_clip", *space.grad_clip, log=True),
        batch_size=trial.suggest_categorical("batch_size", space.batch_size),
        epochs=epochs,
        scheduler=scheduler,
        scheduler_args=_sample_scheduler_args(trial, scheduler, epochs),
        label_smoothing=_suggest_lever_range(trial, "label_smoothing", space.label_smoothing),
        ema_decay=(
            trial.suggest_float("ema_decay", *space.ema_decay)
            if _switch(trial, "weight_averaging", space.weight_averaging)
            else 0.0
        ),
    )


def _sample_optimizer(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The optimizer and its own parameters: SGD's LR lives on another scale than AdamW's, so
    each is a parameter of its own (TPE's groups keep them apart)."""
    if _switch(trial, "optimizer", space.optimizers) == "sgd":
        return {
            "optimizer": "sgd",
            "lr": trial.suggest_float("sgd_lr", *space.sgd_lr, log=True),
            "momentum": trial.suggest_float("momentum", *space.momentum),
        }
    return {"lr": trial.suggest_float("lr", *space.lr, log=True)}


def _sample_augment(trial: optuna.Trial, space: SearchSpace) -> AugmentConfig:
    """The space's fixed augmentation, with the drawn cutout, mixing and test-time views."""
    levers: dict[str, Any] = {"tta": _switch(trial, "tta", space.tta)}
    if _switch(trial, "cutout", space.cutout):
        levers["cutout_size"] = trial.suggest_int("cutout_size", *space.cutout_size)
        levers["cutout_prob"] = trial.suggest_float("cutout_prob", *space.cutout_prob)
    levers["mix"] = _switch(trial, "mix", space.mixes)
    if levers["mix"] != MIXES[0]:
        levers["mix_alpha"] = trial.suggest_float("mix_alpha", *space.mix_alpha, log=True)
        levers["mix_prob"] = trial.suggest_float("mix_prob", *space.mix_prob)
    return replace(space.augment, **levers)


def _switch(trial: optuna.Trial, name: str, choices: tuple[Any, ...]) -> Any:
    """A lever's choice; a lever the space offers one choice of is no parameter."""
    if len(choices) == 1:
        return choices[0]
    return trial.suggest_categorical(name, choices)


def _suggest_lever_range(trial: optuna.Trial, name: str, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return low if low == high else trial.suggest_float(name, low, high)


def _sample_scheduler_args(trial: optuna.Trial, scheduler: str, epochs: int) -> dict[str, float]:
    if scheduler == "plateau":
        return {
            "factor": trial.suggest_float("plateau_factor", 0.1, 0.5),
            "patience": trial.suggest_int("plateau_patience", 1, 10),
        }
    if scheduler == "onecycle":
        return {"pct_start": trial.suggest_float("onecycle_pct_start", 0.1, 0.4)}
    if scheduler == "cosine":
        return {"min_lr_ratio": trial.suggest_float("cosine_min_lr_ratio", 1e-3, 0.1, log=True)}
    if scheduler == "step":
        return {
            "step_size": trial.suggest_int("step_size", 1, max(1, epochs // 2)),
            "gamma": trial.suggest_float("step_gamma", 0.1, 0.5),
        }
    return {}


def report_table1_params() -> dict[str, Any]:
    """The report's Table 1/2 run as parameters of the default space (first trial of a study)."""
    params: dict[str, Any] = {"backbones": REPORT_TABLE1.n_backbones}
    for i, (chain, k) in enumerate(zip(REPORT_TABLE1.channels, REPORT_TABLE1.blocks, strict=True)):
        params[f"blocks_{i}"] = k
        params[f"layers_{i}"] = len(chain) - 1
        params.update({f"width_{i}_{j}": width for j, width in enumerate(chain) if j > 0})
    params.update(
        kernel_size=REPORT_TABLE1.kernel_size,
        dropout=REPORT_TABLE1.dropout,
        lr=1e-3,
        weight_decay=1e-4,
        grad_clip=0.1,
        batch_size=256,
        scheduler="plateau",
        plateau_factor=0.1,
        plateau_patience=10,
    )
    return {**params, **levers_off(DEFAULT_SPACE)}


def levers_off(space: SearchSpace) -> dict[str, Any]:
    """The parameters that turn every recipe lever of `space` off (the report's recipe):
    AdamW, no smoothing, no average, no cutout, no mixing, no test-time views. A lever the
    space does not vary is no parameter."""
    switches = {
        "optimizer": (space.optimizers, OPTIMIZERS[0]),
        "weight_averaging": (space.weight_averaging, False),
        "cutout": (space.cutout, False),
        "mix": (space.mixes, MIXES[0]),
        "tta": (space.tta, TTA_MODES[0]),
    }
    params: dict[str, Any] = {
        name: off for name, (choices, off) in switches.items() if len(choices) > 1
    }
    low, high = space.label_smoothing
    if low != high:
        params["label_smoothing"] = low
    return params


# What stands in for the report's plateau schedule in a space without one, nearest first:
# smooth decays, then steps (every patience epochs, by its factor), then a constant LR.
REPORT_SCHEDULE_STAND_INS = ("plateau", "cosine", "onecycle", "step", "constant")


def report_params_in(space: SearchSpace) -> dict[str, Any]:
    """The report's Table 1/2 run as parameters of `space`: exactly report_table1_params
    where the space offers its widths, batch size, kernel and schedule. Where the space's
    widest layer differs (the tiny space) every width is scaled by the ratio of the widest
    layers, rounded to the space's step (at least one step); a batch size or kernel the space
    does not offer becomes its nearest choice, and a schedule the nearest in
    REPORT_SCHEDULE_STAND_INS; depth, K, dropout and the LR stay the report's. The recipe
    levers are levers_off(space): where `space` fixes one on, these are not the report's recipe
    (`hpo compare` draws them in the space with its levers off: compare.report_config)."""
    exact = report_table1_params()
    params = {name: exact[name] for name in exact if name not in levers_off(DEFAULT_SPACE)}
    params.update(levers_off(space))
    scale = space.width[1] / DEFAULT_SPACE.width[1]
    step = space.width_step or 1  # log-scale widths: any integer
    for name, value in params.items():
        if name.startswith("width_") and scale != 1:
            params[name] = max(space.width[0], round(value * scale / step) * step)
    for name in ("batch_size", "kernel_size"):
        params[name] = min(getattr(space, name), key=lambda choice: abs(choice - params[name]))
    if "plateau" not in space.schedulers:
        factor, patience = params.pop("plateau_factor"), params.pop("plateau_patience")
        scheduler = next(s for s in REPORT_SCHEDULE_STAND_INS if s in space.schedulers)
        params["scheduler"] = scheduler
        params.update(_stand_in_args(scheduler, factor, patience))
    return params


def _stand_in_args(scheduler: str, factor: float, patience: int) -> dict[str, Any]:
    """The parameters of a stand-in schedule: its defaults, or the plateau's own numbers."""
    if scheduler == "onecycle":
        return {"onecycle_pct_start": OneCycleArgs().pct_start}
    if scheduler == "cosine":
        return {"cosine_min_lr_ratio": CosineArgs().min_lr_ratio}
    if scheduler == "step":
        return {"step_size": patience, "step_gamma": factor}
    return {}


def config_from_params(params: dict[str, Any], space: SearchSpace, epochs: int) -> TrialConfig:
    """The TrialConfig `sample_config` makes from fixed parameters, as for an enqueued trial;
    values outside a range are kept, as Optuna keeps them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "out of the range": intended here
            return sample_config(optuna.trial.FixedTrial(params), space, epochs)
    except ValueError as err:  # a choice the space does not offer, such as its schedule
        raise SpaceError(f"the report's config does not fit this search space: {err}") from err
