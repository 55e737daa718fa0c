"""The recipe levers (issue 30): each does what it says, only where it says, and the score
stays fair: the trial value is cross-entropy on the true labels, blind to a temperature."""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_hpo
from test_trainer import TINY, batches

from data.augment import cutout_batch, evaluation_views, mix_batch
from data.augment_config import AugmentConfig
from data.dataset import load_dataset
from data.loader import DeviceLoader, Labelled, RunData, final_data, search_data
from model.network import build_model
from search.rules import attrs
from search.rules.config import TrainConfig, TrialConfig
from search.rules.settings import StudySettings
from search.rules.space import (
    DEFAULT_SPACE,
    TINY_SPACE,
    SearchSpace,
    config_from_params,
    load_space,
    report_table1_params,
    sample_config,
)
from search.rules.study import create_or_join
from search.training.final import train_seed
from search.training.objective import TrialRunner, WorkerInfo
from search.training.recipe import calibrated_cross_entropy
from search.training.run import start_run
from search.training.trainer import DeviceRecipe, Trainer
from storage import open_storage

CPU = torch.device("cpu")
# fp32: compared with sums done by hand, without bf16 rounding in between.
FP32 = DeviceRecipe(device=CPU, autocast_dtype=None, memory_format=torch.contiguous_format)
NO_DROPOUT = replace(TINY, dropout=0.0)
PLAIN = AugmentConfig(crop_padding=0, flip=False)


def trainer_for(cfg: TrainConfig, seed: int = 0, **options: object) -> Trainer:
    torch.manual_seed(seed)
    return Trainer(build_model(NO_DROPOUT), cfg, 3, FP32, **options)


def by_hand(model: torch.nn.Module, data: list) -> float:
    """Mean cross-entropy of `model` over `data`, in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data])
    return F.cross_entropy(logits, torch.cat([y for _, y in data])).item()


# --- the training loss and the optimizer ------------------------------------------------------


def test_label_smoothing_reaches_the_training_loss() -> None:
    x, y = batches(1)[0]
    losses = []
    for smoothing in (0.0, 0.2):
        trainer = trainer_for(TrainConfig(epochs=1, label_smoothing=smoothing))
        expected = F.cross_entropy(copy.deepcopy(trainer.model)(x), y, label_smoothing=smoothing)
        (stats,) = trainer.fit([(x, y)], None)
        assert stats.train_loss == pytest.approx(expected.item(), rel=1e-5)
        losses.append(stats.train_loss)
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_sgd_with_nesterov_momentum_is_what_steps() -> None:
    cfg = TrainConfig(
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, grad_clip=0.0, epochs=1,
        scheduler="constant",
    )  # fmt: skip
    trainer = trainer_for(cfg)
    reference = copy.deepcopy(trainer.model)
    sgd = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3
    )
    data = batches(3)
    for x, y in data:  # three steps: the momentum buffer carries two of them
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    list(trainer.fit(data, None))
    for (name, got), want in zip(
        trainer.model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-6), name


# --- the average of the weights ---------------------------------------------------------------


def test_the_average_of_the_weights_is_what_is_validated() -> None:
    trainer = trainer_for(TrainConfig(epochs=1, lr=0.05, ema_decay=0.9, scheduler="constant"))
    val, initial = batches(2, seed=1), copy.deepcopy(trainer.model)
    (stats,) = trainer.fit(batches(3), val)
    averaged, live = by_hand(trainer.average.module, val), by_hand(trainer.model, val)
    assert stats.val_loss == pytest.approx(averaged, rel=1e-5)
    # Neither the live weights nor the initial ones (an average never updated).
    assert averaged != pytest.approx(live, rel=1e-3)
    assert averaged != pytest.approx(by_hand(initial, val), rel=1e-3)


def test_the_average_follows_the_live_weights_after_each_step_with_its_warm_up() -> None:
    trainer = trainer_for(TrainConfig(epochs=2, lr=0.05, ema_decay=0.9, scheduler="constant"))
    initial = copy.deepcopy(trainer.model.state_dict())
    expected, decays = copy.deepcopy(initial), []

    def average_by_hand(optimizer: object, *_: object) -> None:
        """After each step: decay min(0.9, (1 + n) / (10 + n)) after n updates; integer
        buffers (BatchNorm's count) copied."""
        decay = min(0.9, (1 + len(decays)) / (10 + len(decays)))
        for name, live in trainer.model.state_dict().items():
            averaged = expected[name]
            expected[name] = averaged.lerp(live, 1 - decay) if live.is_floating_point() else live
        decays.append(decay)

    trainer.optimizer.register_step_post_hook(average_by_hand)
    list(trainer.fit(batches(3), None))
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15])
    averaged = trainer.average.module.state_dict()
    for name, value in expected.items():
        assert torch.allclose(averaged[name], value, atol=1e-6), name
        if value.is_floating_point():
            assert not torch.allclose(averaged[name], initial[name]), name  # it moved


