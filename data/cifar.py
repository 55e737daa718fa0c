"""Where CIFAR-10 and CIFAR-100 live on disk, and fetching each once with every file's md5
checked."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Everything a failed fetch or extract can raise; anything else is a bug and should surface.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, tarfile.TarError)


class DatasetMissingError(RuntimeError):
    """The dataset is not on disk and could not be fetched; the message says how to fix it."""


@dataclass(frozen=True)
class ArchiveSource:
    """A tar.gz holding one folder of files, with the md5 of the archive and of each file."""

    url: str
    filename: str
    md5: str
    base_folder: str
    files: Mapping[str, str]  # file name inside base_folder -> md5
    title: str = "CIFAR-10"  # what the missing-dataset message calls it


@cache
def cifar10_source() -> ArchiveSource:
    """CIFAR-10's URL and checksums, as torchvision pins them (imported only when needed:
    importing torchvision costs every `hpo` command about two seconds)."""
    from torchvision.datasets import CIFAR10

    return _torchvision_source(CIFAR10, "CIFAR-10")


@cache
def cifar100_source() -> ArchiveSource:
    """CIFAR-100's URL and checksums, as torchvision pins them (`cifar-100-python/`)."""
    from torchvision.datasets import CIFAR100

    return _torchvision_source(CIFAR100, "CIFAR-100")


def _torchvision_source(dataset: type, title: str) -> ArchiveSource:
    files = {name: md5 for name, md5 in dataset.train_list + dataset.test_list}
    files[dataset.meta["filename"]] = dataset.meta["md5"]
    return ArchiveSource(
        url=dataset.url,
        filename=dataset.filename,
        md5=dataset.tgz_md5,
        base_folder=dataset.base_folder,
        files=files,
        title=title,
    )


def default_data_dir() -> Path:
    """$HPO_DATA_DIR, else $XDG_CACHE_HOME (or ~/.cache) / backbone-hpo / data."""
    if override := os.environ.get("HPO_DATA_DIR"):
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "backbone-hpo" / "data"


def is_verified(folder: Path, source: ArchiveSource) -> bool:
    """True when every file of the source is in `folder` with the right md5."""
    from torchvision.datasets.utils import check_integrity

    return all(check_integrity(folder / name, md5) for name, md5 in source.files.items())


def require_cifar10(data_dir: Path | str, source: ArchiveSource | None = None) -> Path:
    """The verified folder under `data_dir`, without downloading anything."""
    return require_archive(data_dir, source or cifar10_source())


def download_cifar10(data_dir: Path | str, source: ArchiveSource | None = None) -> Path:
    """The verified folder under `data_dir`, downloaded and extracted first if needed."""
    return download_archive(data_dir, source or cifar10_source())


def require_archive(data_dir: Path | str, source: ArchiveSource) -> Path:
    """The source's verified folder under `data_dir`, without downloading anything."""
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / source.base_folder
    if not is_verified(folder, source):
        raise _missing(data_dir, source, "downloading is switched off")
    return folder


def download_archive(data_dir: Path | str, source: ArchiveSource) -> Path:
    """The source's verified folder under `data_dir`, downloaded and extracted first if
    needed."""
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / source.base_folder
    if is_verified(folder, source):
        return folder
    try:
        _fetch(data_dir, source)
    except _DOWNLOAD_ERRORS as exc:
        raise _missing(data_dir, source, f"the download failed: {exc}") from exc
    return folder


def _fetch(data_dir: Path, source: ArchiveSource) -> None:
    # Extract into a private staging folder and move it in only once verified, so a crash or
    # a second worker downloading at the same time never leaves a half-written folder.
    from torchvision.datasets.utils import download_and_extract_archive

    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=data_dir) as staging:
        download_and_extract_archive(source.url, staging, filename=source.filename, md5=source.md5)
        extracted = Path(staging) / source.base_folder
        if not is_verified(extracted, source):
            raise RuntimeError("the extracted files do not match their md5 checksums")
        _move_into_place(extracted, data_dir / source.base_folder, source)


def _move_into_place(extracted: Path, folder: Path, source: ArchiveSource) -> None:
    if folder.exists() and not is_verified(folder, source):
        shutil.rmtree(folder)  # a damaged earlier copy; the verified one replaces it
    try:
        extracted.rename(folder)
    except OSError:
        if not is_verified(folder, source):  # lost a race to a worker with a good copy: fine
            raise


def _missing(data_dir: Path, source: ArchiveSource, reason: str) -> DatasetMissingError:
    reason = " ".join(reason.split())  # keep the message on one line
    folder = data_dir / source.base_folder
    found = "does not match its md5 checksums" if folder.exists() else "not found"
    return DatasetMissingError(
        f"{source.title} {found} in {folder} and {reason}. "
        f"Fetch {source.url} and extract it into {data_dir}, or pass --data-dir"
    )
