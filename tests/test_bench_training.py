"""The benches that train, each at its smallest size (see tests/test_bench.py, which runs the
others): a file of their own so that pytest-xdist runs them beside the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_bench
from test_bench import ROOT, TRAINING, assert_runs_at_its_smallest_size

scratch = test_bench.scratch  # the fixture, found by name here


@pytest.mark.parametrize("name", TRAINING)
def test_training_bench_runs_at_its_smallest_size(name: str, scratch: Path) -> None:
    assert_runs_at_its_smallest_size(ROOT / "bench" / name, scratch)
