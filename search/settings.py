"""Study settings: chosen once when a study is created, stored in it, used by every worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from search.space import SearchSpace

PRUNERS = ("hyperband", "median", "none")
DATASETS = ("cifar10", "synthetic")
SETTINGS_ATTR = "hpo:settings"


class SettingsConflict(ValueError):
    """A command-line flag contradicts what the study stored at creation."""


@dataclass(frozen=True)
class StudySettings:
    space_name: str
    space: dict[str, Any]  # the whole space, so a worker elsewhere needs no file
    epochs: int
    dataset: str
    pruner: str
    seed: int
    heartbeat_s: int
    direction: str = "minimize"  # validation loss

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudySettings:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    def check_flags(self, flags: dict[str, Any]) -> None:
        """Refuse any flag the user gave that differs from the stored value."""
        for name, given in flags.items():
            if given is None:
                continue
            stored = self.space_name if name == "space" else getattr(self, name)
            if given != stored:
                raise SettingsConflict(
                    f"--{name.replace('_', '-')} {given} contradicts the study's stored "
                    f"{name} {stored}; leave it out to use the study's settings"
                )