def test_the_average_of_the_weights_is_what_is_exported_and_tested(
    data_dir: Path, tmp_path: Path
) -> None:
    images = load_dataset("synthetic", data_dir)
    model = replace(NO_DROPOUT, image_size=32)
    runs, weights = {}, {}
    for decay in (0.0, 0.9):
        train = TrainConfig(epochs=1, batch_size=64, lr=0.05, scheduler="constant", ema_decay=decay)
        cfg = TrialConfig(model=model, train=train, augment=PLAIN)
        (tmp_path / str(decay)).mkdir()
        runs[decay] = train_seed(cfg, images, FP32, 0, tmp_path / str(decay), lambda _: None)
        saved = torch.load(tmp_path / str(decay) / runs[decay]["weights"], weights_only=True)
        weights[decay] = saved["state_dict"]
    # Both runs train the same live weights (the average draws no random numbers): what the
    # averaged run saved is its average.
    assert any(not torch.equal(weights[0.0][k], weights[0.9][k]) for k in weights[0.0])
    exported = build_model(model)
    exported.load_state_dict(weights[0.9])
    _, test = final_data(images, CPU).loaders(64, None)  # normalised as the run tested it
    assert by_hand(exported, list(test)) == pytest.approx(runs[0.9]["test_loss"], rel=1e-5)


# --- what the model sees: cutout and mixing in training only, test-time views in evaluation --


