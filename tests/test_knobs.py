"""Each searched knob does what its name says (issue 37): SGD's momentum under onecycle, a
negative study seed, the plateau's notion of a worse epoch, the border of a shifted view."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_hpo
from test_trainer import TINY, batches, trainer_for

from data.augment_config import AugmentConfig
from data.dataset import load_dataset
from data.loader import DeviceLoader, Labelled, RunData, search_data
from search.rules import attrs
from search.rules.config import TrainConfig, TrialConfig
from search.rules.settings import VAL_SCORES, StudySettings
from search.training.objective import TrialRunner, WorkerInfo
from search.training.run import start_run
from search.training.trainer import DeviceRecipe

CPU = torch.device("cpu")
# fp32: the inputs the model sees are compared exactly.
FP32 = DeviceRecipe(device=CPU, autocast_dtype=None, memory_format=torch.contiguous_format)

# --- a onecycle trial's momentum is the drawn one ----------------------------------------------


def momentum_at_each_step(cfg: TrainConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """SGD's momentum (AdamW's beta1) at each step of a 2-epoch run, and its final weights."""
    trainer = trainer_for(cfg)
    seen: list[float] = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, *_: seen.append(
            optimizer.param_groups[0].get("momentum") or optimizer.param_groups[0]["betas"][0]
        )
    )
    list(trainer.fit(batches(3), None))
    return seen, trainer.model.state_dict()


def test_sgd_momentum_under_onecycle_is_the_drawn_one_all_along() -> None:
    weights = {}
    for momentum in (0.80, 0.99):
        cfg = TrainConfig(
            optimizer="sgd", lr=0.05, momentum=momentum, scheduler="onecycle", epochs=2,
            grad_clip=0.0,
        )  # fmt: skip
        seen, weights[momentum] = momentum_at_each_step(cfg)
        assert seen == [momentum] * 6
    assert any(not torch.equal(weights[0.80][k], weights[0.99][k]) for k in weights[0.80])


def test_adamw_beta1_under_onecycle_stays_the_default() -> None:
    seen, _ = momentum_at_each_step(TrainConfig(lr=0.01, scheduler="onecycle", epochs=2))
    assert seen == pytest.approx([0.9] * 6)


# --- a negative study seed ---------------------------------------------------------------------


def test_a_loader_with_a_negative_seed_mixes_reproducibly_and_apart_from_others() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    mixing = AugmentConfig(mix="mixup", mix_prob=1.0)

    def epoch(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(images, torch.arange(16) % 10, 8, CPU, mixing, seed=seed)
        return [targets for _, targets in loader]

    assert all(torch.equal(a, b) for a, b in zip(epoch(-7), epoch(-7), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch(-7), epoch(7), strict=True))


@pytest.mark.slow
def test_a_study_with_a_negative_seed_is_created_and_priced(
    hpo_env: dict[str, str], tmp_path: Path
) -> None:
    created = run_hpo(
        "create", "--study", "negative", "--trials", "3", "--space", "tiny",
        "--dataset", "synthetic", "--seed", "-7", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    assert "expected cost" in created.stdout and created.stderr == ""
    study = optuna.load_study(study_name="negative", storage=hpo_env["HPO_STORAGE"])
    assert StudySettings.from_dict(study.user_attrs[attrs.SETTINGS]).seed == -7


# --- the plateau watches the study's score -----------------------------------------------------


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_plateau_watches_the_validation_score_it_is_told(calibrated: bool) -> None:
    cfg = TrainConfig(lr=0.01, epochs=1, scheduler="plateau", label_smoothing=0.3)
    trainer = trainer_for(cfg, calibrated_score=calibrated)
    (stats,) = trainer.fit(batches(3), batches(2, seed=1))
    assert stats.val_calibrated_loss != pytest.approx(stats.val_loss, rel=1e-3)
    watched = stats.val_calibrated_loss if calibrated else stats.val_loss
    assert trainer.scheduler.best == watched  # the best value the plateau has seen


@pytest.mark.parametrize("val_score", VAL_SCORES)
def test_a_trials_plateau_watches_its_studys_score(
    val_score: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched: list[float] = []  # what each plateau step of the trial was given
    step = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def step_watching(scheduler: object, metrics: float) -> None:
        watched.append(metrics)
        step(scheduler, metrics)

    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", step_watching)
    settings = StudySettings.for_space(
        "tiny", epochs=2, dataset="synthetic", pruner="none", val_score=val_score
    )
    runner = TrialRunner(
        settings,
        search_data(load_dataset("synthetic", data_dir), "cpu"),
        DeviceRecipe.for_device("cpu"),
        WorkerInfo("test", "host", "cpu"),
        stop=threading.Event(),
    )
    study = optuna.create_study()
    study.enqueue_trial(
        {
            "backbones": 1, "blocks_0": 1, "layers_0": 1, "width_0_1": 8, "kernel_size": 3,
            "dropout": 0.0, "lr": 0.01, "weight_decay": 1e-4, "grad_clip": 0.1,
            "batch_size": 64, "scheduler": "plateau", "plateau_factor": 0.5,
            "plateau_patience": 1, "optimizer": "adamw", "label_smoothing": 0.2,
            "weight_averaging": False, "cutout": False, "mix": "none", "tta": "none",
        }
    )  # fmt: skip
    study.optimize(runner, n_trials=1)
    records = study.trials[0].user_attrs["epochs"]
    assert watched == [record["val_loss"] for record in records]  # the study's score
    if val_score == "calibrated_cross_entropy":
        assert watched != [record["val_cross_entropy"] for record in records]


# --- a shifted test view's border is black, as a training shift's ------------------------------


def test_a_shifted_test_view_has_the_black_border_of_a_training_shift() -> None:
    white = torch.full((32, 3, 16, 16), 255, dtype=torch.uint8)
    labels = torch.arange(32) % 10
    data = RunData(Labelled(white[:16], labels[:16]), Labelled(white[16:], labels[16:]))
    augment = AugmentConfig(crop_padding=1, flip=False, tta="flip_shift")
    cfg = TrialConfig(replace(TINY, dropout=0.0), TrainConfig(epochs=1, batch_size=16), augment)
    run = start_run(cfg, data, FP32, seed=0)
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    run.trainer.model.register_forward_pre_hook(
        lambda module, args: seen[module.training].append(args[0].clone())
    )
    list(run.trainer.fit(run.train, run.held_out))
    (trained,), (view, _, shifted, *_) = seen[True], seen[False]
    for channel in range(3):  # white inside, and where shifted, the border training fills
        assert trained[:, channel].unique().tolist() == shifted[:, channel].unique().tolist()
    assert torch.equal(shifted[..., -1:, :], run.held_out.black.expand(16, 3, 1, 16))
    assert torch.equal(shifted[..., :-1, :-1], view[..., 1:, 1:])  # moved a pixel up and left
