"""Each searched knob does what its name says (issue 37): SGD's momentum under onecycle, a
negative study seed, the plateau's notion of a worse epoch, the border of a shifted view."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_hpo
from test_trainer import batches, trainer_for

from data.augment_config import AugmentConfig
from data.loader import DeviceLoader
from search.rules import attrs
from search.rules.config import TrainConfig
from search.rules.settings import StudySettings

CPU = torch.device("cpu")

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