def inputs_seen(augment: AugmentConfig) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """The inputs the model is called with in one epoch of training and its validation."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (48,), generator=generator)
    data = RunData(Labelled(images[:32], labels[:32]), Labelled(images[32:], labels[32:]))
    cfg = TrialConfig(NO_DROPOUT, TrainConfig(epochs=1, batch_size=16), augment)
    run = start_run(cfg, data, FP32, seed=0)
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    run.trainer.model.register_forward_pre_hook(
        lambda module, args: seen[module.training].append(args[0].clone())
    )
    (stats,) = run.trainer.fit(run.train, run.held_out)
    return seen[True], seen[False], stats


@pytest.mark.parametrize(
    "lever",
    [
        {"cutout_size": 8, "cutout_prob": 1.0},
        {"mix": "mixup", "mix_alpha": 1.0, "mix_prob": 1.0},
        {"mix": "cutmix", "mix_alpha": 1.0, "mix_prob": 1.0},
    ],
    ids=["cutout", "mixup", "cutmix"],
)
def test_cutout_and_mixing_change_the_training_batch_only(lever: dict) -> None:
    train, evaluated, _ = inputs_seen(PLAIN)
    train_on, evaluated_on, _ = inputs_seen(replace(PLAIN, **lever))
    assert all(not torch.equal(a, b) for a, b in zip(train, train_on, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(evaluated, evaluated_on, strict=True))


@pytest.mark.parametrize(("tta", "views"), [("flip", 2), ("flip_shift", 6)])
def test_test_time_views_change_evaluation_only(tta: str, views: int) -> None:
    train, evaluated, stats = inputs_seen(PLAIN)
    train_tta, evaluated_tta, stats_tta = inputs_seen(replace(PLAIN, tta=tta))
    assert all(torch.equal(a, b) for a, b in zip(train, train_tta, strict=True))
    assert stats_tta.train_loss == stats.train_loss
    assert len(evaluated_tta) == views * len(evaluated)
    assert torch.equal(evaluated_tta[0], evaluated[0])
    assert torch.equal(evaluated_tta[1], evaluated[0].flip(-1))  # the mirror of the batch
    assert stats_tta.val_loss != pytest.approx(stats.val_loss, rel=1e-4)


def test_cutout_blacks_out_one_square_per_image_at_its_probability() -> None:
    x = torch.ones(64, 3, 32, 32)
    cut = cutout_batch(x, 8, 1.0, torch.Generator().manual_seed(0))
    blacked = (cut == 0).all(dim=1).sum(dim=(1, 2))  # pixels per image
    assert ((blacked >= 16) & (blacked <= 64)).all()  # a square, clipped at most to its quarter
    assert (blacked == 64).float().mean() > 0.3
    assert torch.equal(cutout_batch(x, 8, 0.0, torch.Generator().manual_seed(0)), x)
    half = cutout_batch(x, 8, 0.5, torch.Generator().manual_seed(0))
    assert 10 < (half == 0).flatten(1).any(dim=1).sum() < 54


def mixed_batches(mix: str, seeds: int = 5) -> list[tuple[torch.Tensor, ...]]:
    """(images, mixed images, targets) of a batch mixed with each seed: 32 random images, each
    its own class, so a target's share of a class is the share of the image of that class."""
    x, y = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32)
    cfg = AugmentConfig(mix=mix, mix_alpha=1.0, mix_prob=1.0)
    out = []
    for seed in range(seeds):
        generator, weights = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        out.append((x, *mix_batch(x, y, cfg, 32, generator, weights)))
    return out


def test_mixing_blends_images_and_labels_alike() -> None:
    for x, mixed, targets in mixed_batches("mixup"):
        for i in range(32):
            # mixed[i] = x[i] + t (x[j] - x[i]) for its partner j: t, the partner's weight, is
            # fitted for every candidate j; the partner is the one the blend fits exactly.
            towards, moved = (x - x[i]).flatten(1), (mixed[i] - x[i]).flatten()
            t = towards @ moved / towards.square().sum(1).clamp(min=1e-12)
            j = int((towards * t.view(-1, 1) - moved).norm(dim=1).argmin())
            expected = torch.zeros(32)  # image i is class i
            expected[i] += 1 - t[j]
            expected[j] += t[j]
            assert torch.allclose(targets[i], expected, atol=1e-5)
    x, y = torch.rand(32, 3, 8, 8), torch.arange(32) % 10
    off = AugmentConfig(mix="mixup", mix_prob=0.0)
    same, onehot = mix_batch(x, y, off, 10, torch.Generator(), np.random.default_rng(0))
    assert torch.equal(same, x) and torch.equal(onehot, F.one_hot(y, 10).float())


def test_cutmix_weighs_each_label_by_the_area_actually_pasted() -> None:
    areas = set()
    for x, mixed, targets in mixed_batches("cutmix", seeds=8):
        pasted = (mixed != x).any(dim=1)  # (32, H, W): where the partner shows
        for i in range(32):
            area = pasted[i].float().mean().item()  # the box as pasted, clipped at the border
            inside = mixed[i][:, pasted[i]]
            j = next(j for j in range(32) if torch.equal(x[j][:, pasted[i]], inside))
            expected = torch.zeros(32)  # image i is class i
            expected[i] += 1 - area
            expected[j] += area
            assert torch.allclose(targets[i], expected, atol=1e-6)
            areas.add(round(area, 4))
    assert len(areas) > 3  # boxes of several sizes


