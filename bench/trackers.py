"""What logging a trial to TensorBoard and MLflow costs an epoch (issue 39).

The training thread only queues each epoch's record (search/training/trackers.py): that is
timed around the call. The trackers' own threads write it; the CPU time they spend per epoch
(time.thread_time inside each write) is the most they can take from training, which shares
the interpreter's lock with them. Both are set against an epoch: docs/BENCHMARKS.md.

    python bench/trackers.py --epochs 300                                  # TensorBoard
    python bench/trackers.py --epochs 300 --mlflow http://127.0.0.1:5000   # and a server
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import optuna  # noqa: E402

from search.training.tensorboard_sink import TensorBoardSink  # noqa: E402
from search.training.trackers import Trackers  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Timed:
    """A sink whose every write's thread CPU time and wall time are kept, by method."""

    def __init__(self, sink: object) -> None:
        self.sink, self.name = sink, sink.name
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}

    def __getattr__(self, method: str) -> object:
        wrapped = getattr(self.sink, method)
        if method not in ("started", "epoch", "ended"):
            return wrapped

        def timed(*args: object) -> None:
            cpu, wall = time.thread_time(), time.perf_counter()
            wrapped(*args)
            self.cpu.setdefault(method, []).append(time.thread_time() - cpu)
            self.wall.setdefault(method, []).append(time.perf_counter() - wall)

        return timed


def record(epoch: int) -> dict:
    return {
        "epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5, "val_loss": 1.2 / epoch,
        "val_cross_entropy": 1.3 / epoch, "val_acc": 0.6, "lr": 1e-3, "images_per_s": 30000.0,
    }  # fmt: skip


def measure(sinks: list[Timed], epochs: int, trials: int) -> list[float]:
    """Queue `trials` trials of `epochs` epochs; the training thread's seconds per epoch."""
    trackers = Trackers(sinks, say=print, on_down=print)
    study = optuna.create_study(study_name="bench")
    queued = []
    for _ in range(trials):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("width", 16, 512)
        chain = trackers.started(trial, {"hpo.host": "bench"}, None)
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            trackers.epoch(chain, record(epoch))
            queued.append(time.perf_counter() - start)
        trackers.ended(chain, "complete")
        study.tell(trial, 1.0)
    trackers.close()
    return queued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300, help="epochs per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--mlflow", help="a tracking server's URI, to time MLflow too")
    parser.add_argument("--smoke", action="store_true", help="a few epochs, TensorBoard only")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.trials, args.mlflow = 5, 1, None
    with tempfile.TemporaryDirectory() as folder:
        sinks = [Timed(TensorBoardSink(Path(folder), "bench"))]
        if args.mlflow:
            from search.training.mlflow_sink import MlflowSink

            sinks.append(Timed(MlflowSink(args.mlflow, f"bench-{time.time():.0f}")))
        queued = measure(sinks, args.epochs, args.trials)
    print(f"{args.trials} trials x {args.epochs} epochs")
    print(
        f"training thread, per epoch: median {statistics.median(queued) * 1e6:.1f} us, "
        f"max {max(queued) * 1e6:.1f} us (queueing the record)"
    )
    for sink in sinks:
        for method in ("started", "epoch", "ended"):
            cpu, wall = sink.cpu.get(method, [0.0]), sink.wall.get(method, [0.0])
            print(
                f"{sink.name} thread, {method}: CPU median {statistics.median(cpu) * 1e3:.2f} ms "
                f"(p90 {sorted(cpu)[int(0.9 * (len(cpu) - 1))] * 1e3:.2f}), "
                f"wall median {statistics.median(wall) * 1e3:.2f} ms"
            )


if __name__ == "__main__":
    main()
