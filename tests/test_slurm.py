"""docker/slurm/worker.sbatch on a real Slurm: a one-node cluster the tests start themselves.

munged, slurmctld and slurmd (Debian's munge and slurm-wlm) run as children of pytest on
free localhost ports, with their config, key and state in a temporary folder that SLURM_CONF
points at. gres.conf gives the node four GPUs whose File= are device nodes made for the test;
no cgroup plugin constrains them, so Slurm hands them out and sets CUDA_VISIBLE_DEVICES per
task as on a GPU node, while training runs on the CPU. Jobs are submitted from a folder whose
`.venv` is the venv running these tests, as the sbatch file expects of the repository root.
Skipped where Slurm is missing or we are not root, except in CI (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import optuna
import pytest
from conftest import run_hpo
from optuna.trial import FrozenTrial, TrialState
from servers import IN_CI, _missing, free_port, server_url
from test_workers import MICRO_SPACE

from search.rules import attrs
from search.rules.study import budget, claim_trial
from storage import open_storage

# A cluster of its own and real jobs (tens of seconds each): the quick tier leaves them out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "docker" / "slurm" / "worker.sbatch"
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "squeue")
GPUS = 4
NODE = "node0"
# Epochs enough that a trial seen at its first checkpoint is still training when SIGTERM lands.
EPOCHS = 10
TRIALS = 6
# The submitting shell's CUDA_VISIBLE_DEVICES: a worker that names it did not get Slurm's.
SUBMIT_HOST_GPUS = "submit-host"
# The one stub: without a CUDA driver torch counts no GPU, so a worker counts the names Slurm
# gave its task instead, as CUDA would see them on a GPU node (a worker's name and `--gpus
# all`); training still runs on the CPU. Loaded by every Python of a job through PYTHONPATH.
GPU_COUNT_STUB = """import os
from search.training import devices
devices.visible_gpu_count = lambda: len(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
"""


def slurm_conf(root: Path, munge_socket: Path) -> str:
    """One node of 16 CPUs and 4 GPUs (config_overrides: more than the hardware has, so the
    sbatch file's own --cpus-per-task and --mem fit four tasks at once on a small machine)."""
    return f"""ClusterName=hpotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
MpiDefault=none
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
NodeName={NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=16 RealMemory=65536 \
Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=main Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    conf: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": str(self.conf), "PATH": f"{base['PATH']}:{SBIN}"}

    def run(self, *command: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        result = subprocess.run(
            command, env=env or self.env(dict(os.environ)), cwd=cwd,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        return result.stdout

    def submit(self, *args: str, env: dict[str, str], cwd: Path) -> str:
        """sbatch in `env` (made by self.env) from `cwd`; the job's id."""
        return self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).strip().split(";")[0]

    def jobs(self, job: str) -> list[dict[str, str]]:
        """Each record of `job` (one per array task) as scontrol's KEY=VALUE fields."""
        lines = self.run("scontrol", "--oneliner", "show", "job", "--details", job).splitlines()
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines if line.strip()]

    def wait_for(self, job: str, states: set[str], timeout: float = 240) -> list[dict[str, str]]:
        """The job's records once every one of them is in one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job)
            if all(record["JobState"] in states for record in records):
                return records
            assert time.monotonic() < deadline, records
            time.sleep(0.2)

    def wait_ended(self, job: str) -> list[dict[str, str]]:
        return self.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job (the cluster is ours) and wait until none is left running."""
        self.run("scancel", "--full", "--user=root")
        deadline = time.monotonic() + timeout
        while self.run("squeue", "--noheader") and time.monotonic() < deadline:
            time.sleep(0.2)

    def task_of(self, pid: int) -> dict[str, str]:
        """The record of the job Slurm runs process `pid` in (its own account, by job id)."""
        for line in self.run("scontrol", "listpids").splitlines()[1:]:
            fields = line.split()
            if fields[0] == str(pid):
                # An array's id is also one of its tasks' job ids: pick that task's record.
                (task,) = [job for job in self.jobs(fields[1]) if job["JobId"] == fields[1]]
                return task
        raise AssertionError(f"process {pid} is in no Slurm job")