def test_a_mixing_loader_yields_label_probabilities() -> None:
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    loader = DeviceLoader(
        images, labels, 16, CPU, AugmentConfig(mix="cutmix", mix_prob=1.0), shuffle=True
    )
    for _, targets in loader:
        assert targets.dtype == torch.float32 and targets.shape == (16, 10)


def test_evaluation_views_are_the_image_its_mirror_and_both_shifted() -> None:
    x, black = torch.rand(2, 3, 8, 8), -torch.rand(1, 3, 1, 1)
    views = evaluation_views(x, "flip_shift", black)
    assert len(views) == 6 and torch.equal(views[1], x.flip(-1))
    assert torch.equal(views[2][..., :-1, :-1], x[..., 1:, 1:])  # a pixel up and left
    assert torch.equal(views[4][..., 1:, 1:], x[..., :-1, :-1])  # a pixel down and right
    assert evaluation_views(x, "none", black) == [x]


# --- a fair score ----------------------------------------------------------------------------


def test_logits_that_differ_by_a_temperature_score_the_same() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=generator)
    logits = torch.randn(500, 10, generator=generator)
    logits[torch.arange(500), labels] += 2.0
    base, temperature = calibrated_cross_entropy(logits, labels)
    assert base < F.cross_entropy(logits, labels).item()
    for scale in (0.2, 5.0):  # as label smoothing (less confident) or none (more) would give
        scaled, fitted = calibrated_cross_entropy(logits * scale, labels)
        assert scaled == pytest.approx(base, rel=1e-6)
        # float32 losses know a flat minimum's place to about sqrt(eps), not its value
        assert fitted == pytest.approx(temperature * scale, rel=1e-3)
        assert F.cross_entropy(logits * scale, labels).item() != pytest.approx(base, rel=1e-2)


def test_two_models_a_temperature_apart_score_the_same_in_a_trial() -> None:
    trainer = trainer_for(TrainConfig())
    val = batches(4, seed=1)
    cooler = trainer_for(TrainConfig())
    with torch.no_grad():  # logits times 3: the same ranking, more confident
        cooler.model.classifier.weight.mul_(3)
        cooler.model.classifier.bias.mul_(3)
    one, other = trainer.evaluation(val), cooler.evaluation(val)
    assert one.calibrated_loss == pytest.approx(other.calibrated_loss, rel=1e-5)
    assert one.loss != pytest.approx(other.loss, rel=1e-2) and one.acc == other.acc


@pytest.mark.parametrize("stored", [None, "cross_entropy", "calibrated_cross_entropy"])
def test_the_trial_value_and_the_pruner_read_the_studys_score(
    stored: str | None, data_dir: Path
) -> None:
    settings = StudySettings.for_space("tiny", epochs=2, dataset="synthetic", pruner="none")
    raw = settings.to_dict()
    raw.pop("val_score") if stored is None else raw.update(val_score=stored)
    settings = StudySettings.from_dict(raw)  # a study stored before the setting: plain CE
    runner = TrialRunner(
        settings,
        search_data(load_dataset("synthetic", data_dir), "cpu"),
        DeviceRecipe.for_device("cpu"),
        WorkerInfo("test", "host", "cpu"),
        stop=threading.Event(),
    )
    study = optuna.create_study()
    study.enqueue_trial(_tiny_params(label_smoothing=0.2))
    study.optimize(runner, n_trials=1)
    (trial,) = study.trials
    records = trial.user_attrs["epochs"]
    calibrated = stored == "calibrated_cross_entropy"
    assert settings.calibrated == calibrated
    assert trial.value == records[-1]["val_loss"]
    assert list(trial.intermediate_values.values()) == [r["val_loss"] for r in records]
    for record in records:
        plain = record["val_cross_entropy"]
        assert (record["val_loss"] < plain) if calibrated else (record["val_loss"] == plain)


