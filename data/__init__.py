"""CIFAR-10 on disk and on the device: download, cache, split, augment, load.

Import from the modules themselves (`from data.loader import RunData`): this file imports
nothing, so `data.dataset` and `data.augment_config` stay torch-free for the control plane,
and only the tensor modules load torch.
"""
