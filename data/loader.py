"""An epoch iterator over a dataset kept on the device, as uint8, for the whole run.

Per batch it only indexes, converts to float, augments the batch at once and normalises:
no worker processes, no host-to-device copies after construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .augment import AugmentConfig, augment_batch, mix_batch
from .batches import ImageSet
from .split import stratified_split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DeviceLoader:
    """Yields (images, targets) batches on `device`: float32 normalised images, and int64
    labels, or label probabilities (B, num_classes) where the augmentation mixes images.

    Epoch e is shuffled and augmented from generators seeded with (seed, e), so the run
    is reproducible and a resumed run can set `epoch` to replay from there: the epoch is all
    a checkpoint needs to restore every augmentation generator.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        augment: AugmentConfig | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        epoch: int = 0,
        num_classes: int = 10,
        mean: tuple[float, ...] = CIFAR10_MEAN,  # per channel: the dataset's identity's
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> None:
        _check(images, labels, batch_size, drop_last)
        self.device = torch.device(device)
        self.images = images.to(self.device)  # uint8: a quarter of the memory of float32
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.augment = None if augment is None or augment.is_identity else augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last
        self.num_samples = len(labels)
        self.epoch = epoch  # the next epoch to yield
        self.num_classes = num_classes  # the width of mixed targets
        self._mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    @property
    def black(self) -> torch.Tensor:
        """A black pixel as this loader's batches hold it (normalised), shaped (1, C, 1, 1)."""
        return -self._mean / self._std

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        # Mixing weights, host side. NumPy takes no negative seed: one is read as its 64-bit
        # two's complement (any seed from 0 up is unchanged).
        weights = np.random.default_rng([self.seed % 2**64, self.epoch])
        self.epoch += 1
        order = self._order(generator)
        mixes = self.augment is not None and self.augment.mixes
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            x, labels = self._prepare(self.images[index], generator), self.labels[index]
            if mixes:
                yield mix_batch(x, labels, self.augment, self.num_classes, generator, weights)
            else:
                yield x, labels

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(self.num_samples, device=self.device, generator=generator)
        return torch.arange(self.num_samples, device=self.device)

    def _prepare(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Augment in [0, 1] so the crop's zero fill is black, as with torchvision's RandomCrop.
        x = images.float().div_(255)
        if self.augment is not None:
            x = augment_batch(x, self.augment, generator)
        x = x.sub_(self._mean).div_(self._std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass(frozen=True)
class Labelled:
    """Images (uint8, N x C x H x W) and their labels, on one device."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class RunData:
    """What one run reads, on its device: training images and a held-out part.

    Made once per worker process and shared by its trials; a loader over it copies nothing.
    For the search the held-out part is the validation split; for the final run, the test set.
    """

    train: Labelled
    held_out: Labelled
    mean: tuple[float, ...] = CIFAR10_MEAN  # per channel: the dataset identity's
    std: tuple[float, ...] = CIFAR10_STD

    def loaders(
        self,
        batch_size: int,
        augment: AugmentConfig | None,
        seed: int = 0,
        epoch: int = 0,
        channels_last: bool = False,
        eval_batch_size: int = 1024,
        num_classes: int = 10,
    ) -> tuple[DeviceLoader, DeviceLoader]:
        """(train, held-out) loaders. The training loader is reshuffled and augmented every
        epoch from (seed, epoch) and drops its partial last batch; `epoch` is where a resumed
        run picks up."""
        train = DeviceLoader(
            self.train.images,
            self.train.labels,
            batch_size,
            self.train.images.device,
            augment,
            shuffle=True,
            drop_last=True,
            seed=seed,
            channels_last=channels_last,
            epoch=epoch,
            num_classes=num_classes,
            mean=self.mean,
            std=self.std,
        )
        held_out = DeviceLoader(
            self.held_out.images,
            self.held_out.labels,
            eval_batch_size,
            self.held_out.images.device,
            channels_last=channels_last,
            mean=self.mean,
            std=self.std,
        )
        return train, held_out


def search_data(
    imageset: ImageSet,
    device: torch.device | str,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    stats: tuple[tuple[float, ...], tuple[float, ...]] = (CIFAR10_MEAN, CIFAR10_STD),
) -> RunData:
    """A stratified train/validation split of the training images, on the device.

    `split_seed` is fixed per study, so every trial is scored on the same validation images
    whatever its own seed. The test images are not read.
    """
    train_idx, val_idx = stratified_split(imageset.train_labels, val_fraction, split_seed)
    images, labels = imageset.train_images, imageset.train_labels
    return RunData(
        train=_on(device, images[train_idx], labels[train_idx]),
        held_out=_on(device, images[val_idx], labels[val_idx]),
        mean=stats[0],
        std=stats[1],
    )


def final_data(
    imageset: ImageSet,
    device: torch.device | str,
    stats: tuple[tuple[float, ...], tuple[float, ...]] = (CIFAR10_MEAN, CIFAR10_STD),
) -> RunData:
    """All training images (train + validation), and the test set held out. `stats`: the
    per-channel mean and std to normalise by (the dataset identity's)."""
    return RunData(
        train=_on(device, imageset.train_images, imageset.train_labels),
        held_out=_on(device, imageset.test_images, imageset.test_labels),
        mean=stats[0],
        std=stats[1],
    )


def _on(device: torch.device | str, images: torch.Tensor, labels: torch.Tensor) -> Labelled:
    return Labelled(images.to(device), labels.to(device))


def _check(images: torch.Tensor, labels: torch.Tensor, batch_size: int, drop_last: bool) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and batch_size > len(images):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} images: no batch left")
