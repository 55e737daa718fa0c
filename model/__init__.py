"""The Backbone CNN of the report: its config, the network, and what it costs.

Import from the modules themselves (`from model.network import build_model`): this file
imports nothing, so `model.config` and the closed-form `model.flops` stay torch-free for the
control plane, and only the network and the traced counts load torch.
"""
