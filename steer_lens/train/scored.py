"""Logits at the scored positions only: the final norm and unembedding run apart from the blocks.

A training objective scores a subset of positions (SFT: the target tokens; RL: the completion), but a
plain forward unembeds every position: a ``d_model x d_vocab`` matrix product per position (about a
fifth of SmolLM2-135M's forward FLOPs) in the forward and again in the backward, and
``[batch, pos, d_vocab]`` logits and log-probabilities kept for the backward. :func:`scored_logits`
runs the blocks with TransformerLens's ``stop_at_layer=n_layers`` (the final residual stream), indexes
the scored positions, and runs the final norm and the unembedding on them alone
(``start_at_layer=n_layers``). The result equals the full forward's logits at those positions (the
final norm acts position by position); measured A/B in ``benchmarks/ab_rl_unembed.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from steer_lens.generation import unembeds_apart
from steer_lens.hooks import frozen_parameters, shared_weights

__all__ = ["scored_logits", "unembeds_apart"]


def scored_logits(steered: Any, tokens: Tensor, select: Callable[[Tensor], Tensor], **forward_kwargs: Any) -> Tensor:
    """``select(steered(tokens, **forward_kwargs))``, computed with the unembedding on the selected positions only.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` (or anything callable like a model: then the
            full forward's logits are indexed).
        tokens: ``[batch, seq]`` token ids.
        select: indexes the leading ``[batch, seq]`` dimensions of a ``[batch, seq, d]`` tensor and keeps
            the last one: a slice (``lambda x: x[:, p:-1]`` gives ``[batch, new, d]``) or a boolean mask
            (``lambda x: x[:, :-1][mask]`` gives ``[n, d]``). It is applied to the final residual
            stream ``[batch, seq, d_model]`` (or to the full logits where the unembedding cannot run
            apart, see :func:`unembeds_apart`).
        **forward_kwargs: passed to the steered forward (``attention_mask``, ``prompt_lengths`` ...).

    Returns:
        The logits at the selected positions, ``[..., d_vocab]`` with the leading shape ``select`` gives,
        in the model's dtype. Gradients flow into the vectors as in the steered call (recorded under
        ``steered.gradients()``), never into the model's weights.
    """
    if not unembeds_apart(steered):
        return select(steered(tokens, **forward_kwargs))
    n_layers = int(steered.model.cfg.n_layers)
    resid = select(steered(tokens, stop_at_layer=n_layers, **forward_kwargs))
    flat = resid.ndim == 2  # a boolean mask's [n, d_model]: the unembedding takes [batch, pos, d_model]
    # as in the steered call: no gradient into the weights, and none of them copied for the backward
    with frozen_parameters(steered.model), shared_weights(steered.model) \
            if steered.records_gradients and torch.is_grad_enabled() else contextlib.nullcontext():
        logits = steered.model(resid[None] if flat else resid, start_at_layer=n_layers)
    return logits[0] if flat else logits
