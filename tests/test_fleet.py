"""`--gpus` on the GPUs of the job: a scheduler's CUDA_VISIBLE_DEVICES, real child workers.

The GPU count is the one stub: `visible_gpu_count`, where torch is asked, says 2 on this
CPU machine. The children are real `hpo worker` processes (they train on the CPU here).
"""

from __future__ import annotations

import io
import re
import signal
import socket
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from typer.testing import CliRunner

from search.cli import app
from search.commands.fleet import WorkerOptions
from search.commands.launch import StudyRequest, create_study, run_workers, this_worker
from search.commands.progress import SearchProgress
from search.rules.study import claim_trial
from search.training import devices
from search.training.devices import GpuSpecError, gpu_names, parse_gpus
from storage import open_storage

UUIDS = "GPU-0aa1c6e4-5b2f-4a3b-9c1d-111111111111,MIG-7f0e2d44-8c6a-5e1b-a2d3-222222222222"


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "visible_gpu_count", lambda: 2)


@pytest.mark.parametrize("visible", ["2,3", UUIDS])
def test_gpus_index_into_the_jobs_devices(
    visible: str, two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    names = visible.split(",")
    assert gpu_names(parse_gpus("all")) == names
    assert gpu_names(parse_gpus("1")) == names[1:]
    assert gpu_names(parse_gpus("1,0")) == [names[1], names[0]]


def test_without_cuda_visible_devices_the_gpus_are_numbered(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_names(parse_gpus("all")) == ["0", "1"]


def test_a_gpu_the_job_lacks_is_one_line_and_exit_2(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(GpuSpecError, match="may use 2 GPU"):
        parse_gpus("2")
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = CliRunner().invoke(
        app, ["start", "--study", "s", "--trials", "2", "--storage", url, "--gpus", "5"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--gpus 5" in lines[0] and "CUDA_VISIBLE_DEVICES=2,3" in lines[0]
    assert not (tmp_path / "hpo.db").exists()  # refused before anything was stored


@pytest.mark.slow
@pytest.mark.parametrize(("visible", "spec"), [("2,3", "all"), (UUIDS, "1")])
def test_each_child_worker_gets_its_gpus_name(
    visible: str, spec: str, two_gpus: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    out = io.StringIO()
    progress = SearchProgress(Console(file=out, width=400))
    settings = create_study(StudyRequest("job", 1, url, space="tiny", epochs=1), progress)
    # The target is met: each child joins, names itself and exits without training.
    study = optuna.load_study(study_name="job", storage=open_storage(url))
    study.tell(claim_trial(study), 1.0)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = run_workers("job", url, settings, WorkerOptions(gpus=spec), progress)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 0, out.getvalue()
    expected = visible.split(",") if spec == "all" else visible.split(",")[1:]
    # What each child read from its own environment; CUDA sees no GPU here, so each child
    # names itself by the CPU it trains on and says which GPU it was given.
    given = r"\| worker [^/]+/cpu/slot\d+ joined .*\(CUDA_VISIBLE_DEVICES=(\S+): no GPU visible\)"
    joined = re.findall(given, out.getvalue())
    assert sorted(joined) == sorted(expected), out.getvalue()


@pytest.mark.parametrize(
    ("visible", "count", "device"),
    [
        ("NoDevFiles", 0, "cpu"),  # Slurm, no GPU allocated
        ("-1", 0, "cpu"),
        (None, 0, "cpu"),
        (None, 1, "gpu0"),
        ("2,3", 2, "gpu2"),  # the first: the one `cuda` means
        (UUIDS, 2, "gpuGPU-0aa1c6e4-5b2f-4a3b-9c1d-111111111111"),
        ("gpu a/b", 1, "gpugpu_a_b"),
    ],
)
def test_a_worker_is_named_by_the_device_it_trains_on(
    visible: str | None, count: int, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "visible_gpu_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    worker = this_worker(slot=3)
    host, name, slot = worker.name.split("/")
    assert (host, name, slot) == (socket.gethostname(), device, "slot3")
    assert worker.gpu == device.removeprefix("gpu")
