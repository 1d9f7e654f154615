"""The optimisation loop shared by every objective (SFT, RL, LoRA training): AdamW over the trained weights only.

An objective supplies ``step_fn(step) -> (loss, metrics)`` and what it trains (a
:class:`~steer_lens.train.trainable.Trainable`: a SteeredTransformer's vectors, or a LoRA's A and B);
:func:`run_loop` does the rest: per-hook learning rates, warm-up, gradient clipping, an optional max-norm projection, a tqdm progress bar,
JSONL metrics, checkpoints (atomic, resumable), and a NaN/inf guard that restores the last finite
state and stops with :class:`~steer_lens.errors.TrainingDivergedError`.

**Learning-rate units.** Residual norms differ by one to two orders of magnitude between hooks (on
TinyStories-656K the median per-token norm is ≈ 5.5 at ``blocks.0.hook_resid_pre`` and ≈ 160 at
``blocks.1.hook_resid_pre``), and Adam's step is about ``lr`` per coordinate whatever the gradient's
size. So with ``lr_units="relative"`` (the default) each hook's learning rate is ``lr`` times that
hook's typical per-coordinate residual RMS, ``median_t ||x_t|| / sqrt(d_model)``, measured on the
training data with the vectors off before the first step. One ``lr`` then means the same relative
step at every hook. ``lr_units="absolute"`` uses ``lr`` as given.

The loop synchronises with the device once per optimisation step (to log and to check finiteness);
nothing inside a step does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.config_types import check_field_types
from steer_lens.errors import ConfigError, TrainingDivergedError
from steer_lens.train import distributed
from steer_lens.train.checkpoints import RunState, load_checkpoint, save_checkpoint
from steer_lens.train.trainable import Trainable, as_trainable

__all__ = [
    "OptimConfig",
    "RunState",
    "TrainResult",
    "accumulate_gradients",
    "check_micro_batch_size",
    "is_int",
    "load_checkpoint",
    "micro_batches",
    "progress_fields",
    "require",
    "run_loop",
    "save_checkpoint",
    "typical_resid_rms",
]

logger = logging.getLogger(__name__)

StepFn = Callable[[int], tuple[Tensor, dict[str, Tensor]]]


def require(cond: bool, field_name: str, value: Any, expected: str) -> None:
    """Raise :class:`~steer_lens.errors.ConfigError` "``field: expected X, got Y.``" unless ``cond``.

    The one config check of the training configs (``OptimConfig``, ``SFTConfig``, ``RLConfig``,
    ``LoraTrainConfig``).

    Raises:
        ConfigError: ``cond`` is false.
    """
    if not cond:
        raise ConfigError(f"{field_name}: expected {expected}, got {value!r}.")


def is_int(x: object) -> bool:
    """Whether ``x`` is an ``int`` (and not a ``bool``)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_micro_batch_size(value: object) -> None:
    """Validate a ``micro_batch_size`` setting: ``None`` (no splitting) or an int ``>= 1``.

    Raises:
        ConfigError: anything else (the message says what to pass instead).
    """
    if value is not None and not (is_int(value) and value >= 1):
        raise ConfigError(
            f"micro_batch_size: expected None (the whole batch in one forward) or an int >= 1 "
            f"(sequences per forward/backward), got {value!r}. Fix: micro_batch_size=None, or e.g. 4."
        )


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row slices that split a batch of ``n`` sequences into consecutive micro-batches of ``<= size``.

    ``size=None`` (or ``size >= n``) gives the one slice ``[0, n)``; the last micro-batch may be
    smaller. Gradient accumulation over these slices is :func:`accumulate_gradients`.

    Raises:
        ConfigError: ``size`` is neither ``None`` nor an int ``>= 1``.
    """
    check_micro_batch_size(size)
    if size is None or size >= n:
        return [slice(0, n)]
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def accumulate_gradients(
    chunks: Sequence[slice],
    chunk_loss: Callable[[slice], tuple[Tensor, dict[str, Tensor]]],
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """Gradient accumulation inside a ``step_fn`` of :func:`run_loop`: one forward/backward per micro-batch.

    ``chunk_loss(rows)`` returns the loss of the sequences ``rows`` **already normalised by the
    whole batch** (e.g. a sum over that micro-batch's target tokens divided by the number of target
    tokens of the whole batch), so that the micro-batch losses add up to the full-batch loss and
    their gradients to the full-batch gradient. The backward pass of every micro-batch but the last
    runs here (so only one micro-batch's activations are alive at a time); the last one's loss is
    returned with its graph, and :func:`run_loop`'s own ``loss.backward()`` adds its gradient
    (``run_loop`` zeroes the gradients before calling ``step_fn``). This is how verl splits a
    mini-batch: ``agg_loss(..., batch_num_tokens=...)`` divides each micro-batch's token sum by the
    token count of the global batch (volcengine/verl ``verl/trainer/ppo/core_algos.py:1055-1058``
    at b178a3c; the split in ``verl/workers/actor/dp_actor.py:550-560``).

    Args:
        chunks: row slices, from :func:`micro_batches`.
        chunk_loss: ``rows -> (loss, metrics)``; metrics must also be full-batch-normalised scalars
            (they are summed over micro-batches).

    Returns:
        ``(loss, metrics)``: the summed loss (its value is the full-batch loss; only the last
        micro-batch's term carries a graph) and the summed metrics (detached).
    """
    total: Tensor | None = None
    sums: dict[str, Tensor] = {}
    for i, rows in enumerate(chunks):
        loss, metrics = chunk_loss(rows)
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach()
            sums[k] = v if k not in sums else sums[k] + v
        if i < len(chunks) - 1:
            loss.backward()
            loss = loss.detach()
        total = loss if total is None else loss + total
    if total is None:
        raise ConfigError("accumulate_gradients: got no micro-batches. Fix: pass micro_batches(n, size) with n >= 1.")
    return total, sums


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimisation settings shared by :class:`~steer_lens.train.SFTConfig` and ``RLConfig``.

    Attributes:
        steps: optimisation steps (>= 1).
        lr: learning rate; in units of each hook's residual RMS when ``lr_units="relative"``.
        lr_units: ``"relative"`` (default; see the module docstring) or ``"absolute"``.
        weight_decay: AdamW weight decay on the vectors.
        betas: AdamW betas.
        grad_clip: max global gradient norm (``None``: no clipping).
        warmup_steps: linear warm-up from 0 to ``lr`` over this many steps.
        max_norm: after each step, project every vector onto the ball of this radius (residual
            units; ``None``: no bound).
        seed: seed of data order and sampling; the same seed gives the same run on the CPU.
        checkpoint_dir: folder for checkpoints (``None``: none).
        checkpoint_every: save every this many steps (0: only at the end or on interruption).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
        log_path: JSONL file receiving one line of metrics per step (``None``: none).
        progress: show a tqdm progress bar with at most four fields (:func:`progress_fields`:
            ``loss``, ``reward``, ``kl``, ``heldout_loss``, else ``grad_norm``); every metric goes to
            ``log_path`` and the result's ``metrics``.
    """

    steps: int = 200
    lr: float = 1e-2
    lr_units: Literal["relative", "absolute"] = "relative"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    max_norm: float | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    log_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        require(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "an int >= 1")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a positive finite float")
        require(self.lr_units in ("relative", "absolute"), "lr_units", self.lr_units,
               "'relative' or 'absolute'")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a float >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
               "two floats in [0, 1)")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "None or > 0")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an int >= 0")
        require(self.max_norm is None or self.max_norm > 0, "max_norm", self.max_norm, "None or > 0")
        require(0 <= self.seed < 2**63, "seed", self.seed, "an int in [0, 2**63)")
        require(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an int >= 0")
        require(not self.resume or self.checkpoint_dir is not None, "resume", self.resume,
               "False unless checkpoint_dir is set (resume reads checkpoint_dir)")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass(frozen=True)
class TrainResult:
    """What a training run returns: per-step metrics on the CPU.

    Attributes:
        metrics: ``{name: Float[Tensor, "steps"]}``, e.g. ``"loss"`` (nats/token), ``"lr"``,
            ``"grad_norm"``, ``"norm/<hook>"`` (vector norms); NaN where a metric was not computed
            at a step (e.g. held-out loss between evaluations).
        config: the config the run used, as a dict.
        resid_rms: the per-hook residual RMS used for relative learning rates.
        seconds: wall-clock time of the run.
        objective: ``"sft"``, ``"rl"`` ...
    """

    metrics: dict[str, Float[Tensor, " steps"]]
    config: dict[str, Any]
    resid_rms: dict[str, float]
    seconds: float
    objective: str = "sft"

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return int(next(iter(self.metrics.values())).shape[0]) if self.metrics else 0

    @property
    def losses(self) -> Float[Tensor, " steps"]:
        """The ``"loss"`` metric per step."""
        return self.metrics["loss"]

    def to_pandas(self):
        """The metrics as a ``pandas.DataFrame`` indexed by step."""
        import pandas as pd

        df = pd.DataFrame({k: v.numpy() for k, v in self.metrics.items()})
        df.index.name = "step"
        return df

    def plot(self, metrics: Sequence[str] | None = None):
        """Plotly figure: one panel per metric against the step (loss first)."""
        from steer_lens.plotting import metric_panels

        names = list(metrics) if metrics is not None else [k for k in self.metrics if k != "lr"]
        return metric_panels(
            {k: self.metrics[k] for k in names}, title=f"{self.objective.upper()} training"
        )

    def _repr_html_(self) -> str:
        last = {k: float(v[~torch.isnan(v)][-1]) for k, v in self.metrics.items() if (~torch.isnan(v)).any()}
        rows = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in last.items())
        return (f"<b>{self.objective.upper()} run</b>: {self.steps} steps in {self.seconds:.1f} s"
                f"<table><tr><th>metric</th><th>last</th></tr>{rows}</table>")


