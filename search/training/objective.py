"""One trial: sample a config, build the Backbone, train it, report validation loss, prune."""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError

from data.loader import RunData
from model.counts import count_parameters
from search.rules import attrs
from search.rules.config import DEFAULT_COMPILE_MODE, TrialConfig, describe_recipe
from search.rules.cost import gflops_per_image, refuse_over_cap
from search.rules.data import fit_to_data
from search.rules.faults import compile_disk_fault
from search.rules.pruners import next_rung
from search.rules.settings import StudySettings
from search.rules.space import sample_config
from search.training.checkpoints import CheckpointStore, TrialCheckpoints
from search.training.compile_policy import CompilePolicy
from search.training.run import Run, start_run
from search.training.stops import TrialInterrupted
from search.training.tracker_chain import Chain
from search.training.trackers import Trackers
from search.training.trainer import DeviceRecipe, DivergedError, EpochStats
from storage import StorageUnavailable
from storage.optuna_private import original_number, params_written_once


@dataclass(frozen=True)
class WorkerInfo:
    name: str  # unique per worker process, seeds its sampler
    host: str
    gpu: str  # the GPU it trains on, by its CUDA_VISIBLE_DEVICES name (fleet.worker_gpu), or "cpu"


@dataclass
class TrialRunner:
    """Callable objective holding what a worker keeps between trials."""

    settings: StudySettings
    data: RunData  # the train/validation split on the device, made once per worker
    recipe: DeviceRecipe
    worker: WorkerInfo
    checkpoints: CheckpointStore | None = None
    on_epoch: Callable[[optuna.Trial, EpochStats], None] | None = None
    stop: threading.Event | None = None
    compile_mode: str = DEFAULT_COMPILE_MODE
    say: Callable[[str], None] = print  # warnings for the worker's log
    # --compile auto: when a trial switches to compiled; learns from this worker's trials.
    compile_policy: CompilePolicy | None = None
    # TensorBoard and MLflow, where the study asks for them; never the trial's problem.
    trackers: Trackers = field(default_factory=Trackers)

    def __post_init__(self) -> None:
        # torch imports its compiler on the first optimizer built (seconds): pay that once at
        # worker start-up, not inside the first trial.
        import torch._dynamo  # noqa: F401

        if self.compile_policy is None:
            s = self.settings
            self.compile_policy = CompilePolicy.for_device(
                self.recipe.device.type,
                lambda epoch: next_rung(s.pruner, epoch, s.epochs, s.min_epochs),
            )

    def __call__(self, trial: optuna.Trial) -> float:
        clock = PhaseClock()
        with clock("sample"), params_written_once(trial):
            s = self.settings
            space = s.search_space()
            # One classifier output per class of the study's data.
            cfg = sample_config(trial, space, s.epochs, s.image_size)
            cfg = fit_to_data(cfg, s)
        # An over-cap draw ends here, PRUNED, before anything is built (search/rules/cost.py).
        refuse_over_cap(trial, gflops_per_image(cfg.model), space.max_gflops)
        with clock("build"):
            state = self._checkpoint(trial)
            run = start_run(
                cfg,
                self.data,
                self.recipe,
                seed=self._seed(trial),
                compile_mode=self.compile_mode,
                state=state,
                compile_policy=self.compile_policy,
                calibrated_score=self.settings.calibrated,
            )
        with clock("report"):
            self._describe(trial, cfg, count_parameters(run.trainer.model))
            history = self._resumed_history(trial, state)
            chain = self.trackers.started(trial, self._tracker_tags(), history if state else None)
        checkpoints = TrialCheckpoints(self.checkpoints, trial, self.settings.checkpoint_interval_s)
        ended = "interrupted"  # a BaseException (an exit): the chain goes on elsewhere
        try:
            with checkpoints:  # leaving it waits for the write in flight
                value = self._train(trial, run, history, checkpoints, clock, chain)
            ended = "complete"
            return value
        except (
            TrialInterrupted,
            StorageUnavailable,
            UpdateFinishedTrialError,
            torch.OutOfMemoryError,
        ):
            # Stopped, storage gone, taken over, or out of memory (retried once): the retry
            # resumes from the checkpoint. A chain that fails for good loses it later
            # (CheckpointStore.remove_given_up).
            ended = "interrupted"
            raise
        except Exception as err:
            # Pruned, or failed for good: a Table 1 checkpoint is ~225 MB nobody will read. A
            # compile the disk refused is the machine's: the trial is handed back, to resume.
            ended = "pruned" if isinstance(err, optuna.TrialPruned) else "failed"
            if compile_disk_fault(err) is None:
                self._discard_checkpoint(trial)
            else:
                ended = "interrupted"
            raise
        finally:
            with clock("report"):
                self.trackers.ended(chain, ended)
            clock.seconds["checkpoint"] += checkpoints.seconds
            # Never hides why the trial ended (a storage outage, say).
            with suppress(Exception):
                self._summarize(trial, history, clock)

    def _discard_checkpoint(self, trial: optuna.Trial) -> None:
        """Best effort: a failure here (an outage) must not hide why the trial ended."""
        if self.checkpoints is None:
            return
        try:
            self.checkpoints.discard(trial)
        except UpdateFinishedTrialError:
            pass  # taken over: its retry resumes from the file, which is left as it was
        except Exception as err:
            self.say(f"trial {trial.number}: checkpoint not discarded ({type(err).__name__})")

    def _train(
        self,
        trial: optuna.Trial,
        run: Run,
        history: list[dict],
        checkpoints: TrialCheckpoints,
        clock: PhaseClock,
        chain: Chain | None = None,
    ) -> float:
        for stats in run.trainer.fit(run.train, run.held_out):
            clock.add_epoch(stats)
            history.append(epoch_record(stats, self.settings.calibrated))
            # Queued for the trackers' own threads: training never waits on them.
            self.trackers.epoch(chain, {**history[-1], "train_acc": stats.train_acc})
            if self.on_epoch is not None:
                self.on_epoch(trial, stats)
            last = stats.epoch == run.trainer.cfg.epochs
            stopping = self.stop is not None and self.stop.is_set()
            # Checkpoint (when due) before the report: a crash after the report leaves the
            # retry its last checkpoint; it reports that, and re-runs the epochs after it.
            checkpoints.offer(
                lambda: {**run.trainer.state_dict(), "history": history}, force=last or stopping
            )
            with clock("report"), checkpoints.trial_lock:
                self._record(trial, history, new=1)
            # After the last epoch nothing is left to prune or to interrupt: a stop during it
            # lets the trial complete.
            if last:
                break
            if stopping:
                raise TrialInterrupted(f"stopped after epoch {stats.epoch}")
            with clock("prune"), checkpoints.trial_lock:
                pruned = trial.should_prune()
            if pruned:
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")
        value = score(history)
        if not math.isfinite(value):  # told as a value, Optuna would fail it as a crash
            raise DivergedError(f"validation loss is {value} after the last epoch")
        return value

    def _tracker_tags(self) -> dict[str, str]:
        """What a chain's run is tagged with besides its trial and state."""
        s, w = self.settings, self.worker
        return {"hpo.host": w.host, "hpo.gpu": w.gpu, "hpo.space": s.space_name}

    def _seed(self, trial: optuna.Trial) -> int:
        """Per trial, not per worker history; a retry replays the run it continues, so it is
        seeded by the first trial of its chain (weights, batches, augmentation, dropout)."""
        return self.settings.seed + original_number(trial)

    def _describe(self, trial: optuna.Trial, cfg: TrialConfig, params: int) -> None:
        if trial.user_attrs.get(attrs.FAIL_REASON) is not None:
            # A retry's, inherited from its original (a stop, out of memory): this run has
            # not failed, and a COMPLETE retry must not read "interrupted".
            trial.set_user_attr(attrs.FAIL_REASON, None)
        trial.set_user_attr(attrs.CONFIG, cfg.to_dict())
        trial.set_user_attr(attrs.ARCHITECTURE, describe_architecture(cfg))
        trial.set_user_attr(attrs.RECIPE, describe_recipe(cfg))
        trial.set_user_attr(attrs.PARAMS, params)
        trial.set_user_attr(attrs.DEVICE, device_name(self.recipe.device))
        trial.set_user_attr(attrs.HOST, self.worker.host)
        trial.set_user_attr(attrs.GPU, self.worker.gpu)
        trial.set_user_attr(attrs.WORKER, self.worker.name)

    def _checkpoint(self, trial: optuna.Trial) -> dict | None:
        """A retried trial's checkpoint; None (start at epoch 1) when it has none here."""
        state = self.checkpoints.load(trial) if self.checkpoints is not None else None
        if state is not None:
            trial.set_user_attr(attrs.RESUMED_FROM_EPOCH, state["epoch"])
        return state

    def _resumed_history(self, trial: optuna.Trial, state: dict | None) -> list[dict]:
        """The epochs up to the checkpoint, recorded and reported again where the crashed run
        had not (epochs it ran past its checkpoint are run again)."""
        if state is None:
            return []
        history = state.get("history") or trial.user_attrs.get(attrs.EPOCHS, [])
        history = list(history[: state["epoch"]])
        if history:
            self._record(trial, history)
        return history

    def _record(self, trial: optuna.Trial, history: list[dict], new: int | None = None) -> None:
        """Report the last `new` epochs (all if None) to the pruner and keep all as an attr.
        Each report and attr is a storage transaction: each epoch is reported once."""
        with warnings.catch_warnings():
            # A retry inherits the epochs its original reported; Optuna keeps the first value.
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            for record in history[-new if new else 0 :]:
                trial.report(record["val_loss"], record["epoch"])
        trial.set_user_attr(attrs.EPOCHS, history)

    def _summarize(self, trial: optuna.Trial, history: list[dict], clock: PhaseClock) -> None:
        """The attrs read once a trial has ended, written once (each is a transaction)."""
        with clock("report"):
            if history:
                trial.set_user_attr(attrs.BEST_VAL_LOSS, min(r["val_loss"] for r in history))
                trial.set_user_attr(attrs.VAL_ACC, history[-1]["val_acc"])
                trial.set_user_attr(attrs.IMAGES_PER_S, history[-1]["images_per_s"])
        trial.set_user_attr(attrs.SECONDS, clock.rounded())


