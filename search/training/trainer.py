"""The training loop: AdamW or SGD + cross-entropy, one of five LR schedules, optionally an
average of the weights and test-time views at evaluation, as fast as the device goes.

The trainer is handed loaders (iterables of device tensors); it never imports `data`.
Losses stay on the device during an epoch and are read once at its end, so a step
never waits for the host.

Where the hardware computes bf16 natively (Ampere or newer GPUs, CPUs with AVX512-BF16 or
AMX), steps run under bf16 autocast in channels_last; everywhere the K blocks of a backbone
run as one grouped stack and AdamW is fused; `compile_mode` adds torch.compile, with CUDA
graphs for small models. None of this changes the model's parameters or state_dict: the
checkpoint of a compiled, fused, bf16 run loads into a plain model. Figures for each choice
are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.counts import train_step_flops
from model.network import BackboneNet
from search.rules.config import COMPILE_MODES, DEFAULT_COMPILE_MODE, TrainConfig
from search.training.compile_policy import CompilePolicy
from search.training.recipe import WeightAverage, build_optimizer, calibrated_cross_entropy

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# The views of a batch whose logits evaluation averages (test-time augmentation); handed in by
# whoever owns the data, as the batches are.
EvalViews = Callable[[torch.Tensor], list[torch.Tensor]]
# Schedules that move every step; the others move once per epoch.
PER_STEP_SCHEDULERS = ("onecycle", "cosine")
# A training step under this many FLOPs is launch-bound on a GPU (under ~5 ms at 100 TFLOP/s,
# against hundreds of kernel launches): CUDA graphs replay the whole step as one launch.
CUDA_GRAPH_MAX_STEP_FLOPS = 5e11


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float  # on the training batches as the model saw them (augmented, in train mode)
    val_loss: float | None
    val_acc: float | None
    seconds: float
    images_per_s: float  # training images per second, less the step that compiled
    lr: float  # after the epoch's schedule step: the next epoch's (starting) LR
    start_lr: float  # the LR the epoch started with
    compile_seconds: float = 0.0  # spent compiling during this epoch (the first one, mostly)
    train_seconds: float = 0.0  # training steps, less compiling
    eval_seconds: float = 0.0  # validation, less compiling
    # Validation cross-entropy at the temperature fitted on the same predictions (recipe.py).
    val_calibrated_loss: float | None = None

    def line(self, label: str, epochs: int) -> str:
        """The epoch as the console shows it: "trial 3 epoch 2/10  lr ...  train ...  val_ce
        ...  calibrated_ce ...  acc ...": validation cross-entropy plain and at the fitted
        temperature, each by its name (a study's score is one of them: `hpo status` says which)."""
        val = ""
        if self.val_loss is not None:
            calibrated = self.val_calibrated_loss
            at_fitted = f"  calibrated_ce {calibrated:.4f}" if calibrated is not None else ""
            val = f"val_ce {self.val_loss:.4f}{at_fitted}  acc {self.val_acc:6.2%}"
        compiled = f"  (compile {self.compile_seconds:.1f}s)" if self.compile_seconds else ""
        return (
            f"{label} epoch {self.epoch:>3}/{epochs}  lr {self.start_lr:.2e}  "
            f"train {self.train_loss:.4f}  {val}  "
            f"{self.images_per_s:,.0f} img/s  {self.seconds:.1f}s{compiled}"
        )


class TrainPass(NamedTuple):
    """One pass over the training batches."""

    loss: float  # mean
    accuracy: float
    images: int


@dataclass(frozen=True)
class Evaluation:
    """The held-out score of a model: plain cross-entropy on the true labels, accuracy, and
    the cross-entropy at the one temperature that suits these predictions best."""

    loss: float
    acc: float
    calibrated_loss: float
    temperature: float


@dataclass(frozen=True)
class DeviceRecipe:
    """How a device trains, decided once and handed to the loaders and the Trainer: bf16
    autocast in channels_last where bf16 is computed in hardware, fp32 contiguous elsewhere."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format

    @classmethod
    def for_device(cls, device: torch.device | str) -> DeviceRecipe:
        device = torch.device(device)
        fast = _has_native_bf16(device)
        return cls(
            device=device,
            autocast_dtype=torch.bfloat16 if fast else None,
            memory_format=torch.channels_last if fast else torch.contiguous_format,
        )

    @property
    def channels_last(self) -> bool:
        return self.memory_format == torch.channels_last


class Trainer:
    """Trains ``model`` with ``cfg`` on ``recipe``'s device.

    compile_mode: "auto" with a ``compile_policy`` (a search trial) starts eager and switches
    to compiled after the first epoch at which the policy says compiling pays; "auto" without
    one (final training: long) compiles on CUDA from the start and runs eagerly elsewhere (a
    cold compile costs a CPU as much time as tens of thousands of training images); "on"
    compiles anywhere; "off" never. compile_seconds says how long compiling took.
    fused_blocks: run each backbone's K blocks as one grouped stack; None = yes (faster on
    GPUs, no slower on CPUs). Ignored for models without the option.
    calibrated_score: the study scores validation at a fitted temperature, so the plateau
    schedule watches that score too: one notion of "validation got worse" per study.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        steps_per_epoch: int,
        recipe: DeviceRecipe,
        compile_mode: str = DEFAULT_COMPILE_MODE,
        fused_blocks: bool | None = None,
        compile_policy: CompilePolicy | None = None,
        eval_views: EvalViews | None = None,
        calibrated_score: bool = False,
    ):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.cfg = cfg
        self.compile_mode = compile_mode
        self.device = recipe.device
        self.autocast_dtype = recipe.autocast_dtype
        self.memory_format = recipe.memory_format
        if self.device.type == "cuda":
            _tune_cuda()
        self.model = model.to(self.device, memory_format=self.memory_format)
        if isinstance(model, BackboneNet):
            model.fused = True if fused_blocks is None else fused_blocks
        self.optimizer = build_optimizer(model, cfg, self.device)
        # Validated, checkpointed, exported and tested in place of the model, where on.
        self.average = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.eval_views = eval_views
        self.calibrated_score = calibrated_score
        self.optimizer.zero_grad(set_to_none=True)  # the steps expect no gradients left over
        self.scheduler = _build_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.epoch = 0
        # Decides, epoch by epoch, whether an eager run switches to compiled ("auto" only).
        self.compile_policy = compile_policy if compile_mode == "auto" else None
        self.compiled = False
        # Compiled function -> (seconds, images) of its first call, where torch compiles it.
        self._first_calls: dict[str, tuple[float, int]] = {}
        self._train_loss: Callable[..., torch.Tensor] = _train_loss
        self._eval_logits: Callable[..., torch.Tensor] = _eval_logits
        self._eager_images_per_s: float | None = None  # the last eager epoch's, to learn from
        long_run = compile_mode == "auto" and compile_policy is None and self.device.type == "cuda"
        if compile_mode == "on" or long_run:
            self.start_compiling()

    def start_compiling(self) -> None:
        """Run the following steps compiled. The module, its parameters and the optimizer are
        the same objects either way, so this may happen between any two epochs."""
        if self.compiled:
            return
        mode = _compile_mode(self.model, self.cfg.batch_size, self.device)
        _forget_other_models(self.model, mode)
        self._train_loss = _CompiledForOneShape(_train_loss, mode)
        self._eval_logits = _CompiledForOneShape(_eval_logits, mode)
        self.compiled = True

    def fit(self, train: Batches, val: Batches | None) -> Iterator[EpochStats]:
        """Train up to cfg.epochs, yielding after each epoch (the caller may stop early)."""
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            start_lr = self.optimizer.param_groups[0]["lr"]
            compiled_before = set(self._first_calls)
            train_loss, train_acc, images = self.train_epoch(train)
            train_seconds = time.perf_counter() - start
            held_out = self.evaluation(val) if val is not None else None
            eval_seconds = time.perf_counter() - start - train_seconds
            self._end_epoch(self._watched_loss(held_out, train_loss))
            compiled = {k: v for k, v in self._first_calls.items() if k not in compiled_before}
            # The step that compiled says nothing about speed: leave it out where others ran.
            first_seconds, first_images = compiled.get("train", (0.0, 0))
            rate_images, rate_seconds = images, train_seconds
            if images > first_images:
                rate_images, rate_seconds = images - first_images, train_seconds - first_seconds
            stats = EpochStats(
                epoch=self.epoch,
                train_loss=train_loss,
                train_acc=train_acc,
                val_loss=held_out and held_out.loss,
                val_acc=held_out and held_out.acc,
                val_calibrated_loss=held_out and held_out.calibrated_loss,
                seconds=time.perf_counter() - start,
                images_per_s=rate_images / rate_seconds,
                lr=self.optimizer.param_groups[0]["lr"],
                start_lr=start_lr,
                compile_seconds=sum(seconds for seconds, _ in compiled.values()),
                train_seconds=train_seconds - first_seconds,
                eval_seconds=eval_seconds - compiled.get("eval", (0.0, 0))[0],
            )
            self._consult_policy(stats, learn=images > first_images)
            yield stats

    def _watched_loss(self, held_out: Evaluation | None, train_loss: float) -> float:
        """What the plateau schedule watches: the study's validation score, or the training
        loss where there is no validation (the final run)."""
        if held_out is None:
            return train_loss
        return held_out.calibrated_loss if self.calibrated_score else held_out.loss

    def _consult_policy(self, stats: EpochStats, learn: bool) -> None:
        """Switch to compiled once it pays; after the first compiled epoch, tell the policy
        what compiling cost and gained, for this worker's later trials."""
        policy = self.compile_policy
        if policy is None:
            return
        if not self.compiled:
            self._eager_images_per_s = stats.images_per_s
            if policy.pays(stats.epoch, stats.seconds, self.cfg.epochs):
                self.start_compiling()
        elif stats.compile_seconds and learn and self._eager_images_per_s:
            policy.learn(stats.compile_seconds, stats.images_per_s / self._eager_images_per_s)

    def train_epoch(self, batches: Batches) -> TrainPass:
        """One pass over ``batches``: the mean training loss and accuracy, the images seen."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        images = 0
        for x, y in batches:
            with self._timing_first_call("train", len(y)):
                loss, right = self._train_step(x, y)
            loss_sum += loss.float() * len(y)
            correct += right
            images += len(y)
        loss_total, correct_total = torch.stack([loss_sum, correct]).tolist()  # the one wait
        mean_loss = loss_total / max(images, 1)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"training loss is {mean_loss} in epoch {self.epoch + 1}")
        return TrainPass(mean_loss, correct_total / max(images, 1), images)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, right = self._train_loss(
            self.model, self._format(x), y, self.autocast_dtype, self.cfg.label_smoothing
        )
        loss.backward()
        if self.cfg.grad_clip > 0:
            # Clipped by value, as in the tutorial code the report's grad_clip=0.1 comes from.
            nn.utils.clip_grad_value_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        # Dropped now, not before the next backward: under CUDA graphs the gradients live in
        # memory that the next replay overwrites.
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.scheduler in PER_STEP_SCHEDULERS:
            self.scheduler.step()
        return loss.detach(), right

    @property
    def evaluated_model(self) -> nn.Module:
        """What is validated, checkpointed as the result, exported and tested: the average of
        the weights where the recipe keeps one, else the model."""
        return self.average.module if self.average is not None else self.model

    def evaluate(self, batches: Batches, full_precision: bool = False) -> tuple[float, float]:
        """Mean cross-entropy and accuracy over all batches, each batch the mean logits of its
        test-time views.

        full_precision: fp32 and eager, no autocast (the final test score, read once).
        """
        held_out = self._held_out_logits(batches, full_precision)
        return _loss_and_accuracy(*held_out) if held_out else (math.nan, math.nan)

    def evaluation(self, batches: Batches) -> Evaluation:
        """`evaluate`'s score, and the cross-entropy at the temperature fitted to the same
        predictions (a trial's validation: the fit is paid there only)."""
        held_out = self._held_out_logits(batches, full_precision=False)
        if not held_out:
            return Evaluation(math.nan, math.nan, math.nan, math.nan)
        return Evaluation(*_loss_and_accuracy(*held_out), *calibrated_cross_entropy(*held_out))

    @torch.no_grad()
    def _held_out_logits(
        self, batches: Batches, full_precision: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The evaluated model's logits over all batches (averaged over the test-time views),
        and the labels; None where there were no batches."""
        model = self.evaluated_model.eval()
        dtype = None if full_precision else self.autocast_dtype
        logits_of = _eval_logits if full_precision else self._eval_logits
        outputs, labels = [], []
        for x, y in batches:
            views = self.eval_views(x) if self.eval_views is not None else [x]
            with self._timing_first_call("eval", len(y)):
                logits = sum(logits_of(model, self._format(view), dtype) for view in views)
            outputs.append(logits / len(views))
            labels.append(y)
        return (torch.cat(outputs), torch.cat(labels)) if outputs else None

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        # A no-op when the loader already delivers this layout.
        return x.contiguous(memory_format=self.memory_format)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first call of each compiled function: compiling, mostly."""
        return sum(seconds for seconds, _ in self._first_calls.values())

    @contextmanager
    def _timing_first_call(self, name: str, images: int) -> Iterator[None]:
        # Timing needs a wait for the device; it happens once per compiled function.
        if not self.compiled or name in self._first_calls:
            yield
            return
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._first_calls[name] = (time.perf_counter() - start, images)

    def _end_epoch(self, monitored_loss: float) -> None:
        self.epoch += 1
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored_loss)
        elif self.scheduler is not None and self.cfg.scheduler not in PER_STEP_SCHEDULERS:
            self.scheduler.step()  # step, or a replayed plateau

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "average": self.average.state_dict() if self.average is not None else None,
            # Dropout draws from it: restored, a resumed run repeats the uninterrupted one.
            "rng": _rng_state(self.device),
            # Compiled and eager steps draw dropout differently: a resume keeps the decision.
            "compiled": self.compiled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _lay_out_like_parameters(self.optimizer)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.epoch = state["epoch"]
        if "rng" in state:  # checkpoints written before it was saved have none
            _set_rng_state(self.device, state["rng"])
        if state.get("compiled") and self.compile_mode != "off":
            self.start_compiling()


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each state tensor its parameter's memory layout. A checkpoint keeps the strides it
    was written with (contiguous, or channels_last where bf16 is native), and the fused AdamW
    kernel pairs state and parameter element by element in memory: resumed under the other
    layout, moments would meet the wrong weights."""
    for param, state in optimizer.state.items():
        for key, value in list(state.items()):
            per_element = isinstance(value, torch.Tensor) and value.shape == param.shape
            if per_element and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _train_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's loss to step on: cross-entropy against labels, or against label
    probabilities where batches are mixed; and how many images the model got right (against
    a mixed image's larger share)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
    labels = y if y.dim() == 1 else y.argmax(1)
    right = (logits.argmax(1) == labels).sum()
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), right


def _loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    loss, accuracy = torch.stack(
        [F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()]
    ).tolist()  # one wait
    return loss, accuracy


def _eval_logits(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        return model(x).float()


class _CompiledForOneShape:
    """``fn`` compiled for the first input shape it sees; other shapes (a last, partial
    batch) run eagerly, so nothing recompiles and no dynamic-shape code is generated."""

    def __init__(self, fn: Callable[..., Any], mode: str):
        self.eager = fn
        self.compiled = torch.compile(fn, mode=mode, dynamic=False)
        self.cuda_graphs = mode == "reduce-overhead"
        self.shape: torch.Size | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor, *args: Any) -> Any:
        if self.shape is None:
            self.shape = x.shape
        if x.shape != self.shape:
            return self.eager(model, x, *args)
        if self.cuda_graphs:
            # Each call is a new step: the previous step's outputs have all been consumed.
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(model, x, *args)


def _compile_mode(model: nn.Module, batch_size: int, device: torch.device) -> str:
    """CUDA graphs for steps small enough to be launch-bound; inductor's default otherwise."""
    if device.type != "cuda" or not isinstance(model, BackboneNet):
        return "default"
    small = train_step_flops(model, batch_size) < CUDA_GRAPH_MAX_STEP_FLOPS
    return "reduce-overhead" if small else "default"


# What this process last compiled for; None once forgotten (nothing compiled since).
_last_compiled: tuple[Any, ...] | None = None


def _forget_other_models(model: nn.Module, mode: str) -> None:
    """Drop torch.compile's in-memory cache when a worker moves to another architecture.

    Compiled code is cached per Python function, at most 8 variants before torch falls
    back to eager for good; trials of a search rarely repeat an architecture. A search worker
    forgets it all after each trial anyway (forget_compiled, search/training/memory.py); the next
    compile goes through inductor's on-disk cache, fast where layer shapes repeat.
    """
    global _last_compiled
    key = (getattr(model, "config", type(model)), getattr(model, "fused", None), mode)
    if key != _last_compiled:
        torch.compiler.reset()
        _last_compiled = key


def forget_compiled() -> None:
    """Drop what torch.compile holds in memory (compiled code, which refers to the model it
    traced, and CUDA-graph memory pools), if anything compiled since the last call."""
    global _last_compiled
    if _last_compiled is not None:
        torch.compiler.reset()  # torch._dynamo.reset: code caches and CUDA-graph trees
        _last_compiled = None


def _has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 is computed in hardware, not emulated (where emulated, it is slower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def _tune_cuda() -> None:
    # Process-wide flags; a worker process trains one trial at a time, so that is fine.
    # Shapes are fixed for a whole run: find the fastest convolution algorithms once.
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(device: torch.device, state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> Any:
    args = cfg.schedule
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.scheduler == "plateau" and cfg.lr_by_epoch:
        return _replay(optimizer, cfg)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=args.factor, patience=args.patience
        )
    if cfg.scheduler == "onecycle":
        # torch divides by the warm-up's steps less one: a warm-up of exactly one step (a tiny
        # run) would divide by zero; a hair longer gives the same rates.
        one_step = args.pct_start * total_steps == 1
        pct_start = math.nextafter(args.pct_start, 1) if one_step else args.pct_start
        # cycle_momentum off: SGD's momentum stays the drawn one (torch's default would cycle
        # it, and AdamW's beta1, through 0.85-0.95 whatever the trial drew; docs/SEARCH.md).
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=float(pct_start),
            cycle_momentum=False,
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=cfg.lr * args.min_lr_ratio
        )
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=args.step_size, gamma=args.gamma
        )
    return None


def _replay(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    """The LR a search trial followed, epoch by epoch, stretched over this run's epochs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cfg.replayed_lr(e) / cfg.lr)
