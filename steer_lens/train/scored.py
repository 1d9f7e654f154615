"""Logits at the scored positions only: the final norm and unembedding run apart from the blocks.

A training objective scores a subset of positions (SFT: the target tokens; RL: the completion), but a
plain forward unembeds every position: a ``d_model x d_vocab`` matrix product per position (about a
fifth of SmolLM2-135M's forward FLOPs) in the forward and again in the backward, and
``[batch, pos, d_vocab]`` logits and log-probabilities kept for the backward. :func:`scored_logits`
runs the blocks with TransformerLens's ``stop_at_layer=n_layers`` (the final residual stream), indexes
the scored positions, and runs the final norm and the unembedding on them alone
(``start_at_layer=n_layers``). The result equals the full forward's logits at those positions (the
final norm acts position by position); measured A/B in ``benchmarks/ab_rl_unembed.py``.

:func:`shared_prompt_logits` scores completions that share prompts (RL's groups: ``group_size`` samples
of each prompt) with each distinct prompt run once: the prompts' forward fills a key/value cache, the
cache is copied to every row of its prompt, and the completions run on it, gradients flowing back
through the cached keys and values into the vectors. In a causal model a prompt's activations do not
depend on what follows, so the logits (and gradients) are those of the full forward up to the
accumulation order. Shared-prefix forward as in "Prefix Grouper: Efficient GRPO Training through
Shared-Prefix Forward" (Liu et al. 2025); measured A/B in ``benchmarks/ab_shared_prompt.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.generation import distinct_prompts, expand_kv_cache, new_kv_cache, unembeds_apart
from steer_lens.hooks import frozen_parameters, shared_weights

__all__ = ["scored_logits", "shared_prompt_logits", "unembeds_apart"]


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
    logits = _unembed(steered, resid[None] if flat else resid)
    return logits[0] if flat else logits


def _unembed(steered: Any, resid: Tensor) -> Tensor:
    """The final norm and unembedding of ``resid`` ``[batch, pos, d_model]``.

    As in the steered call: no gradient into the weights, and none of them copied for the backward.
    """
    model = steered.model
    with frozen_parameters(model), shared_weights(model) \
            if steered.records_gradients and torch.is_grad_enabled() else contextlib.nullcontext():
        return model(resid, start_at_layer=int(model.cfg.n_layers))


def shared_prompt_logits(
    steered: Any, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"], prompt_len: int,
) -> Float[Tensor, "batch new d_vocab"] | None:
    """The logits that score ``tokens[:, prompt_len:]``, each distinct prompt run once; ``None`` if it cannot.

    Equal to ``steered(tokens, attention_mask=attention_mask, prompt_lengths=prompt_len)[:, prompt_len - 1 : -1]``
    (the scoring positions of :func:`steer_lens.train.rl.completion_logprobs`) up to the accumulation
    order, in value and in the gradient reaching the vectors. Rows whose prompt tokens and prompt mask
    ``[:, :prompt_len]`` are equal form a group; the distinct prompts run once with a TransformerLens
    key/value cache (``stop_at_layer``: blocks only), each row takes its prompt's cached keys, values and
    mask (an index: the backward sums the rows' gradients into the prompt's), and one pass over the
    completions ``tokens[:, prompt_len:-1]`` runs on that cache; the final norm and unembedding run on
    the ``new`` scoring positions alone. The vectors see the positions they see in the full forward:
    the prompt pass starts at position 0, the completion pass at ``prompt_len`` (``set_offset``), with
    ``prompt_end = prompt_len`` for every row. Method: shared-prefix forward (Liu et al. 2025, "Prefix
    Grouper: Efficient GRPO Training through Shared-Prefix Forward", arXiv 2506.05433).

    Returns ``None`` (the caller runs the full forward) when nothing is shared (every prompt distinct),
    when the final norm or unembedding holds a vector or the model is not a ``HookedTransformer``
    (:func:`unembeds_apart`), when the vectors' positions are an explicit mask (its rows are the full
    batch's, not the distinct prompts'), or when ``prompt_len`` or the completion is empty. Must not run
    inside :func:`steer_lens.train.recompute.recompute_blocks` (a block with a key/value cache refuses
    recomputation): the RL trainer calls it only with ``recompute=False``.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, seq]`` prompt (left-padded) and completion token ids.
        attention_mask: ``[batch, seq]`` 1 for real tokens.
        prompt_len: padded prompt length (``seq - new``).

    Returns:
        ``[batch, new, d_vocab]`` logits in the model's dtype (position ``t`` scores
        ``tokens[:, prompt_len + t]``), with the vectors' graph when recorded
        (``steered.gradients()``), or ``None``.

    Raises:
        Exception: none of its own; the model's errors propagate.
    """
    batch, seq = tokens.shape
    if not (unembeds_apart(steered) and 0 < prompt_len < seq and isinstance(steered.positions, str)):
        return None
    shared = distinct_prompts(tokens[:, :prompt_len], attention_mask[:, :prompt_len])
    cache = None if shared is None else new_kv_cache(steered.model, shared[0].shape[0], tokens.device)
    if cache is None:
        return None
    p_tokens, p_mask, index = shared
    n, model, n_layers = p_tokens.shape[0], steered.model, int(steered.model.cfg.n_layers)
    weights = shared_weights(model) if steered.records_gradients and torch.is_grad_enabled() \
        else contextlib.nullcontext()
    with steered.steering(prompt_end=torch.full((n,), prompt_len, device=tokens.device), tokens=p_tokens), weights:
        last = model(p_tokens, attention_mask=p_mask, past_kv_cache=cache, stop_at_layer=n_layers)[:, -1:]
        resid = last[index]
        if seq - prompt_len > 1:
            expand_kv_cache(cache, index)  # every row takes its prompt's keys and values (gradients sum back)
            steered.set_offset(prompt_len, torch.full((batch,), prompt_len, device=tokens.device),
                               tokens=tokens[:, prompt_len:-1])
            rest = model(tokens[:, prompt_len:-1], attention_mask=attention_mask[:, prompt_len:-1],
                         past_kv_cache=cache, stop_at_layer=n_layers)
            resid = torch.cat([resid, rest], 1)
    return _unembed(steered, resid)
