"""Helpers shared by the analyses (private to :mod:`steer_lens.analysis`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from steer_lens.errors import EmptyInputError, MetricError
from steer_lens.train.data import TokenIds, is_token_ids, token_ids

__all__ = ["number", "text_tokens"]


def text_tokens(
    steered, texts: str | TokenIds | Sequence[str | TokenIds]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Texts as left-padded tokens (BOS prepended, cut to ``n_ctx``): ``(tokens, attention_mask, keep)``.

    ``texts`` may also be token ids, for models without a tokenizer: a ``[n, pos]`` tensor (``n``
    sequences), a 1-D tensor or a list of ints (one sequence), or a list of those; ids are used as
    given (put the BOS id first: the first token of each sequence is left out as BOS). ``keep``
    marks the content tokens: real tokens other than BOS, whose outsized norm would dominate
    per-token statistics.

    Raises:
        EmptyInputError: no texts, or a sequence with no tokens.
        ConfigError: a text for a model without a tokenizer, or something neither text nor ids.
    """
    if isinstance(texts, str) or (isinstance(texts, Tensor) and texts.ndim <= 1) or (
            not isinstance(texts, Tensor) and is_token_ids(texts)):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise EmptyInputError("texts: got none; give at least one text.")
    n_ctx = int(steered.cfg.n_ctx)
    seqs = []
    for i, t in enumerate(texts):
        ids = token_ids(t, f"texts[{i}]")
        seq = steered.to_tokens(t) if ids is None else torch.tensor(ids, dtype=torch.long)
        if seq.numel() == 0:
            raise EmptyInputError(f"texts[{i}] has no tokens; give at least the BOS id and one more.")
        seqs.append(seq[:n_ctx])
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
