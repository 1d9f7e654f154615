"""Patching metrics: functions of the logits that say how far a run has moved towards an answer.

A metric maps logits ``[batch, pos, d_vocab]`` to a number. The factories here return a
:class:`Metric`, which knows its value *per sequence* (``metric.per_sequence(logits) -> [batch]``)
and reduces over the batch with a mean when called (``metric(logits) -> scalar``), so the same object
works with TransformerLens's ``patching.get_act_patch_*`` (which wants a scalar) and with the batched
sweeps of :mod:`steer_lens.patching`, which evaluate many patched copies of the batch in one forward
pass and need one value per copy.

Any plain callable ``logits -> scalar`` (or ``-> [batch]``, then averaged) is accepted as well; the
sweeps call it once per patched copy on that copy's ``[batch, pos, d_vocab]`` slice, on the device,
and read every value back once at the end.

Targets given per sequence (``correct=[batch]``) are tiled when the logits hold several copies of the
batch (``[k * batch, ...]``), so a metric built for the clean batch is valid for the patched sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError, ShapeMismatchError

__all__ = ["Metric", "MetricFn", "kl_to", "logit_diff", "logprob", "prob_change", "evaluate_metric"]

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""] | Float[Tensor, " batch"]]
"""A TransformerLens-style metric: logits ``[batch, pos, d_vocab]`` -> scalar (or ``[batch]``)."""


class Metric:
    """A metric with a per-sequence value and a batch mean.

    Args:
        per_sequence: function logits ``[batch, pos, d_vocab]`` -> ``[batch]``.
        name: label used in plots and tables.
        units: ``"logits"``, ``"nats"`` or ``"probability"``.
        last_position_only: the metric reads only the logits at the last position, so sweeps may
            compute the final norm and unembedding there only (the largest saving for big vocabularies).
        columns: the vocabulary entries whose *raw* logits are all the metric reads (sorted unique
            token ids ``[n_columns]``; no softmax over the vocabulary). With ``on_columns`` it lets the
            sweeps unembed these columns only (``x @ W_U[:, columns]``) instead of the full vocabulary.
        on_columns: the same metric as a function of the column logits ``[batch, pos, n_columns]``
            (column ``j`` holds token ``columns[j]``); required with ``columns``.

    Calling the metric returns the mean over the batch (a 0-dim tensor), like a TransformerLens metric.

    Raises:
        ConfigError: ``columns`` without ``on_columns`` or the other way round.
    """

    def __init__(
        self,
        per_sequence: Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, " batch"]],
        *,
        name: str,
        units: str,
        last_position_only: bool = False,
        columns: Int[Tensor, " n_columns"] | None = None,
        on_columns: Callable[[Float[Tensor, "batch pos n_columns"]], Float[Tensor, " batch"]] | None = None,
    ) -> None:
        if (columns is None) != (on_columns is None):
            raise ConfigError(
                "Metric: columns and on_columns go together (the token ids read, and the metric as a "
                "function of their logits). Fix: give both, or neither."
            )
        self._per_sequence = per_sequence
        self.name = name
        self.units = units
        self.last_position_only = bool(last_position_only)
        self.columns = columns
        self.on_columns = (
            None
            if on_columns is None
            else Metric(on_columns, name=name, units=units, last_position_only=last_position_only)
        )

    def per_sequence(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """The metric of each sequence, ``[batch]``."""
        return self._per_sequence(logits)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        """Mean of :meth:`per_sequence` over the batch (0-dim tensor)."""
        return self._per_sequence(logits).mean()

    def __repr__(self) -> str:
        return f"Metric({self.name}, units={self.units!r})"


def _as_ids(x: int | Sequence[int] | Tensor, what: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long) if not isinstance(x, Tensor) else x.long()
    if t.ndim > 1:
        raise ShapeMismatchError(
            f"{what}: expected a token id or a 1-D tensor [batch], got shape {list(t.shape)}."
        )
    return t


def _tile(t: Tensor, n: int, what: str, device) -> Tensor:
    """Broadcast per-sequence targets ``[batch]`` (or a scalar) to ``n`` rows (``k`` copies of the batch)."""
    t = t.to(device)
    if t.ndim == 0:
        return t.expand(n)
    if t.shape[0] == n:
        return t
    if n % t.shape[0] == 0:
        return t.repeat(n // t.shape[0])
    raise ShapeMismatchError(
        f"{what}: expected one target per sequence ({n} sequences, or a divisor of it), got {t.shape[0]}. "
        "Fix: give one target per sequence of the batch, or a single token id."
    )


def _is_last(pos) -> bool:
    return isinstance(pos, int) and pos == -1


def _pos_logits(logits: Tensor, pos: int | Tensor) -> Tensor:
    """Logits at ``pos`` (an int, or one position per sequence ``[batch]``): ``[batch, d_vocab]``."""
    if isinstance(pos, int):
        return logits[:, pos]
    p = _tile(pos, logits.shape[0], "pos", logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), p]


def logit_diff(
    correct: int | Sequence[int] | Int[Tensor, " batch"],
    wrong: int | Sequence[int] | Int[Tensor, " batch"],
    *,
    pos: int | Int[Tensor, " batch"] = -1,
) -> Metric:
    """Logit difference ``logits[pos, correct] - logits[pos, wrong]`` per sequence (units: logits).

    The standard patching metric of Wang et al. (2022, IOI) and TransformerLens's tutorials.

    Args:
        correct: the answer token id, or one per sequence ``[batch]``.
        wrong: the contrasting token id, or one per sequence.
        pos: position read (default the last; one per sequence for left-padded batches is fine too).

    Returns:
        A :class:`Metric` (call -> batch mean; ``.per_sequence`` -> ``[batch]``).

    Raises:
        ShapeMismatchError: targets are not scalars / 1-D, or do not match the batch.
    """
    c, w = _as_ids(correct, "correct"), _as_ids(wrong, "wrong")

    def make(c: Tensor, w: Tensor) -> Callable[[Tensor], Tensor]:
        def per_seq(logits: Tensor) -> Tensor:
            lg = _pos_logits(logits, pos)
            n = lg.shape[0]
            rows = torch.arange(n, device=lg.device)
            return lg[rows, _tile(c, n, "correct", lg.device)] - lg[rows, _tile(w, n, "wrong", lg.device)]

        return per_seq

    # the metric reads two raw logits per sequence: sweeps may unembed these columns only
    columns = torch.unique(torch.cat([c.reshape(-1), w.reshape(-1)]))
    return Metric(
        make(c, w),
        name="logit_diff",
        units="logits",
        last_position_only=_is_last(pos),
        columns=columns,
        on_columns=make(torch.searchsorted(columns, c.contiguous()), torch.searchsorted(columns, w.contiguous())),
    )


def logprob(
    target: int | Sequence[int] | Int[Tensor, " batch"], *, pos: int | Int[Tensor, " batch"] = -1
) -> Metric:
    """Log-probability of ``target`` at ``pos`` (units: nats; log-softmax computed in fp32 or wider).

    Args:
        target: token id, or one per sequence ``[batch]``.
        pos: position read (default the last).

    Returns:
        A :class:`Metric`.

    Raises:
        ShapeMismatchError: bad target shape.
    """
    t = _as_ids(target, "target")

    def per_seq(logits: Tensor) -> Tensor:
        lg = _pos_logits(logits, pos)
        lp = lg.float().log_softmax(-1) if lg.dtype in (torch.float16, torch.bfloat16) else lg.log_softmax(-1)
        n = lp.shape[0]
        return lp[torch.arange(n, device=lp.device), _tile(t, n, "target", lp.device)]

    return Metric(per_seq, name="logprob", units="nats", last_position_only=_is_last(pos))


def kl_to(
    reference_logits: Float[Tensor, "batch pos d_vocab"],
    *,
    pos: int | None = -1,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Metric:
    """KL divergence ``KL(reference || run)`` in nats, computed in float64.

    ``0`` when the run reproduces the reference distribution; use it to ask how far a patch moves
    the output distribution towards (denoising: reference = clean logits) or away from a run.

    Args:
        reference_logits: logits of the reference run, ``[batch, pos, d_vocab]`` (detached, copied).
        pos: position compared (default the last); ``None`` averages over all positions (masked by
            ``attention_mask`` when given).
        attention_mask: ``[batch, pos]`` 1 for real tokens, used with ``pos=None``.

    Returns:
        A float64 :class:`Metric`.

    Raises:
        ShapeMismatchError: ``reference_logits`` is not 3-D or the run's logits do not match it.
    """
    if reference_logits.ndim != 3:
        raise ShapeMismatchError(
            f"reference_logits: expected [batch, pos, d_vocab], got shape {list(reference_logits.shape)}."
        )
    ref = reference_logits.detach().double()
    ref_lp = ref.log_softmax(-1)
    if pos is not None:
        ref_lp = ref_lp[:, pos]
    mask = None if attention_mask is None else attention_mask.detach().double()

    def per_seq(logits: Tensor) -> Tensor:
        n = logits.shape[0]
        if (
            logits.shape[-1] != ref.shape[-1]
            or n % ref.shape[0]
            or (pos is None and logits.shape[1] != ref.shape[1])
        ):
            raise ShapeMismatchError(
                f"kl_to: logits of shape {list(logits.shape)} do not match the reference "
                f"{list(ref.shape)} (same pos and d_vocab, batch a multiple of {ref.shape[0]})."
            )
        k = n // ref.shape[0]
        r = ref_lp.to(logits.device)
        r = r.repeat(k, *([1] * (r.ndim - 1))) if k > 1 else r
        lp = (logits[:, pos] if pos is not None else logits).double().log_softmax(-1)
        kl = (r.exp() * (r - lp)).sum(-1)
        if pos is not None:
            return kl
        if mask is None:
            return kl.mean(-1)
        m = mask.to(logits.device)
        m = m.repeat(k, 1) if k > 1 else m
        return (kl * m).sum(-1) / m.sum(-1).clamp_min(1.0)

    return Metric(per_seq, name="kl_to_reference", units="nats", last_position_only=_is_last(pos))


def prob_change(
    tokens: int | Sequence[int] | Int[Tensor, " n_tokens"],
    *,
    reference_logits: Float[Tensor, "batch pos d_vocab"] | None = None,
    pos: int = -1,
) -> Metric:
    """Probability mass on a token set at ``pos``, minus the same mass under a reference run.

    ``sum_{t in tokens} p(t) - sum_{t in tokens} p_ref(t)`` (units: probability); without
    ``reference_logits`` it is the plain mass. Useful for a steering concept spread over several
    tokens (e.g. every token of the word "dog").

    Args:
        tokens: the token ids of the set (deduplicated).
        reference_logits: logits ``[batch, pos, d_vocab]`` of the reference run (e.g. the base run).
        pos: position read (default the last).

    Returns:
        A :class:`Metric`.

    Raises:
        ShapeMismatchError: ``tokens`` is empty or not 1-D.
    """
    ids = torch.unique(torch.as_tensor(tokens, dtype=torch.long).reshape(-1))
    if ids.numel() == 0:
        raise ShapeMismatchError("prob_change: expected at least one token id, got none.")
    base = None
    if reference_logits is not None:
        base = reference_logits.detach()[:, pos].double().softmax(-1)[:, ids].sum(-1)

    def per_seq(logits: Tensor) -> Tensor:
        p = logits[:, pos].double().softmax(-1)[:, ids.to(logits.device)].sum(-1)
        if base is None:
            return p
        return p - _tile(base, p.shape[0], "reference_logits", p.device)

    return Metric(per_seq, name="prob_change", units="probability", last_position_only=_is_last(pos))


def evaluate_metric(
    metric: MetricFn | Metric, logits: Float[Tensor, "copies_x_batch pos d_vocab"], n_copies: int
) -> Float[Tensor, " copies"]:
    """The metric of each of ``n_copies`` stacked copies of a batch, on the device (no sync).

    A :class:`Metric` is evaluated once over all copies (``per_sequence`` then a per-copy mean); a
    plain callable is called on each copy's ``[batch, pos, d_vocab]`` slice.

    Raises:
        MetricError: the metric raised, or returned something that is neither a scalar nor ``[batch]``.
    """
    n = logits.shape[0]
    batch = n // n_copies
    if isinstance(metric, Metric):
        vals = metric.per_sequence(logits)
        if vals.shape != (n,):
            raise MetricError(
                f"metric {metric.name}: per_sequence returned shape {list(vals.shape)}, expected [{n}]."
            )
        return vals.view(n_copies, batch).mean(1)
    out = []
    for chunk in logits.view(n_copies, batch, *logits.shape[1:]):
        out.append(_scalar(metric, metric(chunk), batch))
    return torch.stack(out)


def _scalar(metric: Any, value: Any, batch: int) -> Tensor:
    if not isinstance(value, Tensor):
        if isinstance(value, int | float):
            return torch.tensor(float(value))
        raise MetricError(
            f"metric {getattr(metric, '__name__', metric)!r} returned {type(value).__name__}; expected a "
            "scalar tensor (or one value per sequence, [batch]). Fix: return e.g. `values.mean()` as a tensor."
        )
    if value.ndim == 0:
        return value
    if value.shape == (batch,):
        return value.mean()
    if value.numel() == 1:
        return value.reshape(())
    raise MetricError(
        f"metric {getattr(metric, '__name__', metric)!r} returned shape {list(value.shape)}; expected a "
        f"scalar or [batch]=[{batch}]. Fix: reduce the metric over positions/vocabulary (e.g. `.mean()`)."
    )


def call_metric(metric: MetricFn | Metric, logits: Tensor) -> Tensor:
    """The metric of one batch of logits as a 0-dim tensor (batch mean for per-sequence outputs)."""
    if isinstance(metric, Metric):
        return metric(logits)
    return _scalar(metric, metric(logits), logits.shape[0])
