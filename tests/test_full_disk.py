"""`hpo compare` on a full disk (a real 64 KiB tmpfs, filled): the table is shown and attached,
the files the disk refused are named in one line, and the exit code is the machine's (75).
`hpo train`'s: tests/test_machine_faults.py."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import run_hpo
from test_dashboard import make_study
from test_machine_faults import fill, small_disk  # noqa: F401 (a fixture)

from search.rules import attrs
from search.rules.faults import EXIT_MACHINE_FAULT
from storage import open_storage


@pytest.mark.slow
def test_hpo_compare_on_a_full_disk_shows_and_attaches_its_table_then_exits_75(
    small_disk: Path,  # noqa: F811
    hpo_env: dict,
    tmp_path: Path,
) -> None:
    url = hpo_env["HPO_STORAGE"]
    make_study(url, "demo", complete=2, pruned=0, failed=0)  # the tiny space
    fill(small_disk)
    output = small_disk / "compare"
    result = run_hpo("compare", "--study", "demo", "--seeds", "1", "--epochs", "1",
                     "--output-dir", str(output), env=hpo_env, cwd=tmp_path)  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == EXIT_MACHINE_FAULT, said
    assert "Traceback" not in said and result.stderr.count("\n") == 1, result.stderr
    assert f"compare.md not written to {output}: No space left on device" in result.stdout
    assert "compare.md, compare.json not written in" in result.stderr
    assert "report/model-seed0.pt" in result.stderr  # every file the disk refused
    assert "baseline" in result.stdout  # the table was printed, its report row included
    study = optuna.load_study(study_name="demo", storage=open_storage(url))
    stored = study.user_attrs[attrs.COMPARE]
    assert [c["name"] for c in stored["configs"]][-1] == "report"
    assert stored["artifacts"] == {}  # no file to keep, the table kept all the same
