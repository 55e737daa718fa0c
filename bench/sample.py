"""Sampling one trial's config, as a worker does, with its params written in one transaction
against Optuna's one per param: seconds per trial and commits per trial, paired.

    python bench/sample.py                 # tiny space, SQLite, 60 trials each way
    python bench/sample.py --space default --trials 100
    python bench/sample.py --smoke         # 6 trials each way (seconds)

Both studies run TPE as the workers do (multivariate, grouped, constant liar, from the trials
a claim handed over: storage.optuna_private.sample_from) and alternate
trial by trial, so the machine's load falls on both alike. The first 10 trials of each (TPE's
random start-up) are left out of the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402

from search.rules.space import load_space, sample_config  # noqa: E402
from storage import open_storage, optuna_private  # noqa: E402

WAYS = ("one transaction", "optuna's, one per param")
STARTUP_TRIALS = 10


def worker_study(folder: Path, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=0, multivariate=True, group=True, constant_liar=True
        )
    storage = open_storage(f"sqlite:///{folder / name}.db")
    return optuna.create_study(storage=storage, sampler=sampler)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    folder = Path(tempfile.mkdtemp(prefix="bench-sample-"))
    studies = {way: worker_study(folder, f"s{i}") for i, way in enumerate(WAYS)}
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    commits: dict[str, list[int]] = {way: [] for way in WAYS}
    for i in range(args.trials):
        for way, study in studies.items():
            trial = study.ask()
            # As a worker's claim: the trials just read are handed to the sampler.
            optuna_private.sample_from(study, study.get_trials(deepcopy=False))
            counted: list = []
            count = counted.append  # one listener object, to remove it by
            engine = study._storage._backend.engine
            sqlalchemy.event.listen(engine, "commit", count)
            one = way == WAYS[0]
            started = time.perf_counter()
            optuna_private.sample_relative_params(study, trial)
            with optuna_private.params_written_once(trial) if one else nullcontext():
                sample_config(trial, space, args.epochs)
            seconds[way].append(time.perf_counter() - started)
            sqlalchemy.event.remove(engine, "commit", count)
            commits[way].append(len(counted))
            study.tell(trial, float(i % 7))
    print(f"space {args.space}, {args.trials} trials each way, SQLite in {folder}")
    skip = STARTUP_TRIALS if args.trials > 2 * STARTUP_TRIALS else 0
    for way in WAYS:
        print(
            f"  {way:<24} median {statistics.median(seconds[way][skip:]):.4f} s a trial, "
            f"{statistics.mean(commits[way]):.1f} transactions a trial (reads too)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="6 trials each way (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.trials = 6
    return args


if __name__ == "__main__":
    main()
