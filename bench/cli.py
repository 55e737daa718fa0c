"""What a light `hpo` command costs against Optuna's own CLI, on the same SQLite study.

Runs `hpo --help`, `hpo status`, `hpo best` and `optuna studies` as real processes, one of
each per round, in alternating order (load from other processes falls on all of them), and
prints the median of the rounds: wall time, peak memory (the child's max RSS, from wait4),
and the ratio of each to `optuna studies`. The study is made here, torch-free: a tiny space,
trials told with sampled configs and made-up metrics (nothing trains).

Run from the repository root:

    .venv/bin/python bench/cli.py               # 9 rounds
    .venv/bin/python bench/cli.py --rounds 15 --trials 200
    .venv/bin/python bench/cli.py --checkout ../main   # another checkout's hpo, same study
    .venv/bin/python bench/cli.py --smoke       # one round, 5 trials: seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, this folder would come first on sys.path and shadow the `storage` package.
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from search.rules import attrs  # noqa: E402
from search.rules.cost import gflops_per_image  # noqa: E402
from search.rules.settings import StudySettings  # noqa: E402
from search.rules.space import sample_config  # noqa: E402
from search.rules.study import create_or_join  # noqa: E402
from storage import open_storage  # noqa: E402

STUDY = "bench-cli"
BIN = Path(sys.executable).parent


def make_study(url: str, trials: int) -> None:
    """A study as `hpo create` makes it, its trials told by hand with sampled configs."""
    settings = StudySettings.for_space("tiny", dataset="synthetic")
    create_or_join(open_storage(url), STUDY, settings, trials)
    study = optuna.load_study(study_name=STUDY, storage=open_storage(url))
    rng = random.Random(0)
    for _ in range(trials):
        trial = study.ask()
        cfg = sample_config(trial, settings.search_space(), settings.epochs)
        trial.set_user_attr(attrs.CONFIG, cfg.to_dict())
        trial.set_user_attr(attrs.GFLOPS, gflops_per_image(cfg.model))
        trial.set_user_attr(attrs.VAL_ACC, rng.uniform(0.3, 0.9))
        study.tell(trial, rng.uniform(0.3, 2.0))


# --smoke: the smallest run (the suite runs it).
SMOKE = ["--rounds", "1", "--trials", "5"]


def commands(url: str) -> dict[str, list[str]]:
    hpo, optuna_cli = str(BIN / "hpo"), str(BIN / "optuna")
    return {
        "hpo --help": [hpo, "--help"],
        "hpo status": [hpo, "status", "--study", STUDY, "--storage", url],
        "hpo best": [hpo, "best", "--study", STUDY, "--storage", url],
        "optuna studies": [optuna_cli, "studies", "--storage", url],
    }


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB of one run of `argv`."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {child.returncode}: {child.stderr.read()}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    flags = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags.split() else "no AVX512-BF16"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model} ({bf16}), {os.cpu_count()} cores; load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--trials", type=int, default=50, help="trials in the study")
    parser.add_argument(
        "--checkout", type=Path, default=ROOT, help="the checkout whose hpo runs (PYTHONPATH)"
    )
    parser.add_argument("--smoke", action="store_true", help=" ".join(SMOKE) + " (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'bench.db'}"
        make_study(url, args.trials)
        env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve()), "COLUMNS": "200"}
        runs = commands(url)
        walls: dict[str, list[float]] = {name: [] for name in runs}
        peaks: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]  # alternate who goes first
            for name in order:
                wall, peak = run_once(runs[name], env)
                walls[name].append(wall)
                peaks[name].append(peak)

    print(machine())
    print(f"hpo of {args.checkout.resolve()}")
    print(f"median of {args.rounds} rounds, study of {args.trials} trials on SQLite")
    base_wall = statistics.median(walls["optuna studies"])
    base_peak = statistics.median(peaks["optuna studies"])
    print(f"{'command':<16} {'wall s':>7} {'x optuna':>9} {'peak MB':>8} {'x optuna':>9}")
    for name in names:
        wall, peak = statistics.median(walls[name]), statistics.median(peaks[name])
        print(
            f"{name:<16} {wall:7.2f} {wall / base_wall:8.2f}x {peak:8.0f} {peak / base_peak:8.2f}x"
        )


if __name__ == "__main__":
    main()
