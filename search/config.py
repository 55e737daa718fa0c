"""TrialConfig: the one config that flows from sampling to export to final training."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from data import AugmentConfig
from model import ModelConfig

SCHEDULERS = ("plateau", "onecycle", "cosine", "step", "constant")
# Epochs of a trial (and of a config that names none).
DEFAULT_EPOCHS = 20
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


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer (AdamW), schedule and batch size of one training run."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    batch_size: int = 256
    epochs: int = DEFAULT_EPOCHS
    scheduler: str = "plateau"
    scheduler_args: dict[str, float] = field(default_factory=dict)

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
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"train.scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )


@dataclass(frozen=True)
class TrialConfig:
    model: ModelConfig
    train: TrainConfig
    augment: AugmentConfig

    def with_epochs(self, epochs: int) -> TrialConfig:
        return replace(self, train=replace(self.train, epochs=epochs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": asdict(self.train),
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


def load_config_file(path: Path) -> tuple[TrialConfig, dict[str, Any]]:
    """The TrialConfig in a YAML file `hpo best` wrote, and the whole document."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    return TrialConfig.from_dict(document), document
