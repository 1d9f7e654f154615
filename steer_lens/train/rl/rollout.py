"""Rollouts for RL of steering vectors: which prompts a step sees, sampling, rewards and advantages.

Each batch of rollouts samples ``group_size`` completions for each of ``prompts_per_step`` prompts with
the vectors on (:meth:`~steer_lens.SteeredTransformer.sample`: batched, left-padded, KV cache, EOS
stops a sequence), scores them with a reward on the decoded text, turns the rewards into advantages
with the run's estimator (:mod:`steer_lens.train.rl.advantages`) and records the base model's
log-probabilities of the sampled tokens (vectors off) for the KL term, unless the run needs no KL
(``kl_coef=0`` and ``log_kl=False``: then that reference forward is skipped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import Prompt, is_conversation
from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.generation import sample_tokens
from steer_lens.hf_generation import HFSampler
from steer_lens.steering import Generation, SteeredTransformer
from steer_lens.train import distributed
from steer_lens.train.data import epoch_order
from steer_lens.train.loop import micro_batches
from steer_lens.train.rewards import score
from steer_lens.train.rl.advantages import AdvantageEstimator
from steer_lens.train.rl.config import RLConfig
from steer_lens.train.rl.loss import completion_logprobs

__all__ = [
    "Rollout", "collect_rollout", "completion_texts", "prompt_items", "prompt_order", "reference_logprobs", "sample",
    "sample_shard",
]


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled completions and what the update needs from it.

    Attributes:
        generation: the sampled :class:`~steer_lens.generation.Generation` (``prompts_per_step *
            group_size`` rows, grouped: rows ``g*k .. g*k+k-1`` share a prompt).
        rewards: ``[batch]`` rewards.
        advantages: ``[batch]`` advantages.
        ref_logp: ``[batch, new]`` base-model log-probs (nats) of the sampled tokens; ``None`` when
            the run does not need them (``kl_coef=0`` and ``log_kl=False``).
        sample_seconds: wall-clock seconds spent sampling.
        score_seconds: wall-clock seconds spent in the reward.
        reference_seconds: wall-clock seconds of the base model's forward (``ref_logp``; 0 without it).
        prompts: the ``batch`` prompt texts (as the reward saw them).
        completions: the ``batch`` completion texts.
        n_tokens: generated tokens in the *global* batch (distributed: summed over processes, whose
            rows are their shards of it; ``None``: ``generation.completion_mask.sum()``).
        batch_rewards: the ``[global batch]`` rewards of every process's rows (``None``: ``rewards``).
    """

    generation: Generation
    rewards: Float[Tensor, " batch"]
    advantages: Float[Tensor, " batch"]
    ref_logp: Tensor | None
    sample_seconds: float
    prompts: tuple[str, ...] = ()
    completions: tuple[str, ...] = ()
    n_tokens: Tensor | None = None
    batch_rewards: Tensor | None = None
    score_seconds: float = 0.0
    reference_seconds: float = 0.0


def prompt_items(prompts: Sequence[Prompt] | Prompt | Int[Tensor, "n_prompts pos"]) -> tuple[list[Any], list[str]]:
    """Prompts as items :meth:`~steer_lens.SteeredTransformer.sample` accepts and as text for rewards.

    A token tensor ``[n_prompts, pos]`` gives its rows as items and their ids, space-separated, as text.
    A conversation (``[{"role": "user", "content": ...}]``) is sampled through the chat template; its
    text for rewards is the content of its last user message (so ``exact_answer`` / ``math_answer``
    tables are keyed by the question as written).

    Raises:
        EmptyInputError: no prompts (or an empty token tensor).
        ConfigError: a prompt that is not a text.
    """
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise EmptyInputError(
                f"prompts: a token tensor must be [n_prompts, pos] and non-empty, got {list(prompts.shape)}."
            )
        items = list(prompts)
        return items, [" ".join(str(t) for t in p.tolist()) for p in items]
    if isinstance(prompts, str) or is_conversation(prompts):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("prompts: got none; give at least one prompt.")
    bad = [p for p in prompts if not (isinstance(p, str) or is_conversation(p))]
    if bad:
        raise ConfigError(f"prompts: expected texts or conversations, got {type(bad[0]).__name__}.")
    return prompts, [p if isinstance(p, str) else _last_user(p) for p in prompts]


def _last_user(conversation) -> str:
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return users[-1] if users else conversation[-1]["content"]


