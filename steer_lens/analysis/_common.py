"""Helpers shared by the analyses (private to :mod:`steer_lens.analysis`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from steer_lens._utils import token_strings, unwrap
from steer_lens.errors import ConfigError, EmptyInputError, MetricError
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


def single_token(model, token: str | int, what: str) -> tuple[str, int]:
    """``(string, id)`` of one token given as a string (must tokenize to one token) or an id.

    Shared by the analyses that take named tokens (first-token metrics, prefix substitution, DLA targets).

    Raises:
        ConfigError: an id outside the vocabulary, a string without a tokenizer, or a string that is
            not exactly one token.
    """
    model = unwrap(model)
    d_vocab = int(model.cfg.d_vocab)
    if isinstance(token, bool) or not isinstance(token, int | str):
        raise ConfigError(f"{what}: expected a token string or id, got {type(token).__name__}.")
    if isinstance(token, int):
        if not 0 <= token < d_vocab:
            raise ConfigError(f"{what}: token id {token} is outside the vocabulary [0, {d_vocab}). "
                              "Fix: pass an id below d_vocab.")
        return token_strings(model, [token])[0], token  # type: ignore[return-value]
    if getattr(model, "tokenizer", None) is None:
        raise ConfigError(f"{what}: {token!r} is a string but the model has no tokenizer. Fix: pass the token id.")
    ids = model.to_tokens(token, prepend_bos=False, truncate=False)[0].tolist()
    if len(ids) != 1:
        raise ConfigError(f"{what}: {token!r} is {len(ids)} tokens {ids}, expected exactly one. Fix: pass a "
                          "single token (mind the leading space, e.g. ' To'; see sl.word_tokens) or its id.")
    return token, int(ids[0])
