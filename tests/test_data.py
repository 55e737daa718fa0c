"""data/: augmentation ops, split, synthetic set, download over real HTTP, cache, loader."""

from __future__ import annotations

import dataclasses
import pickle
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data.cifar
from data.augment import augment_batch, flip_batch, rotate_batch, translate_batch
from data.augment_config import AugmentConfig
from data.batches import CACHE_FILE, ImageSet, load_folder
from data.cifar import (
    ArchiveSource,
    DatasetMissingError,
    cifar10_source,
    default_data_dir,
    download_cifar10,
)
from data.dataset import load_dataset
from data.loader import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, final_data, search_data
from data.split import stratified_split
from data.synthetic import make_synthetic_archive, write_synthetic


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Two OpenMP threads on a busy two-core machine run these small ops 10-100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    return load_dataset("synthetic", tmp_path_factory.mktemp("synthetic"))


def known_images(b: int = 2, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)


# --- augmentation ---------------------------------------------------------------------------


def test_flip_is_an_exact_mirror_where_masked() -> None:
    x = known_images(w=5)
    out = flip_batch(x, torch.tensor([True, False]))
    for j in range(5):
        assert torch.equal(out[0, :, :, j], x[0, :, :, 4 - j])
    assert torch.equal(out[1], x[1])


