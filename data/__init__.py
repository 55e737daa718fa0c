"""Datasets on disk and on the device: CIFAR-10, CIFAR-100, a folder of labelled images and the
synthetic set; download or decode, checksum or fingerprint, cache, split, identity, augment, load.

Import from the modules themselves (`from data.loader import RunData`): this file imports
nothing, so `data.dataset`, `data.identity` and `data.augment_config` stay torch-free for the
control plane, and only the tensor modules load torch.
"""
