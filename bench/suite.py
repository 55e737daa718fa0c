"""Where the test suite's time goes: wall and CPU seconds of every test, summed per file.

Runs pytest with the arguments after `--` and a plugin of its own that times each test in the
process that runs it (an xdist worker, or pytest itself): wall seconds over setup, call and
teardown, and CPU seconds of that process and of the children it waited for (`hpo`
processes, worker fleets; not servers that run as daemons). CPU seconds say what a test
costs where wall seconds on a shared machine mostly say how busy it was. Prints one markdown
table per file, the slowest tests, and the run's wall and CPU totals.

    python bench/suite.py -- -n 4 --dist loadfile --no-loadscope-reorder
    python bench/suite.py --top 30 -- -m "not slow" -n 4 --dist loadfile --no-loadscope-reorder
    python bench/suite.py --smoke      # one small test, a few seconds
    python bench/suite.py --save times.jsonl -- ...   # keep every test's figures to compare
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOG_ENV = "HPO_SUITE_TIMES"  # where each process running tests appends its lines


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """The plugin (`-p suite`): one JSON line per test, written by the process that ran it."""
    wall, cpu = time.monotonic(), cpu_seconds()
    yield
    line = [item.nodeid, time.monotonic() - wall, cpu_seconds() - cpu]
    with open(os.environ[LOG_ENV], "a") as out:  # one short append: whole lines
        out.write(json.dumps(line) + "\n")


def per_file(lines: list[list]) -> dict[str, list[float]]:
    files: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for nodeid, wall, cpu in lines:
        row = files[nodeid.split("::")[0]]
        row[0] += 1
        row[1] += wall
        row[2] += cpu
    return dict(sorted(files.items(), key=lambda item: -item[1][1]))


def report(lines: list[list], elapsed: float, cpu: float, top: int) -> None:
    print("| file | tests | test wall s | test CPU s |\n|---|---|---|---|")
    for name, (count, wall, cpu_s) in per_file(lines).items():
        print(f"| `{Path(name).name}` | {count} | {wall:.0f} | {cpu_s:.0f} |")
    print(f"\n{top} slowest tests (wall s, CPU s):")
    for nodeid, wall, cpu_s in sorted(lines, key=lambda line: -line[1])[:top]:
        print(f"{wall:8.1f} {cpu_s:7.1f}  {nodeid}")
    walls = sum(line[1] for line in lines)
    print(f"\n{len(lines)} tests: {walls:.0f} s of test wall time, {elapsed:.0f} s elapsed "
          f"(collection included), {cpu:.0f} CPU s in all")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=15, help="slowest tests to list")
    parser.add_argument("--smoke", action="store_true", help="one small test")
    parser.add_argument("--save", type=Path, help="keep every test's line (JSON) in this file")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    if args.smoke:
        pytest_args = ["tests/test_model.py::test_table1_constant", "-p", "no:xdist"]
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "times.jsonl"
        log.touch()
        here = str(Path(__file__).parent)
        path = os.pathsep.join(filter(None, [str(ROOT), here, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, LOG_ENV: str(log), "PYTHONPATH": path}
        start = time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "suite", "-q", *pytest_args], cwd=ROOT, env=env
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        if args.save:
            args.save.write_text(log.read_text())
    report(lines, time.monotonic() - start, cpu, args.top)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
