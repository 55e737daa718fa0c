"""A folder of labelled images, written here by Pillow: decoded, resized, cached, re-read after
a change, a stable carved test split, the dataset's identity, and every bad input's one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import dataset_folder, dataset_identity, load_dataset
from data.folder import CACHE_FOLDER, decode_images, load_image_folder, scan_folder
from data.identity import DatasetError, DatasetIdentity, parse_dataset

SIZE = 8
# (class, file, mode, size, colour): odd sizes, every common mode, PNG and JPEG.
IMAGES = [
    ("cat", "a.png", "RGB", (37, 23), (200, 10, 30)),
    ("cat", "b.jpg", "L", (50, 41), 77),
    ("cat", "c.png", "P", (17, 31), 3),
    ("cat", "d.png", "RGBA", (40, 40), (0, 128, 255, 100)),
    ("cat", "e.jpeg", "RGB", (9, 64), (90, 90, 10)),
    ("dog", "a.png", "L", (33, 33), 150),
    ("dog", "sub/b.png", "RGBA", (12, 5), (1, 2, 3, 0)),
    ("dog", "c.jpg", "RGB", (70, 30), (240, 240, 240)),
    ("dog", "d.png", "I;16", (20, 20), 40000),
    ("dog", "e.png", "RGB", (31, 7), (5, 200, 5)),
    ("owl", "a.png", "P", (16, 16), 7),
    ("owl", "b.png", "RGB", (25, 19), (128, 0, 128)),
    ("owl", "c.jpg", "L", (44, 11), 20),
    ("owl", "d.png", "RGB", (8, 8), (60, 60, 60)),
    ("owl", "e.png", "RGBA", (3, 90), (250, 100, 0, 255)),
]


def write_image(path: Path, mode: str, size: tuple[int, int], colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, colour)
    if mode == "P":
        image.putpalette([v for i in range(256) for v in (i * 30 % 256, 255 - i, i * 7 % 256)])
    image.save(path)


def rgb(mode: str, colour) -> tuple[int, int, int]:
    """The colour a solid image of `colour` decodes to."""
    if mode == "P":
        return (colour * 30 % 256, 255 - colour, colour * 7 % 256)
    if mode == "L":
        return (colour,) * 3
    if mode == "I;16":
        return (round(colour / 257),) * 3
    return tuple(colour[:3])


def write_folder(root: Path, split: str = "train", images=IMAGES) -> Path:
    for cls, name, mode, size, colour in images:
        write_image(root / split / cls / name, mode, size, colour)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "pets")


def expected_pixels() -> dict[str, tuple[int, int, int]]:
    return {f"train/{cls}/{name}": rgb(mode, colour) for cls, name, mode, _, colour in IMAGES}


def test_images_of_any_size_and_mode_are_decoded_resized_and_cached(folder, tmp_path) -> None:
    data = load_image_folder(folder, tmp_path / "cache", SIZE)
    assert data.classes == ["cat", "dog", "owl"] and data.image_size == SIZE
    images = torch.cat([data.train_images, data.test_images])
    assert images.dtype == torch.uint8 and images.shape == (15, 3, SIZE, SIZE)
    # Each solid image keeps its colour (JPEG within a few levels); grayscale is three
    # identical channels, a palette its palette colour, RGBA its colour without alpha.
    for path, colour in expected_pixels().items():
        want = torch.tensor(colour, dtype=torch.int16).view(3, 1, 1)
        tolerance = 3 if path.endswith(("jpg", "jpeg")) else 0
        assert (data.image(path).short() - want).abs().max() <= tolerance, path
    # Cached in the data dir, keyed by the folder, not in the user's folder.
    assert len(list((tmp_path / "cache" / CACHE_FOLDER).glob("pets-*-8px.pt"))) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["train"]


def test_cache_is_reused_and_re_read_after_a_file_changes(folder, tmp_path) -> None:
    first = load_image_folder(folder, tmp_path, SIZE)
    (cache,) = (tmp_path / CACHE_FOLDER).iterdir()
    written = cache.stat().st_mtime_ns
    again = load_image_folder(folder, tmp_path, SIZE)
    assert cache.stat().st_mtime_ns == written  # served from the cache, not decoded again
    assert torch.equal(again.train_images, first.train_images)
    # A real change: new content and a new mtime, same name.
    changed = folder / "train/owl/d.png"
    before = changed.stat().st_mtime_ns
    write_image(changed, "RGB", (8, 8), (255, 0, 0))
    os.utime(changed, ns=(before + 10**9, before + 10**9))
    reread = load_image_folder(folder, tmp_path, SIZE)
    assert first.image("train/owl/d.png")[:, 0, 0].tolist() == [60, 60, 60]
    assert reread.image("train/owl/d.png")[:, 0, 0].tolist() == [255, 0, 0]
    assert reread.fingerprint != first.fingerprint and cache.stat().st_mtime_ns != written


def test_carved_test_split_is_stratified_stable_and_disjoint(folder, tmp_path) -> None:
    data = load_image_folder(folder, tmp_path / "one", SIZE)
    assert data.test_split == "carved from train/: 0.2 of each class, seed 0"
    assert sorted(p.split("/")[1] for p in data.test_files) == ["cat", "dog", "owl"]
    assert data.test_labels.tolist() == [0, 1, 2] and len(data.train_labels) == 12
    # Another cache, another load: the same files are held out, none of them in training.
    other = load_image_folder(folder, tmp_path / "two", SIZE)
    assert other.test_files == data.test_files and other.fingerprint == data.fingerprint
    everything = decode_images([folder / p for p, _ in scan_folder(folder).train], SIZE)
    held_out = {bytes(image.numpy()) for image in data.test_images}
    trained = [bytes(image.numpy()) for image in data.train_images]
    assert not held_out & set(trained) and len(held_out) + len(trained) == len(everything)
    assert not set(data.test_files) & set(data.train_files)
    reseeded = load_image_folder(folder, tmp_path / "one", SIZE, split_seed=5)
    assert "seed 5" in reseeded.test_split


def test_a_test_folder_is_used_as_the_test_set(folder, tmp_path) -> None:
    tests = [("cat", "x.png", "L", (5, 6), 1), ("dog", "x.png", "L", (5, 6), 2)]
    write_folder(folder, "test", tests + [("owl", "x.png", "L", (5, 6), 3)])
    data = load_image_folder(folder, tmp_path, SIZE)
    assert data.test_split == "test/" and len(data.train_labels) == 15
    assert data.test_labels.tolist() == [0, 1, 2] and data.test_images[:, :, 0, 0].tolist() == [
        [1, 1, 1],
        [2, 2, 2],
        [3, 3, 3],
    ]


def test_threads_decode_the_same_pixels_as_one(folder) -> None:
    paths = [folder / p for p, _ in scan_folder(folder).train]
    one = decode_images(paths, SIZE, workers=1)
    assert np.array_equal(decode_images(paths, SIZE, workers=2, chunk=2), one)


def test_identity_survives_a_copy_and_names_a_change(folder, tmp_path) -> None:
    name = f"folder:{folder}"
    identity = dataset_identity(name, tmp_path, image_size=SIZE)
    images = load_dataset(name, tmp_path, image_size=SIZE)
    x = images.train_images.double() / 255
    assert identity.kind == "folder" and identity.name == name
    assert (identity.classes, identity.channels, identity.image_size) == (
        ("cat", "dog", "owl"),
        3,
        SIZE,
    )
    assert (identity.train_count, identity.test_count) == (12, 3)
    assert identity.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert identity.std == pytest.approx(x.std((0, 2, 3), correction=0).tolist(), abs=1e-6)
    assert DatasetIdentity.from_dict(identity.to_dict()) == identity
    # A copy elsewhere with new file times is the same data; a renamed class is not.
    copy = shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copy)
    same = dataset_identity(f"folder:{copy}", tmp_path, image_size=SIZE)
    assert identity.mismatch(same) is None
    (copy / "train/owl").rename(copy / "train/bird")
    renamed = dataset_identity(f"folder:{copy}", tmp_path, image_size=SIZE)
    assert "classes (bird, cat, dog)" in identity.mismatch(renamed)
    assert dataset_folder(f"folder:{copy}", tmp_path, image_size=SIZE) == copy


def test_dataset_names_parse(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_dataset("folder:~/pets").path == tmp_path / "pets"
    assert parse_dataset("folder:~/pets").name == f"folder:{tmp_path / 'pets'}"
    assert parse_dataset("cifar100-coarse").kind == "cifar100-coarse"
    with pytest.raises(DatasetError, match="cifar10, synthetic, cifar100, .*folder:PATH"):
        parse_dataset("folder:")


def break_folder(root: Path, how: str) -> str:
    """Make `root` bad in one way; return what its error must name."""
    if how == "missing":
        return f"{root} does not exist"
    if how == "file":
        root.write_text("x")
        return f"{root} is not a folder"
    root.mkdir()
    if how == "no train":
        return f"{root} has no train/ folder"
    write_folder(root, images=IMAGES[:5])
    if how == "one class":
        return "1 class folder(s)"
    write_folder(root, images=IMAGES[5:])
    if how == "empty class":
        (root / "train/empty").mkdir()
        return f"class folder {root}/train/empty holds no images"
    if how == "truncated":
        path = root / "train/dog/e.png"
        path.write_bytes(path.read_bytes()[:60])
        return f"cannot read image {path} (unreadable or truncated)"
    if how == "not an image":
        (root / "train/cat/notes.txt").write_text("not a picture")
        return f"{root}/train/cat/notes.txt is not an image"
    if how == "test classes differ":
        write_folder(
            root, "test", [("cat", "x.png", "L", (4, 4), 0), ("eel", "x.png", "L", (4, 4), 0)]
        )
        return "only in test/: eel; missing from test/: dog, owl"
    raise AssertionError(how)


BAD = [
    "missing",
    "file",
    "no train",
    "one class",
    "empty class",
    "truncated",
    "not an image",
    "test classes differ",
]


@pytest.mark.parametrize("how", BAD)
def test_each_bad_folder_is_one_line_naming_it(tmp_path, how: str) -> None:
    root = tmp_path / "bad folder"
    expected = break_folder(root, how)
    with pytest.raises(DatasetError) as caught:
        dataset_folder(f"folder:{root}", tmp_path / "cache", image_size=SIZE)
    message = str(caught.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "cache" / CACHE_FOLDER).exists() or not any(
        (tmp_path / "cache" / CACHE_FOLDER).iterdir()
    )


def test_a_bad_image_is_named_when_threads_decode(folder) -> None:
    bad = folder / "train/dog/e.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    paths = [folder / p for p, _ in scan_folder(folder).train]
    with pytest.raises(DatasetError, match=str(bad)):
        decode_images(paths, SIZE, workers=2, chunk=2)


def test_the_loader_normalises_by_the_identitys_statistics(folder, tmp_path) -> None:
    from data.loader import DeviceLoader

    name = f"folder:{folder}"
    identity = dataset_identity(name, tmp_path, image_size=SIZE)
    images = load_dataset(name, tmp_path, image_size=SIZE)
    loader = DeviceLoader(
        images.train_images, images.train_labels, 100, "cpu", mean=identity.mean, std=identity.std
    )
    (x, _), *_ = list(loader)
    assert x.mean((0, 2, 3)).tolist() == pytest.approx([0, 0, 0], abs=1e-4)
    assert x.std((0, 2, 3), correction=0).tolist() == pytest.approx([1, 1, 1], abs=1e-4)
