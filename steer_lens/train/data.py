"""Training data shared by every objective that learns from examples (SFT of vectors, LoRA training).

One example format: a text (every token after BOS is a target), a ``(prompt, completion)`` pair, or a
dict ``{"prompt", "completion", "suppress"}``; one right-padded :class:`Batch`; one seeded data order
(epochs of permutations); one masked next-token loss. :mod:`steer_lens.train.supervised` and
:mod:`steer_lens.lora.train` both use these, so the two trainings see the same batches of the same
tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError

__all__ = ["Batch", "Example", "collate_rows", "epoch_order", "masked_nll", "next_token_logprobs",
           "normalise_example"]

Example = str | tuple[str, str] | Mapping[str, str]


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


def normalise_example(example: Any, i: int) -> tuple[Any, Any, Any]:
    """``(prompt, completion, suppress)`` of one example, as given (texts or token tensors).

    A text is ``("", text, None)``; a pair ``(prompt, completion, None)``; a dict reads ``prompt``
    (default ``""``), ``completion`` (default ``""``) and ``suppress`` (default ``None``).

    Raises:
        ConfigError: not a text, a pair or a dict, or a dict with neither ``completion`` nor ``suppress``.
    """
    if isinstance(example, str):
        return "", example, None
    if isinstance(example, tuple | list) and len(example) == 2:
        return example[0], example[1], None
    if isinstance(example, Mapping):
        if "completion" not in example and "suppress" not in example:
            raise ConfigError(f"example {i}: a dict needs 'completion' (and/or 'suppress'), got keys "
                              f"{sorted(example)}.")
        return example.get("prompt", ""), example.get("completion", ""), example.get("suppress")
    raise ConfigError(
        f"example {i}: expected a text, a (prompt, completion) pair or a dict, got {type(example).__name__}."
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
