"""Search spaces: every sampled config builds and runs; files override ranges; configs export."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from model.config import REPORT_TABLE1
from model.flops import train_flops_per_image
from model.network import build_model
from search.rules.config import ConfigError, TrialConfig, load_config_file
from search.rules.space import (
    BUILTIN_SPACES,
    MAX_POOLINGS,
    SpaceError,
    load_space,
    report_table1_params,
    sample_config,
)


def sampled_configs(space_name: str, count: int) -> list[TrialConfig]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = BUILTIN_SPACES[space_name]
    configs = []
    for _ in range(count):
        trial = study.ask()
        configs.append(sample_config(trial, space, epochs=4))
        study.tell(trial, 1.0)
    return configs


@pytest.mark.slow
def test_tiny_configs_build_and_run_a_forward_pass() -> None:
    for cfg in sampled_configs("tiny", 25):
        logits = build_model(cfg.model)(torch.rand(2, 3, 32, 32))
        assert logits.shape == (2, 10)


def test_default_configs_build_and_run_a_forward_pass_on_the_meta_device() -> None:
    # GPU-sized models: shapes are checked on the meta device, which computes nothing.
    configs = sampled_configs("default", 60)
    for cfg in configs:
        with torch.device("meta"):
            logits = build_model(cfg.model)(torch.empty(2, 3, 32, 32))
        assert logits.shape == (2, 10)
        assert sum(len(chain) - 1 for chain in cfg.model.channels) <= MAX_POOLINGS
    widths = [w for cfg in configs for chain in cfg.model.channels for w in chain[1:]]
    low, high = BUILTIN_SPACES["default"].width
    assert low <= min(widths) and max(widths) <= high
    # Log scale: about half the widths under the range's geometric middle (uniform: 15%).
    assert 0.35 < sum(w < math.sqrt(low * high) for w in widths) / len(widths) < 0.65
    schedulers = {cfg.train.scheduler for cfg in configs}
    assert schedulers == {"plateau", "onecycle", "cosine", "step", "constant"}
    assert {cfg.model.n_backbones for cfg in configs} == {1, 2, 3}


@pytest.mark.filterwarnings("error")  # e.g. Optuna's "Fixed parameter ... is out of range"
def test_the_first_trial_of_a_default_study_is_table1_inside_the_space() -> None:
    study = optuna.create_study()
    study.enqueue_trial(report_table1_params())
    space = BUILTIN_SPACES["default"]
    cfg = sample_config(study.ask(), space, epochs=90)
    assert cfg.model == REPORT_TABLE1
    assert train_flops_per_image(cfg.model) / 1e9 <= space.max_gflops
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-3, 1e-4, 0.1)
    assert cfg.train.scheduler == "plateau"


def test_a_space_file_overrides_ranges_of_its_base(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("base: tiny\nwidth: [8, 8]\nschedulers: [cosine]\naugment: {flip: false}\n")
    space = load_space(str(path))
    assert space.width == (8, 8) and space.schedulers == ("cosine",)
    assert space.backbones == BUILTIN_SPACES["tiny"].backbones
    assert not space.augment.flip and space.augment.crop_padding == 2


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("width: [8]\n", "width"),
        ("lr: [0, 0.1]\n", "lr"),
        ("dropout: [0.2, 1.5]\n", "dropout"),
        ("schedulers: [warp]\n", "schedulers"),
        ("backbones: [3, 3]\nlayers: [2, 3]\n", "layers"),
        ("batch_size: 64\n", "batch_size"),
        ("base: huge\n", "base"),
        ("colour: [1, 2]\n", "colour"),
        ("width: [a, b\n", "not valid YAML"),
        ("max_gflops: 0.0001\n", "max_gflops: 0.0001 is below the cheapest network"),
        ("max_gflops: -1\n", "max_gflops"),
        ("max_gflops: [1]\n", "max_gflops"),
        ("width_step: 0\n", "width_step"),
    ],
)
def test_a_bad_space_file_names_the_problem(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=named):
        load_space(str(path))


def test_exported_config_round_trips_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    cfg = sampled_configs("tiny", 1)[0]
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "metrics": {"val_loss": 1.0}}))
    assert load_config_file(path)[0] == cfg

    broken = {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "scheduler": "warp"}}
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(ConfigError, match="train.scheduler"):
        load_config_file(path)
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "extra": 1}))
    with pytest.raises(ConfigError, match="extra"):
        load_config_file(path)