@torch.no_grad()
def typical_resid_rms(
    steered,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, float]:
    """Typical per-coordinate residual RMS at each steered hook: ``median_t ||x_t|| / sqrt(d_model)``.

    Measured with the vectors off, over real tokens only (padding and each sequence's first token,
    usually BOS with an outsized norm, are left out).

    Args:
        steered: the :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, pos]`` token ids.
        attention_mask: ``[batch, pos]`` 1 for real tokens (``None``: all real).

    Returns:
        ``{hook_name: rms}`` in residual-stream units.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    attention_mask = attention_mask.to(tokens.device)
    keep = attention_mask.bool().clone()
    first = attention_mask.long().argmax(dim=1)  # first real token per row
    keep[torch.arange(tokens.shape[0], device=tokens.device), first] = False
    if not keep.any():
        keep = attention_mask.bool()
    names = list(steered.hook_names)
    with steered.disabled():
        _, cache = steered.run_with_cache(tokens, attention_mask=attention_mask, names_filter=names,
                                          return_type=None)
    d = int(steered.cfg.d_model)
    out = {}
    for h in names:
        norms = cache[h].float().norm(dim=-1)[keep]
        out[h] = float(norms.median()) / math.sqrt(d)
    return out


# ---------------------------------------------------------------------------------------------------
# checkpoints: step-NNNNNN folders plus a `latest.json` pointer written last (atomically)
# ---------------------------------------------------------------------------------------------------
class _Run:
    """One run of :func:`run_loop`: the optimiser, history, log file and checkpoints of a target."""

    def __init__(self, target: Trainable, config: OptimConfig, resid_rms: dict[str, float],
                 objective: str, all_config: dict[str, Any], state: RunState | None = None,
                 sharded: bool = False) -> None:
        self.target, self.config, self.resid_rms, self.state = target, config, resid_rms, state
        self.sharded = sharded  # distributed: gradients of globally normalised shards are summed, else averaged
        self.objective, self.all_config = objective, all_config
        relative = config.lr_units == "relative"
        self.groups = target.param_groups(config.lr, resid_rms if relative else None)
        self.opt = torch.optim.AdamW(self.groups, lr=config.lr, betas=config.betas,
                                     weight_decay=config.weight_decay)
        self.params = [p for g in self.groups for p in g["params"]]
        self.history: dict[str, list[float]] = {}
        self.ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        self.log_file = None

    def resume(self) -> int:
        """Load the latest checkpoint when ``resume`` is set; open the JSONL log. Returns the first step."""
        start = 0
        if self.ckpt_dir is not None and self.config.resume:
            loaded = load_checkpoint(self.ckpt_dir, self.target, self.opt, self.state)
            if loaded is not None:
                start, self.history, self.resid_rms = loaded
                logger.info("resumed from %s at step %d", self.ckpt_dir, start)
        distributed.broadcast_parameters(self.params)  # distributed: every rank starts from rank 0's weights
        if self.config.log_path and distributed.is_main_process():
            Path(self.config.log_path).parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.config.log_path, "a" if start else "w")
        return start

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint at ``step`` when the run has a ``checkpoint_dir`` (rank 0 only when distributed)."""
        if self.ckpt_dir is not None and distributed.is_main_process():
            save_checkpoint(self.ckpt_dir, step, self.target, self.opt, self.history, self.resid_rms,
                            self.all_config, self.state)

    def gradient(self, step: int, step_fn: StepFn) -> tuple[list[str], Tensor]:
        """Warm-up lr, the step's loss and backward pass: ``(names, values)`` with ``values[-1]`` = finite."""
        config = self.config
        warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * warm
        self.opt.zero_grad(set_to_none=True)
        with _recording(self.target):  # steered calls record the graph into the vectors only in here
            loss, metrics = step_fn(step)
            loss.backward()
        # distributed: one all_reduce of the gradients and the loss (a no-op on one process)
        loss = distributed.all_reduce_gradients(self.params, loss.detach(), average=not self.sharded)
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
            if grads else torch.zeros((), device=loss.device)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm)
        names = ["loss", "grad_norm", *metrics]
        values = torch.stack([loss.detach().float(), gnorm.float(),
                              *[torch.as_tensor(m, device=loss.device).detach().float().reshape(())
                                for m in metrics.values()], finite.float()]).cpu()  # one sync per step
        return names, values

    def update(self) -> None:
        """Clip, take the AdamW step, and project onto ``max_norm``."""
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.opt.step()
        if self.config.max_norm is not None:
            self.target.clamp_norm_(self.config.max_norm)

    def record(self, step: int, names: list[str], values: Tensor) -> dict[str, float]:
        """Append the step's metrics to the history and the JSONL log; returns the row."""
        row = dict(zip(names, values[:-1].tolist(), strict=True))
        row["lr"] = self.opt.param_groups[0]["lr"]
        for h, n in self.target.norms().items():
            row[f"norm/{h}"] = n
        _append_row(self.history, row)
        if self.log_file is not None:
            self.log_file.write(json.dumps({"step": step, **row}) + "\n")
            self.log_file.flush()
        return row

    def diverged(self, step: int, values: Tensor) -> TrainingDivergedError:
        """The error of a non-finite step (after a checkpoint of the restored state)."""
        self.checkpoint(step)
        return TrainingDivergedError(
            f"{self.objective}: loss or gradient became non-finite at step {step} "
            f"(loss={float(values[0])}, grad_norm={float(values[1])}). The {self.target.kind} were "
            "restored to the last finite state. Fix: lower lr, set grad_clip / max_norm, or check the data."
        )