def prompt_order(n_prompts: int, config: RLConfig) -> list[int]:
    """Prompt indices for every batch of rollouts: seeded permutations of the prompts, concatenated."""
    n_rollouts = -(-config.steps // config.ppo_epochs)
    return epoch_order(n_prompts, n_rollouts * config.prompts_per_step, config.seed)


def sample(steered: SteeredTransformer, items: list[Any], config: RLConfig, seed: int) -> Generation:
    """Sample ``config.max_new_tokens`` tokens after each item with the config's sampling settings."""
    batch = torch.stack(items) if isinstance(items[0], Tensor) else items
    return steered.sample(
        batch, config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, seed=seed, stop_at_eos=True,
    )


def sample_shard(steered: SteeredTransformer, items: list[Any], config: RLConfig, seed: int,
                 lo: int, hi: int) -> Generation:
    """Rows ``lo:hi`` of :func:`sample` of all ``items`` with ``seed``, sampling those rows only.

    The prompts are left-padded to the longest of *all* items and every row draws the noise the whole
    batch would (``rows`` of :func:`~steer_lens.generation.sample_tokens`), so the rows get the tokens
    (and the padding) of the one-process batch; ``lo, hi = 0, len(items)`` is :func:`sample`.
    """
    if isinstance(items[0], Tensor):
        toks = torch.stack(items).to(steered.device)
        mask, texts = torch.ones_like(toks), None
    else:
        toks, mask = steered.left_pad([steered.prompt_tokens(p) for p in items])
        texts = [steered.chat_text(p) if is_conversation(p) else p for p in items][lo:hi]
    if config.sampler == "hf":  # transformers' generate with the live vectors (same logits, other RNG use)
        return HFSampler(steered).sample_tokens(
            toks[lo:hi], mask[lo:hi], texts, config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, top_k=config.top_k, do_sample=True, seed=seed + lo, stop_at_eos=True,
        )
    return sample_tokens(
        steered, toks[lo:hi], mask[lo:hi], texts, config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, top_k=config.top_k, do_sample=True, seed=seed, stop_at_eos=True, use_kv_cache=True,
        rows=(lo, len(items)),
    )


def completion_texts(gen: Generation) -> list[str]:
    """The decoded completions (without EOS); without a tokenizer, the kept token ids space-separated."""
    if gen.completions is not None:
        return list(gen.completions)
    rows = gen.completion_tokens.tolist()
    keep = gen.completion_mask.tolist()
    return [" ".join(str(t) for t, k in zip(r, m, strict=True) if k) for r, m in zip(rows, keep, strict=True)]


def collect_rollout(
    steered: SteeredTransformer,
    items: list[Any],
    texts: list[str],
    index: Sequence[int],
    *,
    reward: Callable[..., Any],
    estimator: AdvantageEstimator,
    config: RLConfig,
    rollout: int,
) -> Rollout:
    """Sample, score and weigh batch number ``rollout`` of prompts ``index`` (each ``group_size`` times).

    Distributed (:mod:`steer_lens.train.distributed`): this process samples, scores and takes the
    reference log-probs of its contiguous share of the prompts with their whole groups (the rows the one-process
    batch gives them); one all_reduce assembles the global rewards and generated-token count, and the
    advantages are computed from the global rewards on every process (so batch-wise estimators such as
    REINFORCE's baseline see the whole batch and keep the same state everywhere).

    Raises:
        RewardError: the reward raised or returned a wrong shape / NaN.
    """
    k = config.group_size
    batch_items = [items[i] for i in index for _ in range(k)]
    lo, hi = (k * i for i in distributed.shard_range(len(index)))  # this process's rows: whole groups
    batch_texts = [texts[i] for i in index for _ in range(k)][lo:hi]
    t0 = time.perf_counter()
    g = sample_shard(steered, batch_items, config, config.seed * 1_000_003 + rollout + 1, lo, hi)
    dt = time.perf_counter() - t0
    completions = completion_texts(g)
    t1 = time.perf_counter()
    rewards = score(reward, batch_texts, completions).to(steered.device)
    t_score = time.perf_counter() - t1
    parts = torch.zeros(len(batch_items) + 1, dtype=torch.float32, device=steered.device)
    parts[lo:hi], parts[-1] = rewards.float(), g.completion_mask.sum()
    parts = distributed.all_reduce_sum(parts)  # one all_reduce: [global rewards..., global tokens]
    all_rewards = parts[:-1].to(rewards.dtype) if distributed.is_distributed() else rewards
    adv = estimator(all_rewards.view(-1, k)).reshape(-1)[lo:hi]
    t2 = time.perf_counter()
    ref = reference_logprobs(steered, g, config) if config.needs_reference else None
    if ref is not None and ref.is_cuda:
        torch.cuda.synchronize(ref.device)  # (the forward's kernels, not the update's, take this time)
    t_ref = time.perf_counter() - t2 if ref is not None else 0.0
    return Rollout(
        generation=g, rewards=rewards, advantages=adv, ref_logp=ref, sample_seconds=dt,
        prompts=tuple(batch_texts), completions=tuple(completions),
        n_tokens=parts[-1].round().long(), batch_rewards=all_rewards, score_seconds=t_score,
        reference_seconds=t_ref,
    )


@torch.no_grad()
def reference_logprobs(steered: SteeredTransformer, gen: Generation, config: RLConfig) -> Float[Tensor, "batch new"]:
    """Base-model log-probs (nats, vectors off, no gradient) of the sampled tokens, for the KL term.

    Run in micro-batches of ``config.micro_batch_size`` rows (rows are independent, so the result
    is the same as one forward over the batch), at the loss's temperature.
    """
    parts = []
    with steered.disabled():
        for rows in micro_batches(gen.tokens.shape[0], config.micro_batch_size):
            ref, _ = completion_logprobs(steered, gen.tokens[rows], gen.attention_mask[rows], gen.prompt_len,
                                         with_entropy=False, temperature=config.logprob_temperature)
            parts.append(ref)
    return torch.cat(parts)
