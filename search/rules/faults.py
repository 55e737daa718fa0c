"""Whose fault is it: the trial's config, or the machine it runs on (DEPLOY.md §8).

A trial is failed for good only for what its config did. A file this worker cannot write (a
full, read-only or vanished disk: any OSError) is the machine's fault: the trial goes on
without that file, the worker says so, and the study records it (`hpo status` shows it), so
the person watching sees why trials stopped checkpointing. A compile the disk refuses cannot
be gone on without: the trial is handed back and the worker exits EXIT_MACHINE_FAULT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import optuna

from search.rules import attrs

# Exit code of a command whose work is done but whose files the disk refused: the machine's
# fault, not the user's (sysexits EX_TEMPFAIL, as a worker that lost its storage exits).
EXIT_MACHINE_FAULT = 75
# Modules whose errors wrap the OSError a full disk under torch.compile's caches raised
# (InductorError from "OSError: [Errno 28] No space left on device").
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")


class MachineFault(Exception):
    """The machine refused what a trial needs and will go on refusing it (a full disk under the
    compile caches): the worker hands the trial back and exits EXIT_MACHINE_FAULT."""


class FilesNotWritten(Exception):
    """Files a command could not write, each said as it happened; `hpo` exits
    EXIT_MACHINE_FAULT, so a script never ships a file that is not there."""


def machine_fault_line(err: OSError, what: str, where: object = None) -> str:
    """One line naming what was not written, where, and why (errno's words, no traceback);
    `where` defaults to the file the error names."""
    why = err.strerror or type(err).__name__
    where = where or err.filename
    return f"{what} not written{f' to {where}' if where else ''}: {why}"[:300]


def compile_disk_fault(err: BaseException) -> OSError | None:
    """The OSError behind an error torch's compiler raised (a full, read-only or vanished disk
    under its caches), which is the machine's fault; None for any other error."""
    cause: BaseException | None = err
    for _ in range(20):  # a chain, not a cycle
        if cause is None or not type(cause).__module__.startswith(COMPILER_MODULES):
            break
        cause = cause.__cause__ or cause.__context__
    wrapped = cause is not err
    disk = isinstance(cause, OSError) and not isinstance(cause, ConnectionError | TimeoutError)
    return cause if wrapped and disk else None


def compile_fault_line(fault: OSError) -> str:
    where = fault.filename or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return machine_fault_line(fault, "torch.compile's cache", where)


def write_or_say(
    path: Path, write: Callable[[BinaryIO], object], say: Callable[[str], None]
) -> bool:
    """`write(file)` into `path`; a disk that refuses it is said in one line, and what it
    left of the file removed. True if the file was written."""
    try:
        with path.open("wb") as file:  # a file, not a path: torch.save on a path would turn
            write(file)  # an OSError (ENOSPC) into a RuntimeError nobody can act on
    except OSError as err:
        say(machine_fault_line(err, path.name, path.parent))
        with suppress(OSError):
            path.unlink(missing_ok=True)
        return False
    return True


def record_machine_fault(study: optuna.Study, worker: str, line: str) -> None:
    """The worker's latest environment fault, one attribute per worker (no two writers of
    one key). Best effort: the fault is said in the worker's log either way."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with suppress(Exception):
        study.set_user_attr(f"{attrs.MACHINE_FAULT}{worker}", {"at": stamp, "what": line})


def last_machine_fault(study_attrs: dict) -> str | None:
    """The latest fault any worker recorded, as `what (worker W, at UTC)`; None if none."""
    faults = [
        (value["at"], key.removeprefix(attrs.MACHINE_FAULT), value["what"])
        for key, value in study_attrs.items()
        if key.startswith(attrs.MACHINE_FAULT) and isinstance(value, dict)
    ]
    if not faults:
        return None
    at, worker, what = max(faults)
    return f"{what} (worker {worker}, {at} UTC)"
