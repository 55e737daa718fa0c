"""An out-of-memory trial on a worker: said in one line, retried once, memory back after it.

    python bench/oom.py --device cuda   # Table 1 (the default space's first ticket) on a GPU
                                        # filled to --leave-gib free: it runs out, twice
    python bench/oom.py --device cpu    # a CPU cannot run out this way: the first two trials
                                        # raise torch.OutOfMemoryError in training instead

    python bench/oom.py --smoke         # the CPU's, on 200 images: seconds

A real worker loop, study (SQLite) and objective. After each trial it prints what this
process still holds on the device beyond the filler (CUDA: allocated and reserved), or, on
the CPU, whether the trial's model is still alive, and how long the release took.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import torch  # noqa: E402

import search.training.worker  # noqa: E402
from data.dataset import load_dataset  # noqa: E402
from data.loader import search_data
from data.synthetic import write_synthetic
from search.rules import attrs  # noqa: E402
from search.rules.settings import StudySettings  # noqa: E402
from search.rules.study import create_or_join, join_as_worker  # noqa: E402
from search.training import memory  # noqa: E402
from search.training.objective import TrialRunner, WorkerInfo  # noqa: E402
from search.training.trainer import DeviceRecipe  # noqa: E402
from search.training.worker import run_worker  # noqa: E402
from storage import open_storage  # noqa: E402

MIB = 2**20
# --smoke: the smallest run (the suite runs it).
SMOKE = ["--device", "cpu", "--images", "200"]  # past the tiny space's largest batch


@dataclass
class CpuOutOfMemory(TrialRunner):
    """The real objective; on a CPU its first `runs_out` trials raise OOM in training."""

    runs_out: int = 2
    models: list[weakref.ref] = field(default_factory=list)

    def _train(self, trial, run, *args):  # type: ignore[no-untyped-def]
        self.models.append(weakref.ref(run.trainer.model))
        if len(self.models) <= self.runs_out:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by bench/oom.py on a CPU)")
        return super()._train(trial, run, *args)


def timed_release() -> None:
    start = time.perf_counter()
    real_release()
    timed_release.seconds = time.perf_counter() - start  # type: ignore[attr-defined]


real_release = memory.release_trial_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--leave-gib", type=float, default=0.5, help="free GPU memory left")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--images", type=int, default=1000, help="synthetic training images")
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    root = Path(tempfile.mkdtemp(prefix="hpo-oom-"))
    write_synthetic(root, train_per_class=args.images // 10, test_per_class=10)
    space = "default" if args.device == "cuda" else "tiny"
    settings = StudySettings.for_space(space, epochs=1, dataset="synthetic", pruner="none")
    storage = open_storage(f"sqlite:///{root / 'oom.db'}")
    create_or_join(storage, "oom", settings, args.trials)
    study = join_as_worker(storage, "oom", settings, "bench")
    recipe = DeviceRecipe.for_device(args.device)
    data = search_data(load_dataset("synthetic", root), recipe.device)
    options = dict(
        settings=settings,
        data=data,
        recipe=recipe,
        worker=WorkerInfo("bench", "host", args.device),
        compile_mode="off",
    )
    runner = TrialRunner(**options) if args.device == "cuda" else CpuOutOfMemory(**options)
    filler = None
    if args.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        filler = torch.empty(
            max(free - int(args.leave_gib * 2**30), 0), dtype=torch.uint8, device="cuda"
        )
    base_allocated = torch.cuda.memory_allocated() if filler is not None else 0

    def after(trial: optuna.trial.FrozenTrial, _view: object) -> None:
        if filler is not None:
            held = torch.cuda.memory_allocated() - base_allocated
            reserved = torch.cuda.memory_reserved() - base_allocated
            left = f"{held / MIB:.0f} MiB allocated, {reserved / MIB:.0f} MiB reserved"
        else:
            alive = sum(model() is not None for model in runner.models)
            left = f"{alive} of {len(runner.models)} trial models alive"
        reason = trial.user_attrs.get(attrs.FAIL_REASON, "")
        print(
            f"trial {trial.number} {trial.state.name} {reason[:60]!r}: after release {left}; "
            f"release took {getattr(timed_release, 'seconds', 0.0) * 1000:.1f} ms"
        )

    search.training.worker.release_trial_memory = timed_release  # the real release, timed
    run_worker(study, runner, threading.Event(), after, say=print)
    states = [t.state.name for t in study.get_trials()]
    print(f"trials: {states}")


if __name__ == "__main__":
    main()
