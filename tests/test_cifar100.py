"""CIFAR-100: an archive in the published format, written here, fetched, verified and loaded."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from test_data import serve  # the CIFAR-10 tests' local HTTP server

import data.dataset
from data.batches import CIFAR100_FOLDER, load_cifar100
from data.cifar import DatasetMissingError, cifar100_source, download_archive, is_verified
from data.dataset import dataset_identity, load_dataset
from data.loader import CIFAR10_MEAN, CIFAR10_STD
from data.synthetic import make_cifar100_archive, write_synthetic


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory):
    """The archive, its source pointing at a real local HTTP server (torchvision's download
    does not read file:// URLs)."""
    path, source = make_cifar100_archive(tmp_path_factory.mktemp("cifar100"))
    with serve(path.parent) as base:
        yield path, dataclasses.replace(source, url=f"{base}/{path.name}")


@pytest.fixture
def local_cifar100(archive, monkeypatch: pytest.MonkeyPatch):
    """`--dataset cifar100` fetches the archive written here, not Toronto's."""
    _, source = archive
    monkeypatch.setattr(data.dataset, "cifar100_source", lambda: source)
    return source


def written(archive, split: str) -> dict:
    path, source = archive
    with (path.parent / source.base_folder / split).open("rb") as f:
        return pickle.load(f, encoding="latin1")


def test_source_is_torchvisions() -> None:
    from torchvision.datasets import CIFAR100

    source = cifar100_source()
    assert (source.url, source.md5, source.base_folder) == (
        CIFAR100.url,
        CIFAR100.tgz_md5,
        "cifar-100-python",
    )
    assert set(source.files) == {"train", "test", "meta"}


def test_archive_is_downloaded_verified_and_read_with_fine_labels(archive, tmp_path) -> None:
    _, source = archive
    folder = download_archive(tmp_path, source)
    assert folder == tmp_path / CIFAR100_FOLDER and is_verified(folder, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CIFAR100_FOLDER]  # no staging left
    images = load_cifar100(folder)
    train = written(archive, "train")
    assert images.train_images.shape == (200, 3, 32, 32) and len(images.test_labels) == 100
    assert images.train_labels.tolist() == train["fine_labels"]
    expected = np.asarray(train["data"]).reshape(-1, 3, 32, 32)
    assert torch.equal(images.train_images, torch.from_numpy(expected))
    assert images.classes == [f"fine_{i:02d}" for i in range(100)]
    # The second load comes from the uint8 cache and is the same.
    assert (folder / "uint8-cache-fine.pt").is_file()
    assert torch.equal(load_cifar100(folder).train_labels, images.train_labels)


def test_coarse_labels_are_the_twenty_superclasses(archive, local_cifar100, tmp_path) -> None:
    coarse = load_dataset("cifar100-coarse", tmp_path)
    fine = load_dataset("cifar100", tmp_path)
    assert coarse.classes == [f"coarse_{i:02d}" for i in range(20)] and len(fine.classes) == 100
    assert coarse.test_labels.tolist() == written(archive, "test")["coarse_labels"]
    assert torch.equal(coarse.train_images, fine.train_images)
    assert torch.equal(coarse.train_labels, fine.train_labels % 20)


def test_identity_is_the_archive_md5_and_the_training_split_statistics(
    local_cifar100, tmp_path
) -> None:
    identity = dataset_identity("cifar100", tmp_path)
    images = load_dataset("cifar100", tmp_path)
    x = images.train_images.double() / 255
    assert identity.fingerprint == local_cifar100.md5
    assert (identity.num_classes, identity.channels, identity.image_size) == (100, 3, 32)
    assert (identity.train_count, identity.test_count) == (200, 100)
    assert identity.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert identity.std == pytest.approx(x.std((0, 2, 3), correction=0).tolist(), abs=1e-6)


def test_synthetic_keeps_cifar10_normalisation(tmp_path) -> None:
    write_synthetic(tmp_path, train_per_class=5, test_per_class=2)  # small: quick
    identity = dataset_identity("synthetic", tmp_path)
    assert (identity.mean, identity.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert identity.to_dict()["classes"] == [f"pattern_{i}" for i in range(10)]


@pytest.mark.parametrize("damage", ["archive", "file"])
def test_wrong_md5_says_how_to_fetch_it_by_hand(archive, tmp_path, damage: str) -> None:
    _, source = archive
    if damage == "archive":
        source = dataclasses.replace(source, md5="0" * 32)
    else:
        source = dataclasses.replace(source, files={**source.files, "meta": "0" * 32})
    with pytest.raises(DatasetMissingError) as caught:
        download_archive(tmp_path, source)
    message = str(caught.value)
    assert message.startswith(f"CIFAR-100 not found in {tmp_path / CIFAR100_FOLDER}")
    assert f"Fetch {source.url} and extract it into {tmp_path}" in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_no_download_raises_without_fetching(tmp_path) -> None:
    with pytest.raises(DatasetMissingError, match="CIFAR-100 not found.*switched off"):
        load_dataset("cifar100", tmp_path, download=False)
    # A copy in place whose files are not the published ones is named as such, not missing.
    (tmp_path / CIFAR100_FOLDER).mkdir()
    (tmp_path / CIFAR100_FOLDER / "meta").write_bytes(b"not the archive's")
    with pytest.raises(DatasetMissingError, match="CIFAR-100 does not match its md5 checksums"):
        load_dataset("cifar100", tmp_path, download=False)