def _tiny_params(**levers: object) -> dict:
    base = {
        "backbones": 1, "blocks_0": 1, "layers_0": 1, "width_0_1": 8, "kernel_size": 3,
        "dropout": 0.0, "lr": 0.01, "weight_decay": 1e-4, "grad_clip": 0.1, "batch_size": 64,
        "scheduler": "constant", "optimizer": "adamw", "label_smoothing": 0.0,
        "weight_averaging": False, "cutout": False, "mix": "none", "tta": "none",
    }  # fmt: skip
    return {**base, **levers}


def test_a_new_study_scores_at_a_fitted_temperature_an_old_one_as_before() -> None:
    assert StudySettings.for_space("tiny").val_score == "calibrated_cross_entropy"
    old = StudySettings.for_space("tiny").to_dict()
    del old["val_score"]
    assert StudySettings.from_dict(old).val_score == "cross_entropy"


# --- the space -------------------------------------------------------------------------------

SWITCHES = ("optimizer", "label_smoothing", "weight_averaging", "cutout", "mix", "tta")
CONDITIONAL = ("sgd_lr", "momentum", "ema_decay", "cutout_size", "cutout_prob", "mix_alpha")


def test_the_report_trial_of_the_default_space_has_every_lever_off() -> None:
    cfg = config_from_params(report_table1_params(), DEFAULT_SPACE, 20)
    knobs = ("optimizer", "momentum", "label_smoothing", "ema_decay")
    assert [getattr(cfg.train, k) for k in knobs] == [getattr(TrainConfig(), k) for k in knobs]
    off = AugmentConfig()
    assert (cfg.augment.cutout_size, cfg.augment.mix, cfg.augment.tta) == (
        off.cutout_size,
        off.mix,
        off.tta,
    )
    assert cfg.train.optimizer == "adamw" and cfg.train.ema_decay == 0.0


def test_the_tiny_space_draws_every_lever_each_conditional_on_its_switch() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn: set[str] = set()
    for _ in range(40):
        trial = study.ask()
        cfg = sample_config(trial, TINY_SPACE, 2)
        drawn |= set(trial.params)
        assert ("momentum" in trial.params) == (cfg.train.optimizer == "sgd")
        assert ("ema_decay" in trial.params) == (cfg.train.ema_decay > 0)
        assert ("cutout_size" in trial.params) == (cfg.augment.cutout_size > 0)
        assert ("mix_alpha" in trial.params) == (cfg.augment.mix != "none")
        study.tell(trial, 1.0)
    assert set(SWITCHES) | set(CONDITIONAL) <= drawn


