"""Sampling from a steered model: batched, left-padded prompts, KV cache, per-sequence EOS.

:meth:`steer_lens.SteeredTransformer.sample` and :meth:`~steer_lens.SteeredTransformer.generate` run
:func:`sample_tokens`. The steering hooks stay installed for the whole loop; before each decoding step
the wrapper is told the absolute position of the new token, so ``positions="prompt"/"generated"`` and
explicit masks act during decoding exactly as in a teacher-forced pass over the final sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens._utils import Prompt, check_token_ids, is_conversation
from steer_lens.errors import ConfigError, SequenceTooLongError
from steer_lens.models import matmul_layout

__all__ = [
    "Generation", "distinct_prompts", "expand_kv_cache", "last_position_logits", "new_kv_cache", "pick_next_token",
    "repeat_prompts", "sample_tokens",
    "unembeds_apart",
]


@dataclass(frozen=True)
class Generation:
    """The output of :meth:`SteeredTransformer.sample`: prompts and completions, as tokens and text.

    Attributes:
        tokens: ``[batch, prompt_len + new]`` left-padded prompts followed by generated tokens
            (positions after a sequence's EOS hold the pad id).
        attention_mask: ``[batch, prompt_len + new]`` 1 for real tokens (prompt and generated up to and
            including EOS), 0 for padding.
        completion_mask: ``[batch, new]`` True for generated tokens up to and including EOS.
        prompt_len: padded prompt length; generated tokens start at this index.
        prompts: the prompt texts (``None`` when token ids were given).
        completions: decoded generated text per sequence (EOS excluded; ``None`` without tokenizer).
    """

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    completion_mask: Bool[Tensor, "batch new"]
    prompt_len: int
    prompts: list[str] | None
    completions: list[str] | None

    @property
    def completion_tokens(self) -> Int[Tensor, "batch new"]:
        """The generated part of :attr:`tokens`."""
        return self.tokens[:, self.prompt_len :]

    def texts(self) -> list[str] | None:
        """Prompt + completion per sequence (``None`` without texts)."""
        if self.prompts is None or self.completions is None:
            return None
        return [p + c for p, c in zip(self.prompts, self.completions, strict=True)]


# ---------------------------------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_sampling_args(max_new_tokens: object, seed: object, top_k: object) -> None:
    """Check the integer sampling arguments before anything runs.

    Raises:
        ConfigError: ``max_new_tokens`` not an int >= 1, ``seed`` not ``None`` or an int in
            ``[0, 2**63)``, ``top_k`` not ``None`` or an int >= 1 (each message says the fix).
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}. Fix: e.g. max_new_tokens=40.")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ConfigError(f"seed: expected None or an int in [0, 2**63), got {seed!r}. Fix: e.g. seed=0.")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k: expected None (no top-k filter) or an int >= 1, got {top_k!r}. "
                          "Fix: top_k=None, or e.g. top_k=50.")


def pick_next_token(logits: Tensor, do_sample: bool, temperature: float, top_p: float, top_k, gen,
                    rows: tuple[int, int] | None = None) -> Tensor:
    """Next token per row: greedy, or sampled with temperature / top-k / top-p (nucleus).

    Sampling is ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn from ``gen`` for every row and token:
    the algorithm of ``torch.multinomial(p, 1)`` itself (pytorch ``aten/src/ATen/native/Distributions.cpp``,
    the ``n_sample == 1`` fast path of ``multinomial_out``), so the same generator gives the same tokens.
    ``rows=(start, total)``: these ``batch`` rows are rows ``start ..`` of a batch of ``total``
    sampled with this generator; the noise is drawn for all ``total`` rows and this batch keeps its
    own, so a process sampling its shard of a batch draws exactly what the whole batch would
    (:mod:`steer_lens.train.distributed`).
    """
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    start, total = rows or (0, probs.shape[0])
    noise = torch.empty((total, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1, generator=gen)
    return (probs / noise[start : start + probs.shape[0]]).argmax(-1)


def repeat_prompts(prompts: Prompt | Sequence[Prompt] | Tensor, n_samples: int) -> list[Prompt] | Tensor:
    """Each prompt ``n_samples`` times in a row (texts, conversations, or token-id rows ``[batch, pos]``).

    Raises:
        EmptyInputError: no prompts (or an empty token tensor).
    """
    from steer_lens.errors import EmptyInputError

    if isinstance(prompts, Tensor):
        rows = (prompts if prompts.ndim == 2 else prompts[None]).repeat_interleave(n_samples, dim=0)
        if rows.numel() == 0:
            raise EmptyInputError("prompts: got an empty token tensor; give at least one token.")
        return rows
    if isinstance(prompts, str) or is_conversation(prompts):
        prompts = [prompts]
    out = [p for p in prompts for _ in range(n_samples)]
    if not out:
        raise EmptyInputError("prompts: got none; give at least one prompt.")
    return out


def new_kv_cache(model, batch: int, device):
    """A TransformerLens key/value cache for ``batch`` sequences, or ``None`` when the model cannot use
    one (e.g. ``TransformerBridge``; generation then recomputes every step)."""
    try:
        from transformer_lens import HookedTransformer
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(model, HookedTransformer):
        return None
    return TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)


