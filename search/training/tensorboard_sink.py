"""TensorBoard: one run folder per retry chain, FOLDER/STUDY/trial-N (N: the chain's first
trial), scalars per epoch with step = epoch, and the HParams plugin's records at the chain's
end (its parameters and state as hparams, its status), so the HParams tab lists the trials.

A retry continues its chain's folder: its writer opens with purge_step, which makes
TensorBoard's reader drop every event its earlier runs wrote from that step on, and writes the
epochs of its checkpoint again: each step is read once, the chain's own. A write the disk
refused is written again by a new writer purging from its step.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from search.rules import attrs
from search.rules.trackers import chain_number
from search.training.tracker_chain import Chain, final_metrics, scalars

# How the HParams plugin reads each state: "pruned" is a trial that ended as it should.
STATUS = {
    "complete": api_pb2.STATUS_SUCCESS,
    "pruned": api_pb2.STATUS_SUCCESS,
    "failed": api_pb2.STATUS_FAILURE,
}


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, folder: str | Path, study: str) -> None:
        self.root = Path(folder) / study
        self.study = study
        self.writers: dict[int, SummaryWriter] = {}

    def run_dir(self, first: int) -> Path:
        return self.root / f"trial-{first}"

    def started(self, chain: Chain) -> None:
        resumed = chain.resumed is not None
        writer = self._open(chain.first, purge_step=1 if resumed else None)
        for record in chain.resumed or []:
            self._write(writer, record)
        writer.flush()

    def epoch(self, chain: Chain, record: dict, at_ms: int) -> None:
        writer = self.writers.get(chain.first)
        if writer is None:  # the last write failed: a new writer rewrites from this step
            writer = self._open(chain.first, purge_step=record["epoch"])
        try:
            self._write(writer, record, at_ms / 1000)
            writer.flush()
        except Exception:
            self._drop(chain.first)
            raise

    def ended(self, chain: Chain, state: str) -> None:
        if state in STATUS:
            hparams = {**chain.params, "state": state, "trial": chain.trial.number}
            metrics = final_metrics(chain.history)
            self._session(chain.first, hparams, metrics, STATUS[state])
        self._drop(chain.first)

    def given_up(self, study: optuna.Study, trial: FrozenTrial) -> None:
        first = chain_number(trial)
        if not self.run_dir(first).is_dir():  # never logged here (another machine's folder)
            return
        history = trial.user_attrs.get(attrs.EPOCHS) or []
        hparams = {**trial.params, "state": "failed", "trial": trial.number}
        self._session(first, hparams, final_metrics(history), api_pb2.STATUS_FAILURE)
        self._drop(first)

    def permanent(self, err: Exception) -> bool:
        return not isinstance(err, OSError)  # a full, read-only or vanished disk may come back

    def study_done(self, study: optuna.Study) -> None:
        pass  # a study is a folder of runs: nothing of its own to end

    def close(self) -> None:
        for first in list(self.writers):
            self._drop(first)

    def _open(self, first: int, purge_step: int | None) -> SummaryWriter:
        self._drop(first)
        writer = SummaryWriter(str(self.run_dir(first)), purge_step=purge_step)
        self.writers[first] = writer
        return writer

    def _write(self, writer: SummaryWriter, record: dict, at_s: float | None = None) -> None:
        for name, value in scalars(record).items():
            writer.add_scalar(name, value, record["epoch"], walltime=at_s)

    def _session(self, first: int, hparams: dict, metrics: dict, status: int) -> None:
        """The HParams plugin's start and end records of the chain's session, and its final
        metrics as scalars (the tab's metric columns read a run's scalars)."""
        writer = self.writers.get(first) or self._open(first, purge_step=None)
        now = time.time()
        start = plugin_data_pb2.SessionStartInfo(group_name=f"trial-{first}", start_time_secs=now)
        for key, value in hparams.items():
            _set_hparam(start.hparams[key], value)
        end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=now)
        writer.file_writer.add_summary(_hparams_record(session_start_info=start))
        writer.file_writer.add_summary(_hparams_record(session_end_info=end))
        for name, value in metrics.items():
            writer.add_scalar(name, value, 0, walltime=now)
        writer.flush()

    def _drop(self, first: int) -> None:
        writer = self.writers.pop(first, None)
        if writer is not None:
            writer.close()


def _set_hparam(slot: object, value: object) -> None:
    """An hparam as the plugin takes it: a bool, a number or else a string."""
    if isinstance(value, bool):
        slot.bool_value = value
    elif isinstance(value, int | float):
        slot.number_value = value
    else:
        slot.string_value = str(value)


def _hparams_record(**data: object) -> Summary:
    """One HParams plugin record (its protos, as tensorboard.plugins.hparams.summary makes
    them without TensorFlow, which that module imports)."""
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    plugin = SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()
    )
    tag = (
        metadata.SESSION_START_INFO_TAG
        if "session_start_info" in data
        else metadata.SESSION_END_INFO_TAG
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])
