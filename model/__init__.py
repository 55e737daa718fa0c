"""The Backbone CNN of the report: its config, the network, and what it costs."""

from model.config import REPORT_TABLE1, ModelConfig, ModelConfigError
from model.counts import count_parameters, train_flops_per_image, train_step_flops
from model.network import BackboneNet, build_model

__all__ = [
    "REPORT_TABLE1",
    "BackboneNet",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "count_parameters",
    "train_flops_per_image",
    "train_step_flops",
]
