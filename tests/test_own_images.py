"""A study on a folder of the user's own images through real `hpo` processes: start with two
workers, best, train, compare; a worker or a final run holding other data refused; every bad
folder refused by `hpo create` with nothing stored; an old CIFAR-10 study unchanged."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import run_hpo
from PIL import Image
from test_image_folder import break_folder

from data.dataset import load_with_identity
from data.loader import CIFAR10_MEAN, CIFAR10_STD
from search.rules import attrs
from search.rules.config import TrialConfig
from search.rules.cost import draw_costs, search_train_images
from search.rules.data import describe_data, fit_to_data, num_classes, study_identity
from search.rules.settings import StudySettings
from search.rules.space import (
    DEFAULT_SPACE,
    TINY_SPACE,
    config_from_params,
    max_poolings,
    report_params_in,
    report_table1_params,
    sample_config,
)
from storage import open_storage

CLASSES = ("cat", "dog", "owl")
# The tiny space with batches a folder of ~30 training images holds.
SPACE = "base: tiny\nbatch_size: [8, 16]\n"


def write_pictures(root: Path, per_class: int = 14) -> Path:
    """PNG and JPEG files of odd sizes, each class with its own bright channel."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12 + i, 10 + c, 3), dtype=np.uint8)
            pixels[..., c] = 255
            path = root / "train" / name / f"{i}.{'png' if i % 2 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def expect_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert "Traceback" not in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def trials_by_state(env: dict[str, str], name: str) -> dict[str, int]:
    study = optuna.load_study(study_name=name, storage=open_storage(env["HPO_STORAGE"]))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {state.name: states.count(state) for state in set(states)}


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    (tmp_path / "space.yaml").write_text(SPACE)
    return write_pictures(tmp_path / "my pictures")


