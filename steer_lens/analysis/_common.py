"""Helpers shared by the analyses (private to :mod:`steer_lens.analysis`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from steer_lens.errors import EmptyInputError, MetricError

__all__ = ["number", "text_tokens"]


def text_tokens(
    steered, texts: str | Sequence[str]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Texts as left-padded tokens (BOS prepended, cut to ``n_ctx``): ``(tokens, attention_mask, keep)``.

    ``keep`` marks the content tokens: real tokens other than BOS, whose outsized norm would dominate
    per-token statistics.

    Raises:
        EmptyInputError: no texts.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise EmptyInputError("texts: got none; give at least one text.")
    n_ctx = int(steered.cfg.n_ctx)
    seqs = [steered.to_tokens(t)[:n_ctx] for t in texts]
    tokens, mask = steered.left_pad(seqs)
    keep = mask.bool().clone()
    first = mask.argmax(1)
    keep[torch.arange(len(seqs)), first] = False  # BOS: outsized norm, not a content token
    return tokens, mask, keep


def number(evaluate: Callable[..., object], steered) -> float:
    """``float(evaluate(steered))``, checked: one finite number (an accuracy, a rate ...).

    Raises:
        MetricError: ``evaluate`` returned a non-number or a non-finite value.
    """
    value = evaluate(steered)
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise MetricError(f"evaluate returned {type(value).__name__}; expected one number (e.g. an accuracy).") from e
    if not math.isfinite(value):
        raise MetricError(f"evaluate returned {value}; expected a finite number.")
    return value