def wait_until_up(cluster: Cluster, daemons: list[subprocess.Popen], logs: Path) -> None:
    """Until slurmd has registered and the node is idle (the daemons' logs if it never does)."""
    deadline = time.monotonic() + 60
    while True:
        shown = subprocess.run(
            ["sinfo", "--noheader", "--format=%t"], env=cluster.env(dict(os.environ)),
            capture_output=True, text=True,
        )  # fmt: skip
        if shown.stdout.strip() == "idle":
            return
        alive = all(daemon.poll() is None for daemon in daemons)
        if not alive or time.monotonic() > deadline:
            tails = [path.read_text()[-2000:] for path in sorted(logs.glob("*.log"))]
            pytest.fail("\n".join([f"no idle node: {shown.stdout}{shown.stderr}", *tails]))
        time.sleep(0.2)


def write_config(root: Path, munge_socket: Path) -> Path:
    """slurm.conf, gres.conf and cgroup.conf in `root`, and the GPUs' device nodes."""
    for folder in ("state", "spool", "gpus"):
        (root / folder).mkdir()
    gpus = [root / "gpus" / f"nvidia{i}" for i in range(GPUS)]
    for minor, gpu in enumerate(gpus):  # character devices, numbered as NVIDIA's are
        os.mknod(gpu, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    (root / "gres.conf").write_text("".join(f"NodeName={NODE} Name=gpu File={g}\n" for g in gpus))
    (root / "cgroup.conf").write_text("ConstrainDevices=no\nConstrainCores=no\n")
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, munge_socket))
    return conf


