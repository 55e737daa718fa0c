"""An epoch iterator over a dataset kept on the device, as uint8, for the whole run.

Per batch it only indexes, converts to float, augments the batch at once and normalises:
no worker processes, no host-to-device copies after construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .augment import AugmentConfig, augment_batch
from .batches import ImageSet
from .split import stratified_split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DeviceLoader:
    """Yields (images, labels) batches on `device`: float32 normalised images, int64 labels.

    Epoch e is shuffled and augmented from a generator seeded with (seed, e), so the run
    is reproducible and a resumed run can set `epoch` to replay from there.
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
        self.epoch = 0
        self._mean = torch.tensor(CIFAR10_MEAN, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(CIFAR10_STD, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        self.epoch += 1
        order = self._order(generator)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self._prepare(self.images[index], generator), self.labels[index]

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


def make_loaders(
    imageset: ImageSet,
    batch_size: int,
    device: torch.device | str,
    augment: AugmentConfig | None,
    val_fraction: float = 0.1,
    seed: int = 0,
    eval_batch_size: int = 1024,
    split_seed: int = 0,
    channels_last: bool = False,
) -> tuple[DeviceLoader, DeviceLoader]:
    """(train, validation) loaders from a stratified split of the training images.

    `split_seed` is separate from `seed` (shuffling, augmentation) so every trial of a study
    is scored on the same validation images whatever its own seed.
    """
    train_idx, val_idx = stratified_split(imageset.train_labels, val_fraction, split_seed)
    images, labels = imageset.train_images, imageset.train_labels
    train = _shuffled(
        images[train_idx], labels[train_idx], batch_size, device, augment, seed, channels_last
    )
    val = DeviceLoader(
        images[val_idx], labels[val_idx], eval_batch_size, device, channels_last=channels_last
    )
    return train, val


def full_train_loader(
    imageset: ImageSet,
    batch_size: int,
    device: torch.device | str,
    augment: AugmentConfig | None,
    seed: int = 0,
    channels_last: bool = False,
) -> DeviceLoader:
    """All training images (train + validation), for the final training run."""
    images, labels = imageset.train_images, imageset.train_labels
    return _shuffled(images, labels, batch_size, device, augment, seed, channels_last)


def _shuffled(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    augment: AugmentConfig | None,
    seed: int,
    channels_last: bool,
) -> DeviceLoader:
    """A training loader: reshuffled and augmented every epoch, partial last batch dropped."""
    return DeviceLoader(
        images,
        labels,
        batch_size,
        device,
        augment,
        shuffle=True,
        drop_last=True,
        seed=seed,
        channels_last=channels_last,
    )


def test_loader(
    imageset: ImageSet,
    device: torch.device | str,
    batch_size: int = 1024,
    channels_last: bool = False,
) -> DeviceLoader:
    """The test images in order, without augmentation."""
    return DeviceLoader(
        imageset.test_images, imageset.test_labels, batch_size, device, channels_last=channels_last
    )


test_loader.__test__ = False  # a loader, not a pytest test, when imported into a test module


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