def test_a_yaml_space_fixes_or_drops_each_lever(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    fixed = {"optimizers": ["sgd"], "label_smoothing": [0.1, 0.1], "weight_averaging": [False]}
    path.write_text(yaml.safe_dump({"base": "tiny", **fixed, "mixes": ["none"], "tta": ["flip"]}))
    space = load_space(str(path))
    study = optuna.create_study()
    trial = study.ask()
    cfg = sample_config(trial, space, 2)
    assert not {"optimizer", "label_smoothing", "weight_averaging", "mix", "tta"} & set(
        trial.params
    )
    assert (cfg.train.optimizer, cfg.train.label_smoothing, cfg.train.ema_decay) == ("sgd", 0.1, 0)
    assert (cfg.augment.mix, cfg.augment.tta) == ("none", "flip")
    assert "sgd_lr" in trial.params and "cutout" in trial.params


def test_a_space_stored_before_the_levers_keeps_them_off() -> None:
    stored = DEFAULT_SPACE.to_dict()
    for key in ("optimizers", "label_smoothing", "weight_averaging", "cutout", "mixes", "tta"):
        del stored[key]
    space = SearchSpace.from_dict(stored)
    trial = optuna.create_study().ask()
    cfg = sample_config(trial, space, 2)
    assert not set(SWITCHES) & set(trial.params)
    assert cfg.train == replace(cfg.train, optimizer="adamw", label_smoothing=0.0, ema_decay=0.0)
    assert (cfg.augment.cutout_size, cfg.augment.mix, cfg.augment.tta) == (0, "none", "none")


def test_a_config_written_before_the_levers_loads_with_them_off() -> None:
    old = {
        "model": {"channels": [[3, 8]], "blocks": [1]},
        "train": {"lr": 0.01},
        "augment": {"crop_padding": 2, "flip": True, "rotation_degrees": 0.0},
    }
    cfg = TrialConfig.from_dict(old)
    assert (cfg.train.optimizer, cfg.train.ema_decay, cfg.augment.tta) == ("adamw", 0.0, "none")


# --- end to end, with real `hpo` processes -----------------------------------------------------

ALL_ON = _tiny_params(
    optimizer="sgd", sgd_lr=0.05, momentum=0.9, label_smoothing=0.1, weight_averaging=True,
    ema_decay=0.95, cutout=True, cutout_size=4, cutout_prob=0.5, mix="cutmix", mix_alpha=0.5,
    mix_prob=0.5, tta="flip_shift",
)  # fmt: skip
ALL_ON.pop("lr")


@pytest.mark.slow
def test_a_trial_with_every_lever_on_completes_exports_trains_and_compares(
    hpo_env: dict, tmp_path: Path
) -> None:
    url = hpo_env["HPO_STORAGE"]
    drawn = run_hpo(
        "start", "--study", "drawn", "--space", "tiny", "--dataset", "synthetic",
        "--trials", "2", "--epochs", "1", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stdout + drawn.stderr
    for trial in optuna.load_study(study_name="drawn", storage=open_storage(url)).trials:
        assert set(SWITCHES) <= set(trial.params), trial.params

    settings = StudySettings.for_space("tiny", epochs=1, dataset="synthetic", pruner="none")
    create_or_join(open_storage(url), "levers", settings, 0)
    study = optuna.load_study(study_name="levers", storage=open_storage(url))
    study.enqueue_trial(ALL_ON)
    study.set_user_attr(attrs.TARGET, 1)
    worker = run_hpo("worker", "--study", "levers", env=hpo_env, cwd=tmp_path)
    assert worker.returncode == 0, worker.stdout + worker.stderr

    best = run_hpo("best", "--study", "levers", "-o", "best.yaml", env=hpo_env, cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    want = config_from_params(ALL_ON, settings.search_space(), 1).to_dict()
    for section in ("train", "augment"):
        for key, value in want[section].items():
            if key != "lr_by_epoch":
                assert exported[section][key] == value, (section, key)

    trained = run_hpo(
        "train", "--config", "best.yaml", "--dataset", "synthetic", "--epochs", "1",
        "--seeds", "2", "--output-dir", "final", env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert len(metrics["seeds"]) == 2 and metrics["config"]["augment"] == want["augment"]

    compared = run_hpo(
        "compare", "--study", "levers", "--seeds", "1", "--epochs", "1", "--top", "1",
        env=hpo_env, cwd=tmp_path,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout + compared.stderr
    out = tmp_path / "runs" / "compare"
    report = json.loads((out / "report" / "metrics.json").read_text())["config"]
    assert (report["train"]["optimizer"], report["train"]["ema_decay"]) == ("adamw", 0.0)
    assert (report["augment"]["mix"], report["augment"]["tta"]) == ("none", "none")
    assert report["augment"]["cutout_size"] == 0 and report["train"]["label_smoothing"] == 0
    levers = json.loads((out / "trial-0" / "metrics.json").read_text())["config"]
    assert levers["augment"] == want["augment"]
