"""The study's data: which dataset this machine loads, whether it is the study's, and the
network fitted to it. Torch-free: the identity is computed in data/, compared here."""

from __future__ import annotations

from dataclasses import replace

from data.dataset import DATASETS
from data.identity import DatasetError, DatasetIdentity, parse_dataset
from search.rules.config import TrialConfig
from search.rules.cost import search_train_images
from search.rules.settings import StudySettings
from search.rules.space import IMAGE_SIZE

# CIFAR-10 and the synthetic set: 10 classes, no identity stored (see StudySettings.identity).
LEGACY_CLASSES = 10
DATASET_HELP = (
    "cifar10, cifar100 (100 fine labels), cifar100-coarse (its 20 superclasses), synthetic, "
    "or folder:PATH (PATH/train/CLASS/*.png|jpg..., optional PATH/test/CLASS/...)."
)


def needs_identity(name: str) -> bool:
    """Whether a study of this dataset stores its identity (all but CIFAR-10, synthetic)."""
    return parse_dataset(name).kind not in DATASETS


def study_identity(settings: StudySettings) -> DatasetIdentity | None:
    return None if settings.identity is None else DatasetIdentity.from_dict(settings.identity)


def num_classes(settings: StudySettings) -> int:
    """The classifier's outputs for the study: one per class of its data."""
    identity = study_identity(settings)
    return LEGACY_CLASSES if identity is None else identity.num_classes


def local_dataset(settings: StudySettings, given: str | None) -> str:
    """The `--dataset` value this machine loads: the study's, or `given`, its copy of the same
    data elsewhere (a folder at another path: the content is compared once loaded)."""
    if given is None:
        return settings.dataset
    spec = parse_dataset(given)
    if spec.kind != parse_dataset(settings.dataset).kind:
        raise DatasetError(f"--dataset {given}: the study trains on {settings.dataset}")
    return spec.name


def check_data(expected: DatasetIdentity | None, found: DatasetIdentity) -> None:
    """Refuse data at hand (`found`) that are not the study's, in one line."""
    problem = None if expected is None else expected.mismatch(found)
    if problem:
        raise DatasetError(f"{problem}; refused: nothing trained")


def check_batches_fit(settings: StudySettings) -> None:
    """A batch size over a search epoch's images leaves no batch (the loader drops the last,
    partial one): a trial drawing it could only fail, so a small folder is refused first."""
    largest, images = max(settings.search_space().batch_size), search_train_images(settings)
    if largest > images:
        raise DatasetError(
            f"{settings.dataset}: a search epoch trains on {images} images, fewer than the "
            f"space's batch_size {largest}: add images, or give a space file (--space "
            "FILE.yaml) whose batch_size fits"
        )


def fit_to_data(cfg: TrialConfig, settings: StudySettings) -> TrialConfig:
    """`cfg` with one classifier output per class of the study's data, at its image size."""
    fitted = {"num_classes": num_classes(settings), "image_size": settings.image_size}
    if all(getattr(cfg.model, name) == value for name, value in fitted.items()):
        return cfg
    return replace(cfg, model=replace(cfg.model, **fitted))


def check_image_size(dataset: str | None, image_size: int | None) -> None:
    """Only a folder is resized: CIFAR and the synthetic set are 32x32."""
    name = dataset or DATASETS[0]
    if image_size not in (None, IMAGE_SIZE) and parse_dataset(name).kind != "folder":
        raise DatasetError(f"--image-size {image_size}: {name} images are 32x32 (folders only)")


def check_classes(cfg: TrialConfig, found: DatasetIdentity) -> None:
    """A config whose classifier does not match the data's classes cannot train on them."""
    if cfg.model.num_classes != found.num_classes:
        raise DatasetError(
            f"{found.name} has {found.num_classes} classes; the config's classifier has "
            f"{cfg.model.num_classes} outputs"
        )


def describe_data(settings: StudySettings) -> str:
    """The study's data in a few words, for `hpo status`, the report and the dashboard."""
    identity = study_identity(settings)
    if identity is None:
        return settings.dataset
    size = f"{identity.channels}x{identity.image_size}x{identity.image_size}"
    return (
        f"{identity.name} ({identity.num_classes} classes, {identity.train_count} training "
        f"and {identity.test_count} test images of {size}; test: {identity.test_split})"
    )
