"""Small helpers every layer shares, each written once: the model's device and dtype, unwrapping a
steered model, token ids to strings, and batching a list of inputs.

Private to the package (import the functions, not the module, from steer_lens code only). The
helpers duck-type a :class:`~steer_lens.SteeredTransformer` (an object with ``.model`` and
``.fwd_hooks()``) so that this module imports nothing of steer_lens and sits at the bottom layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Conversation",
    "Prompt",
    "batched",
    "device_of",
    "dtype_of",
    "is_conversation",
    "is_steered",
    "steering_hooks",
    "token_strings",
    "unwrap",
]

T = TypeVar("T")

Conversation = Sequence[Mapping[str, str]]
"""A chat: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``."""

Prompt = str | Conversation
"""One prompt: a plain text (tokenized with BOS) or a conversation (rendered by the chat template)."""


def is_conversation(obj: Any) -> bool:
    """Whether ``obj`` is one conversation: a non-empty list of dicts with ``role`` and ``content``."""
    return (
        isinstance(obj, list | tuple)
        and len(obj) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in obj)
    )


def device_of(model: Any) -> torch.device:
    """Device of a model (its first parameter; ``cfg.device`` for a model without parameters).

    A :class:`~steer_lens.SteeredTransformer` gives its wrapped model's device.
    """
    model = unwrap(model)
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device(model.cfg.device)


def dtype_of(model: Any) -> torch.dtype:
    """Activation dtype of a model (``cfg.dtype``, fp32 when the config has none)."""
    return getattr(unwrap(model).cfg, "dtype", torch.float32)


def is_steered(obj: Any) -> bool:
    """Whether ``obj`` is a steering wrapper (has ``.model``, ``.vectors`` and ``.fwd_hooks()``)."""
    return hasattr(obj, "vectors") and callable(getattr(obj, "fwd_hooks", None)) and hasattr(obj, "model")


def unwrap(model_or_steered: Any) -> Any:
    """The base model of a :class:`~steer_lens.SteeredTransformer`, or the model itself."""
    return model_or_steered.model if is_steered(model_or_steered) else model_or_steered


def steering_hooks(model_or_steered: Any) -> list[tuple[str, Any]]:
    """The steering ``(hook_name, fn)`` pairs of a wrapper (``[]`` for a plain model or a disabled wrapper)."""
    return model_or_steered.fwd_hooks() if is_steered(model_or_steered) else []


_DECODE_WINDOW = 4
"""Tokens of left context decoded with each token by :func:`token_pieces`."""


def token_pieces(tokenizer: Any, row: Sequence[int]) -> list[str]:
    """Each token's text *as it appears inside the sequence*, so that ``"".join(pieces)`` reads right.

    ``tokenizer.decode([id])`` alone drops the leading space of SentencePiece-style tokens
    (``'▁home'`` decodes to ``'home'`` at the start of a decode), which made contexts read
    ``'carried it backhome'``. Here token ``i``'s piece is ``decode(row[s:i+1])`` minus its prefix
    ``decode(row[s:i])`` with ``s = i - 4`` (a few tokens of left context, so the cost stays linear);
    the first token, a tokenizer whose decode is not prefix-stable there, or a token that adds
    nothing to the windowed decode falls back to ``decode([id])``.
    """
    out = []
    for i, t in enumerate(row):
        s = max(0, i - _DECODE_WINDOW)
        if i == 0:
            out.append(tokenizer.decode([t]))
            continue
        a, b = tokenizer.decode(list(row[s:i])), tokenizer.decode(list(row[s : i + 1]))
        out.append(b[len(a):] if b.startswith(a) and b != a else tokenizer.decode([t]))
    return out


def token_strings(model: Any, tokens: Tensor | Sequence[int]) -> list[str] | list[list[str]]:
    """Token ids ``[pos]`` or ``[batch, pos]`` as one string per token, as each reads in its sequence.

    Pieces keep their spaces (:func:`token_pieces`), so joining a window of them reads like the text.
    Without a tokenizer each token is its id as a string, so labels always exist.
    """
    ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    tokenizer = getattr(unwrap(model), "tokenizer", None)

    def one(row: list[int]) -> list[str]:
        if tokenizer is None:
            return [str(t) for t in row]
        return token_pieces(tokenizer, row)

    if ids and isinstance(ids[0], list):
        return [one(r) for r in ids]
    return one(ids)


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements (the last may be shorter)."""
    size = max(1, int(size))
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_token_ids(tokens: Tensor, cfg: Any, what: str = "tokens", *, extra_positions: int = 0) -> None:
    """Raise if ``tokens`` are not valid ids for a model of config ``cfg``.

    Args:
        tokens: token ids ``[..., pos]``.
        cfg: the model's config (``d_vocab``, ``n_ctx``).
        what: the argument's name, for the message.
        extra_positions: positions that will be appended (e.g. ``max_new_tokens``) and must fit too.

    Raises:
        ConfigError: a non-integer dtype, or an id outside ``[0, d_vocab)`` (negative ids would
            silently index the last rows of the embedding).
        SequenceTooLongError: more than ``n_ctx`` positions (TransformerLens would fail inside the
            positional embedding or silently attend past its context).
    """
    from steer_lens.errors import ConfigError, SequenceTooLongError

    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ConfigError(
            f"{what}: expected integer token ids, got dtype {tokens.dtype}. Fix: pass ids as a torch.long tensor."
        )
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        vocab = int(getattr(cfg, "d_vocab", None) or 1 << 62)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"{what}: token id {bad} is outside the vocabulary [0, {vocab}). Fix: tokenize with this "
                "model's tokenizer (model.to_tokens) and do not use negative ids for padding."
            )
    n_ctx = getattr(cfg, "n_ctx", None)
    if n_ctx is not None and tokens.ndim and tokens.shape[-1] + extra_positions > int(n_ctx):
        more = f" plus {extra_positions} new tokens" if extra_positions else ""
        raise SequenceTooLongError(
            f"{what}: {tokens.shape[-1]} positions{more} exceed the model's context n_ctx={int(n_ctx)}. Fix: "
            "truncate or split the input."
        )
