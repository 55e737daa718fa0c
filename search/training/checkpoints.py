"""Epoch checkpoints of a trial as Optuna artifacts, so a retried trial resumes, not restarts.

A trial checkpoints at most once per interval of training, and always after its last epoch
and on a graceful stop; the training thread only copies the state to host memory, a
background thread writes it (TrialCheckpoints). A checkpoint the disk refuses (full, read-only,
vanished) is the machine's fault, not the trial's: the trial goes on without it and says so
(search/rules/faults.py).
"""

from __future__ import annotations

import fcntl
import functools
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from search.rules import attrs
from search.rules.faults import machine_fault_line, record_machine_fault
from storage.optuna_private import (
    forget_artifact,
    is_running,
    listed_artifacts,
    replace_artifact,
)

# Scratch folders inside the artifact folder, one per write in flight: `.scratch-HOST@KERNEL-`
# and a random suffix, locked (flock) by its writer while it writes. A worker killed mid-write
# leaves its own, and the kernel drops its lock; the next store opened on that kernel (its boot
# id: containers sharing a host and its hostname, even as PID 1 each, are one) removes the
# unlocked ones. Another kernel's lock may not reach here (a network filesystem): its scratch
# goes once it is older than STALE_SCRATCH_S, as any where locks cannot tell.
SCRATCH_PREFIX = ".scratch-"
STALE_SCRATCH_S = 24 * 3600.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class CheckpointStore:
    """One artifact per trial, `trial-N-checkpoint.pt`, rewritten after every epoch.

    Rewriting in place keeps the dashboard's artifact list to one live file per trial; the
    new file replaces the old one atomically, so a crash mid-write leaves the last epoch.
    """

    def __init__(self, directory: Path, say: Callable[[str], None] = print):
        self.directory = directory
        self.say = say  # where a refused or unwritten checkpoint is reported
        try:
            directory.mkdir(parents=True, exist_ok=True)
            remove_stale_scratch(directory)
        except OSError as err:  # each checkpoint then says why it is not written
            say(f"artifact folder {directory} not usable: {err.strerror or err}")
        self.artifacts = FileSystemArtifactStore(str(directory))
        self._gone: set[str] = set()  # artifacts of failed chains this worker looked for

    def save(
        self,
        trial: optuna.Trial,
        state: dict[str, Any],
        lock: AbstractContextManager | None = None,
    ) -> None:
        """Write `state` as the trial's checkpoint. Off the training thread, `lock` is the one
        the training thread holds while it touches the trial: its attrs are one plain dict,
        which Optuna deep-copies to read, and a key added meanwhile fails the copy.

        A trial another worker failed as stale is no longer its chain's live member: its
        retry resumes from the chain's file, or has replaced it. Such a copy writes no file
        (UpdateFinishedTrialError): its trial is read just before the file is replaced, and a
        new file's listing is written before the file (upload_artifact).
        """
        lock = lock or nullcontext()
        with lock:
            record = trial.user_attrs.get(attrs.CHECKPOINT)
        owned = bool(record) and record["owner"] == trial.number
        with owned_scratch(self.directory) as scratch:
            path = scratch / f"trial-{trial.number}-checkpoint.pt"
            with path.open("wb") as file:  # torch.save on a path turns an OSError (ENOSPC)
                torch.save(state, file)  # into a RuntimeError nobody can act on
            # An inherited record points at the failed trial's file: this trial needs its own.
            if owned:
                artifact_id = record["artifact_id"]
                if not is_running(trial):
                    raise UpdateFinishedTrialError(f"trial {trial.number} was failed elsewhere")
                replace_artifact(self.artifacts, artifact_id, path)
            else:
                artifact_id = upload_artifact(
                    artifact_store=self.artifacts,
                    file_path=str(path),
                    study_or_trial=trial,
                    mimetype="application/octet-stream",
                )
        new_record = {"artifact_id": artifact_id, "epoch": state["epoch"], "owner": trial.number}
        with lock:
            try:
                trial.set_user_attr(attrs.CHECKPOINT, new_record)
            except UpdateFinishedTrialError:
                if not owned:  # a new file no record names: the retry has its original's
                    self._remove_file(artifact_id)
                raise
            if record and not owned:
                # Nothing resumes from the inherited file now: this trial's retry would
                # inherit this trial's record. One checkpoint per chain.
                self._remove(trial, record["artifact_id"])

    def load(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """The checkpoint a retried trial inherited from the trial it replaces, if any."""
        record = trial.user_attrs.get(attrs.CHECKPOINT)
        if not record:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "checkpoint.pt"
            try:
                download_artifact(
                    artifact_store=self.artifacts,
                    artifact_id=record["artifact_id"],
                    file_path=str(path),
                )
            except ArtifactNotFound:
                # Written on a machine that does not share this artifact directory.
                return None
            except OSError as err:  # the disk's fault: the retry starts over, not fails
                self.say(f"trial {trial.number}: checkpoint not read: {err.strerror or err}")
                return None
            return self._load_plain_state(path, self.directory / record["artifact_id"])

    def _load_plain_state(self, path: Path, shown_as: Path) -> dict[str, Any] | None:
        """The state in `path`, loaded with weights_only: tensors, numbers, strings and
        containers only. Anyone who can write the (shared) artifact folder could otherwise
        run code in every worker that resumes a trial; such a file is refused instead."""
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            self.say(f"refused checkpoint {shown_as}: not a plain state ({_first_line(err)})")
        except (RuntimeError, EOFError, OSError) as err:  # not a whole zip archive
            self.say(f"refused checkpoint {shown_as}: damaged or truncated ({_first_line(err)})")
        return None

    def discard(self, trial: optuna.Trial) -> None:
        """Delete the checkpoint of a trial that nothing will resume (pruned, or failed for
        good): its own, or the one it inherited and had not replaced yet (its chain ends).

        The record goes first: writing it fails on a trial another worker failed as stale
        (UpdateFinishedTrialError), whose retry resumes from this file, and then nothing is
        touched. The file goes as the dashboard removes an artifact: listing set to null.
        """
        record = trial.user_attrs.get(attrs.CHECKPOINT)
        if not record:
            return
        trial.set_user_attr(attrs.CHECKPOINT, None)
        self._remove(trial, record["artifact_id"])

    def remove_given_up(self, failed: list[FrozenTrial]) -> list[int]:
        """Delete the checkpoint files of chains that failed for good, as the study sees them
        (search.rules.study.queue_owed_retries): no one resumes from them, and the trial that ended
        each chain (its worker died, or ran out of memory again) cannot. Their listings stay:
        a finished trial's attributes are read-only. Returns the numbers whose file it deleted.

        Every file the chain still lists goes, not only the record's: a worker killed between
        a retry's new record and its removal of the inherited file (save) left that file
        listed and named by no record."""
        deleted = []
        for trial in failed:
            record = trial.user_attrs.get(attrs.CHECKPOINT)
            files = {*listed_artifacts(trial), *([record["artifact_id"]] if record else [])}
            removed = [self._remove_file(file) for file in sorted(files - self._gone)]
            if any(removed):
                deleted.append(trial.number)
            self._gone |= files
        return deleted

    def _remove(self, trial: optuna.Trial, artifact_id: str) -> None:
        forget_artifact(trial, artifact_id)  # a retry inherits its original's listing too
        self._remove_file(artifact_id)

    def _remove_file(self, artifact_id: str) -> bool:
        try:
            self.artifacts.remove(artifact_id)
        except ArtifactNotFound:  # on another machine's folder, or removed already
            return False
        except OSError as err:  # a read-only or vanished disk: the file stays, said once here
            self.say(f"checkpoint {artifact_id} not deleted: {err.strerror or err}")
            return False
        return True


def scratch_prefix() -> str:
    return f"{SCRATCH_PREFIX}{socket.gethostname()}@{this_kernel()}-"


@functools.cache
def this_kernel() -> str:
    """The boot id of the kernel this process runs on: the scope of its file locks."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:  # not Linux: the hostname stands in
        return socket.gethostname()


@contextmanager
def owned_scratch(directory: Path) -> Iterator[Path]:
    """A new scratch folder in `directory`, locked until it is removed with its contents."""
    while True:
        folder = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=directory))
        lock = os.open(folder, os.O_RDONLY)
        try:
            with suppress(OSError):  # no locks on this filesystem: kept a day (above)
                fcntl.flock(lock, fcntl.LOCK_EX)
            # A clean-up may have taken its lock between the two lines above, and removed it.
            if folder.exists():
                try:
                    yield folder
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                return
        finally:
            os.close(lock)


def remove_stale_scratch(directory: Path) -> None:
    """Remove the scratch folders of writes that died with their worker (a kill mid-write):
    those of this kernel no process holds the lock of, and any older than STALE_SCRATCH_S
    whose lock cannot tell (another kernel's, or a filesystem without locks)."""
    here = f"@{this_kernel()}-"
    for folder in directory.glob(f"{SCRATCH_PREFIX}*"):
        with suppress(OSError):  # removed by another worker meanwhile
            if here in folder.name and _remove_unless_locked(folder):
                continue
            if time.time() - folder.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(folder)


def _remove_unless_locked(folder: Path) -> bool:
    """Remove `folder` unless its writer holds its lock (a live one: the kernel drops a dead
    one's); the lock is held while it goes, so a writer that just made it sees it gone.
    False where the lock cannot tell: a filesystem without locks."""
    lock = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer's
            return True
        except OSError:
            return False
        shutil.rmtree(folder)
        return True
    finally:
        os.close(lock)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines()[0] if str(err) else type(err).__name__)[:120]


class TrialCheckpoints:
    """The checkpoints of one running trial, written off the training thread.

    `offer` after each epoch copies the state to host memory (so later steps cannot change
    what is written) and hands it to a background thread, at most one write in flight; it
    does so only once per `interval_s` seconds since the last one, unless forced. Leaving the
    `with` block waits for the write in flight, so the trial is told, discarded or the process
    exits only once its checkpoint is on disk. `seconds` is what the training thread spent.
    While a write may be in flight, the training thread touches the trial (reports, attrs,
    should_prune) only holding `trial_lock`.
    """

    def __init__(self, store: CheckpointStore | None, trial: optuna.Trial, interval_s: float):
        self.store, self.trial, self.interval_s = store, trial, interval_s
        self.seconds = 0.0
        self.saved_epochs: list[int] = []
        self._last = time.monotonic()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._fault: str | None = None  # the last write's machine fault, told by wait()
        self._told: set[str] = set()
        self.trial_lock = threading.Lock()

    def offer(self, state: Callable[[], dict[str, Any]], force: bool = False) -> bool:
        """Checkpoint `state()` if forced or an interval has passed; True if it did."""
        if self.store is None or not (force or time.monotonic() - self._last >= self.interval_s):
            return False
        start = time.perf_counter()
        host_state = to_host(state())
        self.wait()
        self._writer = threading.Thread(target=self._write, args=(host_state,), name="checkpoint")
        self._writer.start()
        self._last = time.monotonic()
        self.saved_epochs.append(host_state["epoch"])
        self.seconds += time.perf_counter() - start
        return True

    def wait(self) -> None:
        """Wait for the write in flight; raise what it raised."""
        if self._writer is not None:
            start = time.perf_counter()
            self._writer.join()
            self._writer = None
            self.seconds += time.perf_counter() - start
        fault, self._fault = self._fault, None
        if fault is not None:
            self._tell(fault)
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(self, state: dict[str, Any]) -> None:
        try:
            self.store.save(self.trial, state, self.trial_lock)
        except OSError as err:
            if isinstance(err, ConnectionError | TimeoutError):  # a storage's, not the disk's
                self._error = err
            else:  # the machine's fault, not the trial's: it goes on without this one
                self._fault = machine_fault_line(err, "checkpoint", self.store.directory)
        except BaseException as err:  # raised on the training thread by wait()
            self._error = err

    def _tell(self, fault: str) -> None:
        """Say a checkpoint the disk refused, loudly, once per trial and kind of fault, and
        record it where `hpo status` shows it."""
        if fault in self._told:
            return
        self._told.add(fault)
        self.store.say(
            f"trial {self.trial.number}: {fault}; it trains on without it (the machine's "
            "fault, not the trial's: a crash now restarts it from its last checkpoint)"
        )
        worker = self.trial.user_attrs.get(attrs.WORKER, "?")
        record_machine_fault(self.trial.study, worker, fault)

    def __enter__(self) -> TrialCheckpoints:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.wait()
            return
        with suppress(Exception):  # the trial already ends with the first error
            self.wait()


def to_host(state: Any) -> Any:
    """A copy of `state` in host memory sharing no tensor or list with the running trial."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: to_host(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(to_host(value) for value in state)
    return state