def run_loop(
    steered,
    step_fn: StepFn,
    config: OptimConfig,
    *,
    resid_rms: dict[str, float],
    objective: str = "sft",
    extra_config: dict[str, Any] | None = None,
    state: RunState | None = None,
    sharded: bool = False,
) -> TrainResult:
    """Optimise ``steered.vectors`` (or any :class:`~steer_lens.train.trainable.Trainable`) with AdamW.

    ``step_fn(step)`` must build its batch deterministically from ``step`` (and the config's seed)
    so that a resumed run sees the same data as an uninterrupted one. It returns the scalar loss
    (with gradients into the trained weights) and a dict of scalar metric tensors (kept on the device).

    Args:
        steered: the :class:`~steer_lens.SteeredTransformer` whose vectors are trained, or a
            :class:`~steer_lens.train.trainable.Trainable` (e.g. a LoRA's parameters).
        step_fn: the objective for one step.
        config: optimisation settings.
        resid_rms: per-hook residual RMS (from :func:`typical_resid_rms`) for relative lrs.
        objective: a name for logs and the result.
        extra_config: the objective's own settings, saved with checkpoints and the vectors.
        state: what the objective carries between steps (a :class:`RunState`), saved with every
            checkpoint and restored on resume (RL passes its rollouts and estimator state).
        sharded: under ``torch.distributed`` (:mod:`steer_lens.train.distributed`), whether
            ``step_fn`` computes only this process's shard of the batch, normalised by the global
            batch: the processes' gradients and losses are then summed; otherwise (every process
            computes the whole objective) averaged. One all_reduce per step either way; only rank 0
            writes checkpoints, the JSONL log and the progress bar. Ignored on one process.

    Returns:
        A :class:`TrainResult`; the weights are left at their final values, and
        ``steered.training_config`` records the run.

    Raises:
        TrainingDivergedError: the loss or a gradient became non-finite; the weights are restored
            to the last finite state (and checkpointed when ``checkpoint_dir`` is set).
        IncompatibleVectorError: ``resume=True`` with a checkpoint made for other hooks.

    Any other exception from ``step_fn`` (a reward or metric that raises, ``KeyboardInterrupt``, an
    ``OSError``) propagates after the weights are restored to the last completed step and, with
    ``checkpoint_dir``, that step is checkpointed (so ``resume=True`` continues from it).
    """
    from tqdm.auto import tqdm

    target = as_trainable(steered)
    all_config = {"optim": config.to_dict(), **(extra_config or {}), "objective": objective}
    run = _Run(target, config, resid_rms, objective, all_config, state, sharded)
    start = run.resume()
    good = target.snapshot()
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc=objective, disable=not config.progress or not distributed.is_main_process(), leave=False)
    try:
        for step in range(start, config.steps):
            names, values = run.gradient(step, step_fn)
            if values[-1] < 0.5:
                target.restore(good)
                raise run.diverged(step, values)
            run.update()
            good = target.snapshot()
            run.record(step, names, values)
            bar.set_postfix(progress_fields(run.history), refresh=False)
            bar.update(1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                run.checkpoint(step + 1)
    except TrainingDivergedError:
        raise  # restored and checkpointed already (`run.diverged`)
    except BaseException as err:  # an interrupt, a reward that raised, a full disk ...: keep the last good state
        target.restore(good)
        if run.ckpt_dir is not None:
            try:
                run.checkpoint(len(run.history.get("loss", [])) or start)
                logger.warning("%s: checkpoint of the last good step saved in %s", type(err).__name__, run.ckpt_dir)
            except Exception as ckpt_err:  # the original error matters more; say why no checkpoint
                logger.error("could not save a checkpoint after %s: %s", type(err).__name__, ckpt_err)
        raise
    finally:
        bar.close()
        if run.log_file is not None:
            run.log_file.close()
    run.checkpoint(config.steps)
    target.record({**all_config, "resid_rms": run.resid_rms})
    return TrainResult(
        metrics={k: torch.tensor(v, dtype=torch.float32) for k, v in run.history.items()},
        config=all_config,
        resid_rms=dict(run.resid_rms),
        seconds=time.perf_counter() - t0,
        objective=objective,
    )


PROGRESS_FIELDS: tuple[str, ...] = ("loss", "reward", "kl", "heldout_loss", "grad_norm")
"""The metrics the progress bar shows, in this order, at most :data:`PROGRESS_MAX` of those logged."""

PROGRESS_MAX = 4
"""At most this many fields on the progress bar (the rest are in ``log_path`` / ``TrainResult.metrics``)."""


def progress_fields(history: dict[str, list[float]]) -> dict[str, str]:
    """The progress bar's fields: the first :data:`PROGRESS_MAX` of :data:`PROGRESS_FIELDS` that were
    logged, each at its last finite value (so ``heldout_loss`` stays shown between evaluations), as
    3-significant-digit strings. Every other metric is left to the JSONL log."""
    out: dict[str, str] = {}
    for name in PROGRESS_FIELDS:
        last = next((v for v in reversed(history.get(name, [])) if not math.isnan(v)), None)
        if last is not None:
            out[name] = f"{last:.3g}"
        if len(out) == PROGRESS_MAX:
            break
    return out


def _recording(target: Trainable) -> contextlib.AbstractContextManager:
    """``steered.gradients()`` of a wrapper's vectors (its calls record no graph outside it), else a no-op."""
    steered = getattr(target, "steered", None)
    return steered.gradients() if hasattr(steered, "gradients") else contextlib.nullcontext()


def _append_row(history: dict[str, list[float]], row: dict[str, float]) -> None:
    """Append one step's metrics; a metric missing at a step (or new since) is NaN there."""
    n = len(history["loss"]) if "loss" in history else 0
    for k in row:
        history.setdefault(k, [math.nan] * n)
    for k, col in history.items():
        col.append(row.get(k, math.nan))
