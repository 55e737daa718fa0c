"""The Backbone CNN of the report: its config, the network, and what it costs.

Names are loaded on first use (PEP 562): the config and the closed-form FLOP count import no
torch; the network and the traced counts load torch when one of their names is asked for.
"""

from importlib import import_module
from typing import Any

_HOME = {
    "REPORT_TABLE1": "config",
    "ModelConfig": "config",
    "ModelConfigError": "config",
    "train_flops_per_image": "flops",
    "count_parameters": "counts",
    "train_step_flops": "counts",
    "BackboneNet": "network",
    "build_model": "network",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
