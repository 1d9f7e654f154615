"""Training data shared by every objective that learns from examples (SFT of vectors, LoRA training).

One example format: a text (every token after BOS is a target), a ``(prompt, completion)`` pair, or a
dict ``{"prompt", "completion", "suppress"}``, each part a text or token ids (a 1-D tensor or a list of
ints, for models without a tokenizer; a whole example given as ids is one sequence whose first token,
the BOS, is the prompt); one right-padded :class:`Batch`; one seeded data order
(epochs of permutations); one masked next-token loss. :mod:`steer_lens.train.supervised` and
:mod:`steer_lens.lora.train` both use these, so the two trainings see the same batches of the same
tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError

__all__ = ["Batch", "Example", "TokenIds", "collate_rows", "epoch_order", "is_token_ids", "masked_nll",
           "next_token_logprobs", "normalise_example", "token_ids"]

TokenIds = Tensor | Sequence[int]
"""Token ids of one sequence: a 1-D integer tensor (or ``[1, pos]``) or a list / tuple of ints."""

Example = str | TokenIds | tuple[str | TokenIds, str | TokenIds] | Mapping[str, str | TokenIds]


@dataclass(frozen=True)
class Batch:
    """A right-padded training batch.

    Attributes:
        tokens: ``[batch, pos]`` prompt + target tokens, right-padded.
        attention_mask: ``[batch, pos]`` 1 for real tokens.
        target_mask: ``[batch, pos-1]`` True where ``tokens[:, t+1]`` is a target (completion) token.
        prompt_lengths: ``[batch]`` number of prompt tokens per row (BOS included).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    target_mask: Bool[Tensor, "batch pos_minus_1"]
    prompt_lengths: Int[Tensor, " batch"]


def is_token_ids(x: object) -> bool:
    """Whether ``x`` is token ids of one sequence: an integer tensor, or a non-empty list / tuple of ints."""
    if isinstance(x, Tensor):
        return True
    if isinstance(x, list | tuple) and x:
        return all(not isinstance(t, bool | Tensor) and hasattr(t, "__index__") for t in x)
    return False


def token_ids(x: object, what: str = "tokens") -> list[int] | None:
    """The ids of ``x`` as a list of ints, or ``None`` when ``x`` is a text.

    Args:
        x: a text, a 1-D integer tensor (or ``[1, pos]``), or a list / tuple of ints.
        what: the argument's name, for the message.

    Raises:
        ConfigError: neither a text nor token ids (e.g. a float tensor or a ``[2, pos]`` tensor).
    """
    if isinstance(x, str):
        return None
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.ndim > 2 or (
                x.ndim == 2 and x.shape[0] != 1):
            raise ConfigError(f"{what}: expected a text or the token ids of one sequence (an integer tensor "
                              f"[pos]), got a {x.dtype} tensor of shape {list(x.shape)}.")
        return x.reshape(-1).tolist()
    if isinstance(x, list | tuple) and (not x or is_token_ids(x)):
        return [operator.index(t) for t in x]
    raise ConfigError(f"{what}: expected a text or token ids (a 1-D integer tensor or a list of ints), "
                      f"got {type(x).__name__}.")


def _ids_or_text(x: Any) -> Any:
    """Token ids as a ``torch.long`` tensor (lists of ints included); texts and ``None`` as given."""
    return torch.tensor(token_ids(x), dtype=torch.long) if is_token_ids(x) else x


def normalise_example(example: Any, i: int) -> tuple[Any, Any, Any]:
    """``(prompt, completion, suppress)`` of one example: texts as given, token ids as ``torch.long`` tensors.

    A text is ``("", text, None)``; token ids of one sequence (a tensor or a list of ints) are
    ``(ids[:1], ids[1:], None)``: the first token (the BOS) is the prompt, every later token a target,
    as for a text; a pair ``(prompt, completion, None)``; a dict reads ``prompt`` (default ``""``),
    ``completion`` (default ``""``) and ``suppress`` (default ``None``). Lists of ints inside a pair
    or a dict become tensors.

    Raises:
        ConfigError: not a text, token ids, a pair or a dict, or a dict with neither ``completion`` nor
            ``suppress``.
    """
    if isinstance(example, str):
        return "", example, None
    if is_token_ids(example):
        ids = torch.tensor(token_ids(example, f"example {i}"), dtype=torch.long)
        return ids[:1], ids[1:], None
    if isinstance(example, tuple | list) and len(example) == 2:
        return _ids_or_text(example[0]), _ids_or_text(example[1]), None
    if isinstance(example, Mapping):
        if "completion" not in example and "suppress" not in example:
            raise ConfigError(f"example {i}: a dict needs 'completion' (and/or 'suppress'), got keys "
                              f"{sorted(example)}.")
        return (_ids_or_text(example.get("prompt", "")), _ids_or_text(example.get("completion", "")),
                _ids_or_text(example.get("suppress")))
    raise ConfigError(
        f"example {i}: expected a text, token ids, a (prompt, completion) pair or a dict, got "
        f"{type(example).__name__}."
    )


def collate_rows(rows: Sequence[tuple[list[int], list[int]]], pad: int, device: torch.device | str) -> Batch:
    """Right-pad ``(prompt_ids, target_ids)`` rows with ``pad`` into a :class:`Batch` on ``device``."""
    n = max(len(p) + len(c) for p, c in rows)
    toks = torch.full((len(rows), n), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    tmask = torch.zeros((len(rows), n - 1), dtype=torch.bool)
    plen = torch.zeros(len(rows), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = p + c
        toks[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        tmask[i, len(p) - 1 : len(seq) - 1] = True
        plen[i] = len(p)
    return Batch(toks.to(device), attn.to(device), tmask.to(device), plen.to(device))


def epoch_order(n: int, needed: int, seed: int) -> list[int]:
    """``needed`` or more indices into ``n`` items: seeded permutations (epochs), concatenated."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-needed // n))]).tolist()


def next_token_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """``log p(tokens[:, t+1] | tokens[:, :t+1])`` (nats) from the logits, in fp32."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, tokens[:, 1:, None])[..., 0]


def masked_nll(logp: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Mean negative log-probability (nats/token) over the positions where ``mask`` is True."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)