def start_munged(root: Path, env: dict[str, str], log: IO[str]) -> subprocess.Popen:
    """munged with a fresh key, once its socket is there."""
    key_dir, socket_dir = root / "munge", root / "run"
    key_dir.mkdir(mode=0o700)
    socket_dir.mkdir(mode=0o755)  # munged wants every folder above its socket open to all
    subprocess.run(["mungekey", "--create", f"--keyfile={key_dir}/munge.key"], env=env, check=True)
    munged = subprocess.Popen(
        [
            "munged", "--foreground", f"--key-file={key_dir}/munge.key",
            f"--socket={socket_dir}/munge.socket", f"--pid-file={socket_dir}/munged.pid",
            f"--log-file={root}/munged.log", f"--seed-file={key_dir}/munged.seed",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (socket_dir / "munge.socket").exists():
        assert munged.poll() is None and time.monotonic() < deadline, root / "munged.log"
        time.sleep(0.1)
    return munged


def start_daemons(root: Path) -> tuple[Cluster, list[subprocess.Popen]]:
    """munged, then slurmctld and slurmd in the foreground, their logs in `root`."""
    cluster = Cluster(write_config(root, root / "run" / "munge.socket"))
    env = cluster.env(dict(os.environ))
    with (root / "daemons.log").open("w") as log:
        daemons = [start_munged(root, env, log)]
        for command in (["slurmctld", "-D"], ["slurmd", "-D", "-N", NODE]):
            daemons.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return cluster, daemons


def stop_daemons(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    """Cancel what still runs, then stop slurmd, slurmctld and munged, last started first."""
    if all(daemon.poll() is None for daemon in daemons):
        cluster.cancel_all()
    for daemon in reversed(daemons):
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The cluster for this module's tests, stopped after them: the rest of the suite runs
    without it."""
    missing = [p for p in PROGRAMS if not shutil.which(p, path=f"{os.environ['PATH']}:{SBIN}")]
    if missing:
        _missing(f"{', '.join(missing)} (Debian's slurm-wlm and munge)")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("tests/test_slurm.py must run as root in CI (slurmd runs as root)")
        pytest.skip("not root: slurmd, which the test starts, runs as root (SlurmdUser=root)")
    # Not under pytest's tmp: munged refuses a socket below a folder others cannot enter.
    root = Path(tempfile.mkdtemp(prefix="hpo-slurm-"))
    root.chmod(0o755)
    cluster, daemons = start_daemons(root)
    try:
        wait_until_up(cluster, daemons, root)
        yield cluster
    finally:
        stop_daemons(cluster, daemons)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def submit_dir(tmp_path: Path) -> Path:
    """What the sbatch file calls the repository root: the folder holding `.venv`."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return folder


@pytest.fixture
def slurm_env(hpo_env: dict, cluster: Cluster, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The submitting shell: the suite's PostgreSQL exported, a CUDA_VISIBLE_DEVICES of its
    own that only Slurm's would replace in a task, and the GPU count stub. Whatever the test
    left running is cancelled after it, so the next one finds the node's GPUs free."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(GPU_COUNT_STUB)
    python_path = os.pathsep.join(filter(None, [str(stub), hpo_env.get("PYTHONPATH")]))
    env = {**hpo_env, "HPO_STORAGE": server_url("postgresql"), "PYTHONPATH": python_path}
    yield cluster.env({**env, "CUDA_VISIBLE_DEVICES": SUBMIT_HOST_GPUS})
    cluster.cancel_all()


def create_study(env: dict, cwd: Path, trials: int, epochs: int) -> optuna.Study:
    name = f"slurm-{uuid.uuid4().hex[:8]}"  # the suite's PostgreSQL outlives the test
    space = cwd / "micro.yaml"
    space.write_text(MICRO_SPACE)
    created = run_hpo(
        "create", "--study", name, "--trials", str(trials), "--space", str(space),
        "--dataset", "synthetic", "--epochs", str(epochs), "--pruner", "none",
        "--checkpoint-interval", "0", env=env, cwd=cwd,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    return optuna.load_study(study_name=name, storage=open_storage(env["HPO_STORAGE"]))


def wait_for_checkpointed_trial(study: optuna.Study, timeout: float = 180) -> FrozenTrial:
    """A running trial once it has checkpointed an epoch of its own, with epochs to go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            record = trial.user_attrs.get(attrs.CHECKPOINT) or {}
            if record.get("owner") == trial.number and record["epoch"] <= EPOCHS - 6:
                return trial
        time.sleep(0.1)
    raise AssertionError(f"no trial checkpointed an epoch within {timeout} s")


def gpu_in(record: dict[str, str]) -> str:
    """The GPU Slurm gave a running task, from `scontrol show job --details`: gpu:1(IDX:2)."""
    match = re.search(r"IDX:([\d,-]+)", record["GRES"])
    assert match, record
    return match.group(1)


def outputs_of(submit_dir: Path, job: str) -> dict[str, str]:
    """Each task's output by array task id, as the sbatch file's --output names them."""
    return {
        path.stem.rsplit("_", 1)[1]: path.read_text()
        for path in submit_dir.glob(f"hpo-worker-{job}_*.out")
    }


def assert_each_task_saw_its_own_gpu(outputs: dict[str, str]) -> None:
    """Each task's worker named the one GPU Slurm gave it, never the submitting shell's."""
    joined = {
        task_id: re.findall(r"^worker [^/]+/gpu(\S+)/pid\d+ joined", output, re.M)
        for task_id, output in outputs.items()
    }
    assert sorted(joined) == [str(i) for i in range(GPUS)], outputs
    assert sorted(gpu for (gpu,) in joined.values()) == [str(i) for i in range(GPUS)], joined


def assert_resumed_elsewhere(study: optuna.Study, stopped: FrozenTrial) -> None:
    """Exactly the target, the stopped trial handed back and finished from its checkpoint by
    another task's worker."""
    trials = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    assert len(trials) == TRIALS + 1  # the target's trials and the one handed back: no more
    state = budget(study)
    assert (state.finished, state.given_up, state.running, state.waiting) == (TRIALS, 0, 0, 0)
    assert {t.user_attrs[attrs.GPU] for t in trials} <= {str(i) for i in range(GPUS)}
    (handed_back,) = [t for t in trials if t.number == stopped.number]
    assert handed_back.state == TrialState.FAIL
    assert handed_back.user_attrs[attrs.FAIL_REASON].startswith(attrs.STOPPED_PREFIX)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == stopped.number)
    assert retry.state == TrialState.COMPLETE, retry.user_attrs.get(attrs.FAIL_REASON)
    seen = stopped.user_attrs[attrs.CHECKPOINT]["epoch"]
    assert retry.user_attrs[attrs.RESUMED_FROM_EPOCH] >= seen
    assert retry.user_attrs[attrs.WORKER] != stopped.user_attrs[attrs.WORKER]
    assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))


def test_an_array_of_four_runs_the_study_to_n_and_resumes_a_task_stopped_by_slurm(
    cluster: Cluster, slurm_env: dict, submit_dir: Path
) -> None:
    study = create_study(slurm_env, submit_dir, TRIALS, EPOCHS)
    array = cluster.submit(
        f"--array=0-{GPUS - 1}", str(SBATCH), study.study_name, env=slurm_env, cwd=submit_dir
    )
    stopped = wait_for_checkpointed_trial(study)
    task = cluster.task_of(int(stopped.user_attrs[attrs.WORKER].rsplit("/pid", 1)[1]))
    assert stopped.user_attrs[attrs.GPU] == gpu_in(task)  # the worker trains on Slurm's GPU
    # As DEPLOY.md says: to the job steps (srun's worker), not the batch shell; by the task's
    # array name, since the array's own id would signal every task.
    cluster.run("scancel", "--signal=TERM", f"{task['ArrayJobId']}_{task['ArrayTaskId']}")

    tasks = cluster.wait_ended(array)
    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")] * GPUS
    outputs = outputs_of(submit_dir, array)
    assert "SIGTERM: stopping after this epoch" in outputs[task["ArrayTaskId"]], outputs
    assert_each_task_saw_its_own_gpu(outputs)
    assert_resumed_elsewhere(study, stopped)


def test_gres_gpu_2_with_gpus_all_pins_two_children_to_slurms_names(
    cluster: Cluster, slurm_env: dict, submit_dir: Path, tmp_path: Path
) -> None:
    # A job holding a GPU first: the pair gets two others, so a child pinned to its index
    # among the job's GPUs (0, 1) instead of Slurm's name would show.
    holding = ["--gres=gpu:1", "--mem=1G", "--output=/dev/null", "--wrap=exec sleep 300"]
    (held,) = cluster.wait_for(cluster.submit(*holding, env=slurm_env, cwd=tmp_path), {"RUNNING"})
    # The study is already full: each child joins, names itself and exits without training.
    study = create_study(slurm_env, submit_dir, trials=1, epochs=1)
    study.tell(claim_trial(study), 1.0)
    pair = ["--array=0", "--gres=gpu:2", str(SBATCH), study.study_name, "--gpus", "all"]
    job = cluster.submit(*pair, env=slurm_env, cwd=submit_dir)
    (task,) = cluster.wait_ended(job)
    (output,) = outputs_of(submit_dir, job).values()
    assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), output
    names = re.findall(r"\| worker [^/]+/gpu(\S+)/slot\d+ joined", output)
    assert len(set(names)) == len(names) == 2 and gpu_in(held) not in names, output
    assert set(names) <= {str(i) for i in range(GPUS)}, output
    assert "all workers done" in output


def test_without_the_submitting_shells_environment_the_task_says_what_to_export(
    cluster: Cluster, slurm_env: dict, submit_dir: Path
) -> None:
    # Sites that default to --export=NONE (SBATCH_EXPORT) pass on no HPO_STORAGE.
    bare = ["--array=0", "--export=NONE", str(SBATCH), "any"]
    (task,) = cluster.wait_ended(cluster.submit(*bare, env=slurm_env, cwd=submit_dir))
    assert task["JobState"] == "FAILED"
    (output,) = outputs_of(submit_dir, task["ArrayJobId"]).values()
    assert "export HPO_STORAGE=" in output