@pytest.mark.parametrize(("dx", "dy"), [(2, 1), (-3, 2), (0, -1), (4, -4), (0, 0)])
def test_translate_moves_content_and_fills_zeros(dx: int, dy: int) -> None:
    x = known_images(b=1)
    out = translate_batch(x, torch.tensor([dx]), torch.tensor([dy]))
    h, w = x.shape[-2:]
    moved = out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
    source = x[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    assert torch.equal(moved, source)
    vacated = torch.ones(h, w, dtype=torch.bool)
    vacated[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = False
    assert (out[..., vacated] == 0).all()


def test_translate_batch_equals_crop_from_padded_image() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    pad = 4
    dx, dy = torch.randint(-pad, pad + 1, (2, 16))
    out = translate_batch(x, dx, dy)
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(16):
        top, left = pad - int(dy[i]), pad - int(dx[i])
        assert torch.equal(out[i], padded[i, :, top : top + 32, left : left + 32])


def test_rotate_by_zero_is_identity_and_by_90_is_rot90() -> None:
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(rotate_batch(x, 0.0), x, atol=1e-6)
    turned = rotate_batch(x, torch.full((3,), 90.0))
    expected = torch.rot90(x, 1, dims=(-2, -1))
    assert torch.allclose(turned[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4)


def test_augment_with_switches_off_returns_input() -> None:
    x = torch.rand(8, 3, 32, 32)
    off = AugmentConfig(crop_padding=0, flip=False, rotation_degrees=0.0)
    assert torch.equal(augment_batch(x, off, torch.Generator().manual_seed(0)), x)


def test_augment_is_reproducible_for_a_seed() -> None:
    x = torch.rand(32, 3, 32, 32)
    cfg = AugmentConfig(crop_padding=4, flip=True, rotation_degrees=15.0)

    def run(seed: int) -> torch.Tensor:
        return augment_batch(x, cfg, torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert run(1).shape == x.shape


def test_augment_config_round_trip_and_validation() -> None:
    cfg = AugmentConfig(crop_padding=2, flip=False, rotation_degrees=10.0)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour_jitter, zoom"):
        AugmentConfig.from_dict({"zoom": 1, "colour_jitter": 0.1, "flip": True})
    for bad in ({"crop_padding": -1}, {"crop_padding": 16}, {"rotation_degrees": 46.0}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


# --- split ----------------------------------------------------------------------------------


def test_stratified_split_of_cifar_sized_labels() -> None:
    labels = torch.arange(10).repeat(5000)[torch.randperm(50_000)]
    train_idx, val_idx = stratified_split(labels, 0.1, seed=0)
    assert (len(train_idx), len(val_idx)) == (45_000, 5_000)
    assert torch.bincount(labels[val_idx]).tolist() == [500] * 10
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(50_000))
    again = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(again[1], val_idx)
    assert not torch.equal(stratified_split(labels, 0.1, seed=1)[1], val_idx)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_zero_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(torch.zeros(10, dtype=torch.int64), fraction)


# --- synthetic set --------------------------------------------------------------------------


def test_synthetic_files_are_real_cifar_pickles(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, train_per_class=20, test_per_class=5)
    with (folder / "data_batch_1").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (40, 3072)
    assert len(batch[b"labels"]) == 40 and set(batch[b"labels"]) <= set(range(10))
    with (folder / "batches.meta").open("rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert len(meta[b"label_names"]) == 10 and meta[b"num_vis"] == 3072
    with (folder / "test_batch").open("rb") as f:  # torchvision reads them this way
        assert set(pickle.load(f, encoding="latin1")) == {
            "batch_label",
            "labels",
            "data",
            "filenames",
        }


def test_synthetic_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    def batch_bytes(where: str, seed: int) -> bytes:
        return (write_synthetic(tmp_path / where, 10, 2, seed) / "data_batch_3").read_bytes()

    assert batch_bytes("a", 0) == batch_bytes("b", 0)
    assert batch_bytes("a", 0) != batch_bytes("c", 1)


def test_synthetic_set_is_learnable(synthetic: ImageSet) -> None:
    torch.manual_seed(0)
    cfg = AugmentConfig(crop_padding=2)
    train, val = search_data(synthetic, "cpu").loaders(64, cfg, eval_batch_size=500)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        for images, labels in train:
            optimizer.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in val)
    assert correct / val.num_samples > 0.5


# --- download over a real HTTP server -------------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ArchiveSource]:
    return make_synthetic_archive(tmp_path_factory.mktemp("archive"))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


def test_download_fetches_verifies_and_then_reuses(archive, tmp_path: Path) -> None:
    path, source = archive
    with serve(path.parent) as base:
        served = dataclasses.replace(source, url=f"{base}/{path.name}")
        folder = download_cifar10(tmp_path, served)
    assert folder == tmp_path / "cifar-10-batches-py"
    assert data.cifar.is_verified(folder, source)
    assert leftovers(tmp_path) == ["cifar-10-batches-py"]  # no staging folder, no archive
    loaded = load_folder(folder)
    assert torch.equal(
        loaded.train_images, load_folder(path.parent / source.base_folder).train_images
    )
    # Verified already: the server is gone, and nothing is fetched.
    assert download_cifar10(tmp_path, served) == folder


@pytest.mark.parametrize("damage", ["archive", "file"])
def test_wrong_md5_raises_dataset_missing(archive, tmp_path: Path, damage: str) -> None:
    path, source = archive
    if damage == "archive":
        source = dataclasses.replace(source, md5="0" * 32)
    else:
        source = dataclasses.replace(source, files={**source.files, "test_batch": "0" * 32})
    with serve(path.parent) as base, pytest.raises(DatasetMissingError, match="md5|corrupted"):
        download_cifar10(tmp_path, dataclasses.replace(source, url=f"{base}/{path.name}"))
    assert leftovers(tmp_path) == []


def test_unreachable_url_names_the_folder_to_fill(tmp_path: Path) -> None:
    url = closed_port_url()
    source = dataclasses.replace(cifar10_source(), url=url)
    with pytest.raises(DatasetMissingError) as caught:
        download_cifar10(tmp_path, source)
    message = str(caught.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and url in message
    assert f"extract it into {tmp_path}" in message and "\n" not in message


def test_no_download_raises_without_fetching(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="switched off"):
        load_dataset("cifar10", tmp_path, download=False)


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="cifar10, synthetic"):
        load_dataset("imagenet", None)


def test_default_data_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_DATA_DIR", "/data/here")
    assert default_data_dir() == Path("/data/here")
    monkeypatch.delenv("HPO_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    assert default_data_dir() == Path("/cache/backbone-hpo/data")


def test_cifar10_source_comes_from_torchvision() -> None:
    source = cifar10_source()
    assert source.base_folder == "cifar-10-batches-py" and source.url.endswith(".tar.gz")
    expected = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert set(source.files) == expected


# --- uint8 cache ----------------------------------------------------------------------------


def test_cache_is_written_once_and_reused(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, train_per_class=20, test_per_class=5)
    first = load_dataset("synthetic", tmp_path)
    cache = folder / CACHE_FILE
    written = cache.stat().st_mtime_ns
    second = load_dataset("synthetic", tmp_path)
    assert cache.stat().st_mtime_ns == written
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert first.classes == second.classes and first.train_images.shape == (200, 3, 32, 32)
    cache.write_bytes(b"not a torch file")
    assert torch.equal(load_dataset("synthetic", tmp_path).train_images, first.train_images)


def test_unwritable_cache_still_loads(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, train_per_class=5, test_per_class=2)
    (folder / CACHE_FILE).mkdir()  # a cache path that can be neither read nor replaced
    assert load_dataset("synthetic", tmp_path).train_images.shape == (50, 3, 32, 32)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


# --- device loader --------------------------------------------------------------------------


def loader_inputs(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return images, torch.arange(n) % 10


def test_loader_counts_batches_and_samples() -> None:
    images, labels = loader_inputs()
    loader = DeviceLoader(images, labels, 64, "cpu", shuffle=True)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == len(sizes) == 16 and sum(sizes) == loader.num_samples == 1000
    dropped = DeviceLoader(images, labels, 64, "cpu", shuffle=True, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 15


def test_loader_normalises_in_order_without_augmentation() -> None:
    images, labels = loader_inputs(100)
    x, y = next(iter(DeviceLoader(images, labels, 100, "cpu")))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.equal(y, labels)
    assert torch.allclose(x, (images.float() / 255 - mean) / std, atol=1e-6)


def test_loader_shuffle_keeps_labels_and_replays_for_a_seed() -> None:
    images, labels = loader_inputs()
    loader = DeviceLoader(images, labels, 128, "cpu", AugmentConfig(), shuffle=True, seed=3)
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    assert torch.equal(epoch1.sort().values, labels.sort().values)
    assert not torch.equal(epoch1, labels) and not torch.equal(epoch1, epoch2)
    replay = DeviceLoader(images, labels, 128, "cpu", AugmentConfig(), shuffle=True, seed=3)
    assert torch.equal(torch.cat([y for _, y in replay]), epoch1)
    replay.epoch = 1  # a resumed run picks up at its epoch
    assert torch.equal(torch.cat([y for _, y in replay]), epoch2)


def test_loader_channels_last() -> None:
    images, labels = loader_inputs(10)
    x, _ = next(iter(DeviceLoader(images, labels, 10, "cpu", channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_loaders_for_train_val_test_and_final_training(synthetic: ImageSet) -> None:
    train, val = search_data(synthetic, "cpu").loaders(100, AugmentConfig())
    assert (train.num_samples, val.num_samples, len(train)) == (4500, 500, 45)
    assert torch.bincount(val.labels).tolist() == [50] * 10
    full, test = final_data(synthetic, "cpu").loaders(100, None)
    assert (full.num_samples, test.num_samples) == (5000, 1000)