class PhaseClock:
    """Seconds a trial spends in each phase (attrs.TRIAL_PHASES), kept as an attribute so
    `hpo status`, the dashboard and bench/study.py see where a study's time goes."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def add_epoch(self, stats: EpochStats) -> None:
        self.seconds["train"] += stats.train_seconds
        self.seconds["eval"] += stats.eval_seconds
        self.seconds["compile"] += stats.compile_seconds

    def rounded(self) -> dict[str, float]:
        return {phase: round(self.seconds[phase], 4) for phase in attrs.TRIAL_PHASES}


def epoch_record(stats: EpochStats, calibrated: bool) -> dict:
    """One epoch as the trial keeps it (in its attrs and its checkpoint). val_loss is what the
    pruner reads and the trial scores: at the fitted temperature in a `calibrated` study. The
    stored names stay as old studies wrote them; what a user reads calls val_loss `score` and
    val_cross_entropy `val_ce` (commands/progress.py)."""
    val_loss = stats.val_calibrated_loss if calibrated else stats.val_loss
    return {
        "epoch": stats.epoch,
        "train_loss": round(stats.train_loss, 5),
        "val_loss": val_loss,  # unrounded: the trial's score may be this value
        "val_cross_entropy": stats.val_loss,  # plain, at temperature 1
        "val_acc": round(stats.val_acc, 5),
        "lr": stats.start_lr,  # what `hpo train` replays for a plateau schedule
        "seconds": round(stats.seconds, 3),
        "images_per_s": round(stats.images_per_s, 1),
        "compile_seconds": round(stats.compile_seconds, 2),
    }


def score(history: list[dict]) -> float:
    """A trial's value: the validation loss of its final epoch, the weights `hpo train`
    reproduces; the lowest over epochs would favour a loss that dipped and then overfit."""
    return history[-1]["val_loss"]


def describe_architecture(cfg: TrialConfig) -> str:
    m = cfg.model
    chains = " | ".join("-".join(map(str, chain)) for chain in m.channels)
    return (
        f"N={m.n_backbones} K={list(m.blocks)} channels {chains} "
        f"kernel {m.kernel_size} dropout {m.dropout:.2f}"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
