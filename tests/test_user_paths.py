"""An artifact folder that can never hold a checkpoint (a file, or a path through one) is the
user's mistake: `hpo start`, `hpo worker`, `hpo train` and `hpo compare` refuse it in one
line, exit 2, before anything is stored or trained, where a worker would otherwise run the
study without checkpoints."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import run_hpo, tiny_start

from search.rules.artifacts import ArtifactDirError, check_artifact_dir


def expect_refused(result, folder: Path) -> None:
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, said
    assert f"artifact folder {folder}" in result.stderr and "Traceback" not in said, said


def stored_trials(url: str) -> dict[str, int]:
    """Study name -> trials begun, read from the SQLite file ({} where there is none)."""
    path = Path(url.removeprefix("sqlite:///"))
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT study_name, (SELECT COUNT(*) FROM trials t"
            " WHERE t.study_id = s.study_id AND t.state != 'WAITING')"
            " FROM studies s"
        )
        return dict(rows.fetchall())


@pytest.mark.slow  # six `hpo` processes
def test_a_file_as_artifact_folder_is_refused_before_anything_is_stored(
    hpo_env: dict, tmp_path: Path
) -> None:
    def hpo(*args: str):
        return run_hpo(*args, env=hpo_env, cwd=tmp_path)

    typo = tmp_path / "artifacts.txt"
    typo.write_text("")
    through = typo / "checkpoints"
    url = hpo_env["HPO_STORAGE"]
    for folder in (typo, through):
        expect_refused(hpo(*tiny_start("s", 2, "--artifact-dir", str(folder))), folder)
        assert stored_trials(url) == {}
    # The environment's folder is the same flag.
    env = {**hpo_env, "HPO_ARTIFACT_DIR": str(typo)}
    expect_refused(run_hpo(*tiny_start("s", 2), env=env, cwd=tmp_path), typo)
    assert stored_trials(url) == {}

    created = hpo("create", "--study", "s", "--trials", "2", "--space", "tiny",
                  "--dataset", "synthetic", "--epochs", "1")  # fmt: skip
    assert created.returncode == 0, created.stderr
    before = stored_trials(url)
    expect_refused(hpo("worker", "--study", "s", "--artifact-dir", str(through)), through)
    assert stored_trials(url) == before  # no trial started

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {channels: [[3, 8]], blocks: [1]}\n")
    output = tmp_path / "final"
    train = ("train", "--config", str(config), "--dataset", "synthetic", "--epochs", "1",
             "--output-dir", str(output), "--artifact-dir", str(typo))  # fmt: skip
    expect_refused(hpo(*train), typo)
    assert not output.exists()  # refused before it trained
    compare = ("compare", "--study", "s", "--output-dir", str(output), "--artifact-dir", str(typo))
    expect_refused(hpo(*compare), typo)
    assert not output.exists()


def test_a_folder_yet_to_be_made_is_fine_and_one_not_writable_is_refused(tmp_path: Path) -> None:
    assert check_artifact_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not made: a worker makes it
    # /proc/self is not a folder anyone may create files in, root included.
    with pytest.raises(ArtifactDirError, match="not writable"):
        check_artifact_dir(Path("/proc/self/artifacts"))