def create(study: str, dataset: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run_hpo(
        "create", "--study", study, "--trials", "3", "--space", "space.yaml", "--epochs", "1",
        "--dataset", dataset, env=env, cwd=cwd,
    )  # fmt: skip


@pytest.mark.slow
def test_a_folder_study_end_to_end(hpo_env: dict[str, str], tmp_path: Path, pictures) -> None:
    def hpo(*args: str) -> subprocess.CompletedProcess:
        return run_hpo(*args, env=hpo_env, cwd=tmp_path)

    started = hpo(
        "start", "--study", "own", "--trials", "3", "--space", "space.yaml", "--epochs", "1",
        "--dataset", "folder:my pictures",
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    assert trials_by_state(hpo_env, "own") == {"COMPLETE": 3}
    status = hpo("status", "--study", "own")
    assert f"folder:{pictures} (3 classes" in " ".join(status.stdout.split())

    assert hpo("best", "--study", "own", "-o", "best.yaml").returncode == 0
    document = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert document["model"]["num_classes"] == 3  # the classifier follows the data
    data = document["source"]["data"]
    assert data["name"] == f"folder:{pictures}" and data["classes"] == list(CLASSES)
    assert data["test_split"].startswith("carved")

    # No --dataset: the config's own data, found by the identity `hpo best` wrote.
    trained = hpo("train", "--config", "best.yaml", "--epochs", "1", "--output-dir", "final")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "seed 0: test accuracy" in trained.stdout

    compared = hpo("compare", "--study", "own", "--seeds", "1", "--epochs", "1")
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "num_classes 10 -> 3" in " ".join(compared.stdout.split())  # what was fitted

    # A final run on a changed copy of the folder is refused before it trains.
    copy = tmp_path / "copy"
    shutil.copytree(pictures, copy)
    (copy / "train/dog/3.png").write_bytes((copy / "train/dog/5.png").read_bytes())
    refused = hpo(
        "train", "--config", "best.yaml", "--dataset", f"folder:{copy}", "--output-dir", "x"
    )
    expect_one_line(refused, "holds other images than the study's", "nothing trained")
    assert not (tmp_path / "x" / "model-seed0.pt").exists()


@pytest.mark.slow
def test_a_worker_with_a_changed_copy_is_refused(
    hpo_env: dict[str, str], tmp_path: Path, pictures
) -> None:
    assert create("own", f"folder:{pictures}", hpo_env, tmp_path).returncode == 0
    waiting = trials_by_state(hpo_env, "own")
    copy = tmp_path / "elsewhere"
    shutil.copytree(pictures, copy)

    def worker() -> subprocess.CompletedProcess:
        command = ("worker", "--study", "own", "--dataset", f"folder:{copy}")
        return run_hpo(*command, env=hpo_env, cwd=tmp_path)

    Image.new("RGB", (9, 9), (1, 2, 3)).save(copy / "train/cat/1.png")  # one image's content
    expect_one_line(worker(), "holds other images than the study's", "refused: nothing trained")
    shutil.rmtree(copy)
    shutil.copytree(pictures, copy)
    (copy / "train/owl").rename(copy / "train/bird")  # a class renamed
    expect_one_line(worker(), "the study expects 3 (cat, dog, owl)", "refused: nothing trained")
    assert trials_by_state(hpo_env, "own") == waiting == {"WAITING": 3}  # nothing ran


@pytest.mark.slow
@pytest.mark.parametrize("how", ["missing", "one class", "not an image", "test classes differ"])
def test_a_bad_folder_is_one_line_and_nothing_is_stored(
    hpo_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    root = tmp_path / "bad folder"
    expected = break_folder(root, how)
    expect_one_line(create("s", f"folder:{root}", hpo_env, tmp_path), expected)
    storage = open_storage(hpo_env["HPO_STORAGE"])
    assert optuna.get_all_study_names(storage) == []


def test_an_old_cifar10_study_loads_and_scores_as_before(data_dir: Path) -> None:
    # Settings as a study created before identities stored them.
    old = StudySettings.from_dict({"space": DEFAULT_SPACE.to_dict(), "dataset": "cifar10"})
    assert old.identity is None and study_identity(old) is None
    assert num_classes(old) == 10 and describe_data(old) == "cifar10"
    assert search_train_images(old) == 45_000
    cfg = config_from_params(report_table1_params(), old.search_space(), old.epochs)
    assert cfg.model.num_classes == 10
    assert fit_to_data(cfg, old) is cfg  # the same network as before
    # The synthetic set (as CIFAR-10) keeps CIFAR-10's constants: the same inputs as before.
    found = load_with_identity("synthetic", data_dir)[1]
    assert (found.mean, found.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert found.num_classes == 10


def test_a_config_of_another_class_count_is_refused(tmp_path: Path, data_dir: Path) -> None:
    from search.rules.data import check_classes

    found = load_with_identity("synthetic", data_dir)[1]
    cfg = TrialConfig.from_dict({"model": {"channels": [[3, 8]], "blocks": [1], "num_classes": 3}})
    with pytest.raises(ValueError, match="synthetic has 10 classes; the config's classifier has 3"):
        check_classes(cfg, found)


@pytest.mark.slow
def test_a_folder_study_of_another_image_size(
    hpo_env: dict[str, str], tmp_path: Path, pictures
) -> None:
    expect_one_line(
        run_hpo("create", "--study", "c", "--trials", "2", "--image-size", "64", env=hpo_env,
                cwd=tmp_path),
        "--image-size 64: cifar10 images are 32x32 (folders only)",
    )  # fmt: skip

    def create_big(*space: str) -> subprocess.CompletedProcess:
        return run_hpo(
            "create", "--study", "big", "--trials", "2", "--dataset", f"folder:{pictures}",
            "--image-size", "64", *space, env=hpo_env, cwd=tmp_path,
        )  # fmt: skip

    # 42 images, 30 in a search epoch (test and validation set aside): 128-512 leave none.
    expect_one_line(create_big(), "trains on 30 images, fewer than the space's batch_size 512")
    assert optuna.get_all_study_names(open_storage(hpo_env["HPO_STORAGE"])) == []
    created = create_big("--space", "space.yaml")
    assert created.returncode == 0, created.stderr
    study = optuna.load_study(study_name="big", storage=open_storage(hpo_env["HPO_STORAGE"]))
    settings = StudySettings.from_dict(study.user_attrs[attrs.SETTINGS])
    assert settings.image_size == 64 and settings.identity["image_size"] == 64
    assert "3x64x64" in describe_data(settings)


@pytest.mark.filterwarnings("ignore:The value 6 of the parameter")
def test_the_space_and_the_cost_follow_the_image_size() -> None:
    assert max_poolings(32) == 5 and max_poolings(64) == 6 and max_poolings(48) == 5
    six_layers = {"backbones": 1, "blocks_0": 1, "layers_0": 6, "kernel_size": 3, "dropout": 0.0}
    six_layers.update({f"width_0_{j}": 8 for j in range(1, 7)})
    space = replace(TINY_SPACE, layers=(1, 6), backbones=(1, 1))
    params = {**report_params_in(space), **six_layers}
    cfg = sample_config(optuna.trial.FixedTrial(params), space, 1, image_size=64)
    assert cfg.model.image_size == 64 and len(cfg.model.channels[0]) == 7
    with pytest.raises(ValueError):  # 32x32 allows five
        sample_config(optuna.trial.FixedTrial(params), space, 1)
    # The tiny space draws the same networks at either size: four times the FLOPs at 64.
    ratio = draw_costs(TINY_SPACE, 1, 50, image_size=64) / draw_costs(TINY_SPACE, 1, 50)
    assert ratio.min() > 3.5 and ratio.max() <= 4.0