def distinct_prompts(
    tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"], Int[Tensor, " batch"]] | None:
    """The distinct rows of ``(tokens, attention_mask)`` and, per row, which one it is; ``None`` if all differ.

    Returns ``(distinct_tokens [n, pos], distinct_mask [n, pos], index [batch])`` with
    ``distinct_tokens[index] == tokens`` (RL's groups: ``n`` prompts, each ``group_size`` times). A causal
    model's activations on equal rows are equal, so a forward over the distinct rows, indexed by
    ``index``, is the batch's forward (:func:`expand_kv_cache` for its key/value cache).
    """
    rows = torch.cat([tokens, attention_mask.to(tokens.dtype)], 1)
    distinct, index = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return None
    pos = tokens.shape[1]
    return distinct[:, :pos], distinct[:, pos:].to(attention_mask.dtype), index


def expand_kv_cache(cache, index: Int[Tensor, " batch"]) -> None:
    """Make a TransformerLens key/value cache of ``n`` rows one of ``batch`` rows: row ``i`` takes ``index[i]``'s.

    Keys, values and the attention mask are indexed (new tensors; under autograd the backward sums the
    rows' gradients into the ``n`` cached rows). In place on ``cache``.
    """
    for entry in cache.entries:
        entry.past_keys, entry.past_values = entry.past_keys[index], entry.past_values[index]
    cache.previous_attention_mask = cache.previous_attention_mask[index]


def unembeds_apart(steered) -> bool:
    """Whether the final norm and unembedding of ``steered`` can run apart from its blocks.

    True for a :class:`~steer_lens.SteeredTransformer` on a ``HookedTransformer`` (which has
    ``stop_at_layer`` / ``start_at_layer``) with no vector at the final norm or the unembedding
    (those act on every position of the full run); False otherwise (a ``TransformerBridge``, a bare
    model): then callers unembed the full forward's positions and index them. Used by
    :func:`last_position_logits` and :func:`steer_lens.train.scored.scored_logits`.
    """
    from transformer_lens import HookedTransformer

    return (
        isinstance(getattr(steered, "model", None), HookedTransformer)
        and hasattr(steered, "hook_names")
        and not any(h.startswith(("ln_final", "unembed")) for h in steered.hook_names)
    )


def last_position_logits(
    steered, tokens: Int[Tensor, "batch pos"], apart: bool, **forward_kwargs
) -> Float[Tensor, "batch d_vocab"]:
    """``steered.model(tokens, **forward_kwargs)[:, -1]``: the next-token logits ``[batch, d_vocab]`` (the
    model's dtype, unnormalised).

    With ``apart`` (:func:`unembeds_apart`) the blocks run with ``stop_at_layer=n_layers`` and the
    final norm and unembedding on the last position alone, as ``generate`` in transformers does
    (``logits_to_keep=1``): a prompt's prefill unembeds ``batch`` rows instead of ``batch × pos``
    (``[batch, pos, d_vocab]`` logits never exist). Equal logits (the final norm acts position by
    position). The blocks' hooks fire as in the full call; the final norm's hooks see the last position
    only (why a vector there turns ``apart`` off). ``forward_kwargs`` go to the blocks' run (``attention_mask``, ``past_kv_cache``).

    Raises:
        Exception: none of its own; the model's errors propagate.
    """
    model = steered.model
    if not apart:
        return model(tokens, **forward_kwargs)[:, -1]
    n_layers = int(model.cfg.n_layers)
    resid = model(tokens, stop_at_layer=n_layers, **forward_kwargs)[:, -1:]
    return model(resid, start_at_layer=n_layers)[:, -1]


@torch.no_grad()
def sample_tokens(
    steered,
    tokens: Int[Tensor, "batch pos"],
    attn: Int[Tensor, "batch pos"],
    texts: Sequence[str] | None,
    max_new_tokens: int,
    *,
    temperature: float,
    top_p: float,
    top_k: int | None,
    do_sample: bool,
    seed: int | None,
    stop_at_eos: bool,
    use_kv_cache: bool,
    rows: tuple[int, int] | None = None,
) -> Generation:
    """The sampling loop behind :meth:`~steer_lens.SteeredTransformer.sample` (see there).

    ``rows=(start, total)``: ``tokens`` are rows ``start ..`` of a batch of ``total`` prompts, and
    they get the tokens that sampling the whole batch with ``seed`` would give them (see
    :func:`pick_next_token`; RL's data-parallel rollouts).

    Raises:
        ConfigError: bad sampling parameters.
        SequenceTooLongError: prompt plus ``max_new_tokens`` exceeds ``n_ctx``.
    """

    check_sampling_args(max_new_tokens, seed, top_k)
    if do_sample and not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature: expected a positive finite number, got {temperature}.")
    if not (0 < top_p <= 1):
        raise ConfigError(f"top_p: expected a value in (0, 1], got {top_p}.")
    check_token_ids(tokens, steered.model.cfg, "prompt tokens")
    batch, plen = tokens.shape
    n_ctx = int(steered.model.cfg.n_ctx)
    if plen + max_new_tokens > n_ctx:
        raise SequenceTooLongError(
            f"prompt of {plen} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context n_ctx={n_ctx}. Fix: shorten the prompt or lower max_new_tokens."
        )
    gen = None
    if seed is not None:
        gen = torch.Generator(device=steered.device).manual_seed(seed)
    eos = steered.eos_token_id if stop_at_eos else None
    pad = steered.pad_token_id
    # a prompt repeated (RL's groups, n_samples) is prefilled once, its cache rows then copied
    shared = distinct_prompts(tokens, attn) if use_kv_cache else None
    n_prefill = batch if shared is None else shared[0].shape[0]
    cache = new_kv_cache(steered.model, n_prefill, steered.device) if use_kv_cache else None
    if cache is None:
        shared = None
    prompt_end = torch.full((batch,), plen, device=steered.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=steered.device)
    new_tokens: list[Tensor] = []
    alive: list[Tensor] = []
    apart = unembeds_apart(steered)  # the last position alone is unembedded (prefill: batch rows, not batch x pos)
    # matmul_layout: TransformerLens copies W_U.T and the attention weights on every forward; one decode
    # step per token makes those copies most of the step on large vocabularies (same logits either way)
    with matmul_layout(steered.model), steered.steering(prompt_end=prompt_end, tokens=tokens):
        if shared is None:
            logits = last_position_logits(steered, tokens, apart, attention_mask=attn, past_kv_cache=cache)
        else:
            p_tokens, p_mask, index = shared
            steered.set_offset(0, prompt_end[:n_prefill], tokens=p_tokens)
            logits = last_position_logits(steered, p_tokens, apart, attention_mask=p_mask, past_kv_cache=cache)[index]
            expand_kv_cache(cache, index)
        for i in range(max_new_tokens):
            nxt = pick_next_token(logits, do_sample, temperature, top_p, top_k, gen, rows)
            alive.append(~finished)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            if eos is not None:
                finished = finished | (nxt == eos)
            if i == max_new_tokens - 1 or (eos is not None and i % 8 == 7 and bool(finished.all())):
                break
            steered.set_offset(plen + i, prompt_end, tokens=nxt[:, None])
            if cache is not None:
                logits = steered.model(
                    nxt[:, None], attention_mask=torch.ones_like(nxt)[:, None], past_kv_cache=cache
                )[:, -1]
            else:
                full = torch.cat([tokens, torch.stack(new_tokens, 1)], 1)
                steered.set_offset(0, prompt_end, tokens=full)
                full_mask = torch.cat([attn, torch.stack(alive, 1).long() * 0 + 1], 1)
                logits = last_position_logits(steered, full, apart, attention_mask=full_mask)
    new = torch.stack(new_tokens, 1)
    completion_mask = torch.stack(alive, 1)
    all_tokens = torch.cat([tokens, new], 1)
    all_mask = torch.cat([attn, completion_mask.long()], 1)
    completions = None
    tok = getattr(steered.model, "tokenizer", None)
    if tok is not None:
        completions = []
        for row, m in zip(new.tolist(), completion_mask.tolist(), strict=True):
            ids = [t for t, keep in zip(row, m, strict=True) if keep and t != eos]
            completions.append(tok.decode(ids))
    return Generation(
        tokens=all_tokens,
        attention_mask=all_mask,
        completion_mask=completion_mask,
        prompt_len=plen,
        prompts=texts,
        completions=completions,
    )
