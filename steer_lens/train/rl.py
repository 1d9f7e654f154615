"""Reinforcement learning of steering vectors: RLOO, GRPO and REINFORCE on sampled completions.

Each step samples ``group_size`` completions for each of ``prompts_per_step`` prompts with the vectors
on (:meth:`~steer_lens.SteeredTransformer.sample`: batched, left-padded, KV cache, EOS stops a
sequence), scores them with a reward on the decoded text, turns rewards into advantages, and takes a
policy-gradient step on the vectors only. This is the recipe of "Small Vectors, Big Effects" (Sinii
et al. 2025) and "Steering LLM Reasoning Through Bias-Only Adaptation": one vector per layer trained
online with a group baseline matches full RL fine-tuning on reasoning tasks.

**Advantages** (``A_i`` of completion ``i`` in a group of ``k`` completions of the same prompt):

* ``"rloo"`` (default; Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` (leave-one-out);
* ``"grpo"`` (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)``,
  0 for a group whose rewards are all equal (std 0);
* ``"reinforce"`` (Williams 1992): ``A_i = r_i - b`` with a moving-average baseline
  ``b <- decay * b + (1 - decay) * mean(r)`` (``b`` starts at the first batch's mean).

**Loss** over generated tokens only (prompt, left padding and tokens after EOS are masked; EOS itself
counts), normalised by the number of generated tokens in the batch ``N``:

``L = -(1/N) sum_{i,t} min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
      + kl_coef * (1/N) sum_{i,t} k3_it - entropy_coef * (1/N) sum_{i,t} H_it``

with ``rho = exp(log pi - log pi_old)`` (1 in the default single on-policy update, where the loss's
gradient is the REINFORCE estimate ``-(1/N) sum_i A_i sum_t grad log pi(y_it)``), the KL estimator
``k3 = exp(log pi_base - log pi) - 1 - (log pi_base - log pi) >= 0`` to the base model (the same tokens
run with the vectors off; Schulman 2020) and the entropy ``H`` of the steered next-token distribution.
Log-probabilities come from a training forward pass over prompt + completion (the same numerics as
the loss), not from the sampling logits.

**Learning rate.** ``lr`` is relative (see :mod:`steer_lens.train.loop`): Adam moves each coordinate
by about ``lr x`` the hook's typical per-coordinate residual RMS per step, so the default works at any
hook; the RMS is measured on one unsteered rollout of the prompts before training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.steering import Generation, SteeredTransformer
from steer_lens.train.loop import OptimConfig, TrainResult, run_loop, typical_resid_rms
from steer_lens.train.rewards import reward_name, score

__all__ = [
    "RLConfig",
    "RLResult",
    "Rollout",
    "completion_logprobs",
    "grpo_advantages",
    "k3_kl",
    "policy_loss",
    "reinforce_advantages",
    "rl",
    "rloo_advantages",
]

logger = logging.getLogger(__name__)

DEFAULT_RL_LR = 5e-2


@dataclass(frozen=True, kw_only=True)
class RLConfig(OptimConfig):
    """Settings of :func:`rl`: every :class:`~steer_lens.train.loop.OptimConfig` field plus these.

    Attributes:
        algorithm: ``"rloo"`` (default), ``"grpo"`` or ``"reinforce"`` (see the module docstring).
        group_size: completions sampled per prompt (``>= 2`` for rloo and grpo).
        prompts_per_step: prompts per step (drawn without replacement, cycling through the list).
        max_new_tokens: tokens generated per completion.
        temperature, top_p, top_k: sampling settings of the rollouts.
        kl_coef: weight of the k3 KL penalty to the base model (0: off, the seeds' default).
        entropy_coef: weight of the entropy bonus (0: off).
        ppo_epochs: optimisation steps per batch of rollouts (1: on-policy, the default). With
            ``k > 1`` each batch is reused for ``k`` consecutive steps with ratio clipping; ``steps``
            counts optimisation steps either way.
        clip_eps: PPO ratio clipping ``eps``.
        baseline_decay: decay of REINFORCE's moving-average baseline.
        heldout_texts: texts whose mean next-token loss (nats/token, vectors on) is logged as
            ``heldout_loss`` every ``heldout_every`` steps and at the last step: the side effect of
            steering on other text.
        heldout_every: steps between held-out evaluations.

    Defaults: ``steps=100`` and ``lr=5e-2`` in relative units (measured to lift the "dog" rate on
    TinyStories-656K at both ``blocks.0`` and ``blocks.1.hook_resid_pre``; see ``docs/rl.md``).

    Raises:
        ConfigError: a field outside its range (the message names it).
    """

    steps: int = 100
    lr: float = DEFAULT_RL_LR
    algorithm: Literal["rloo", "grpo", "reinforce"] = "rloo"
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    baseline_decay: float = 0.9
    heldout_texts: Sequence[str] | None = None
    heldout_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"{name}: expected {expected}, got {getattr(self, name)!r}.")

        need(self.algorithm in ("rloo", "grpo", "reinforce"), "algorithm", "'rloo', 'grpo' or 'reinforce'")
        need(_is_int(self.group_size) and self.group_size >= 1, "group_size", "an int >= 1")
        if self.algorithm in ("rloo", "grpo") and self.group_size < 2:
            raise ConfigError(
                f"group_size: {self.algorithm} compares completions within a group and needs "
                f"group_size >= 2, got {self.group_size}. Fix: group_size=8, or algorithm='reinforce'."
            )
        need(_is_int(self.prompts_per_step) and self.prompts_per_step >= 1, "prompts_per_step", "an int >= 1")
        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an int >= 1")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature", "a finite float > 0")
        need(0 < self.top_p <= 1, "top_p", "a float in (0, 1]")
        need(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k", "None or an int >= 1")
        need(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "a finite float >= 0")
        need(math.isfinite(self.entropy_coef) and self.entropy_coef >= 0, "entropy_coef", "a float >= 0")
        need(_is_int(self.ppo_epochs) and self.ppo_epochs >= 1, "ppo_epochs", "an int >= 1")
        need(0 < self.clip_eps < 1, "clip_eps", "a float in (0, 1)")
        need(0 <= self.baseline_decay < 1, "baseline_decay", "a float in [0, 1)")
        need(_is_int(self.heldout_every) and self.heldout_every >= 1, "heldout_every", "an int >= 1")
        if self.heldout_texts is not None:
            if isinstance(self.heldout_texts, str):
                raise ConfigError("heldout_texts: expected a list of texts, got one string. Fix: [text].")
            object.__setattr__(self, "heldout_texts", tuple(self.heldout_texts))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (held-out texts counted, not copied)."""
        d = super().to_dict()
        d["heldout_texts"] = None if self.heldout_texts is None else len(self.heldout_texts)
        return d


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------
def rloo_advantages(rewards: Float[Tensor, "groups k"]) -> Float[Tensor, "groups k"]:
    """RLOO advantages: ``A_i = r_i - mean_{j != i} r_j`` within each group (Ahmadian et al. 2024).

    Args:
        rewards: ``[groups, k]`` rewards, one row per prompt, ``k >= 2`` completions each.

    Returns:
        ``[groups, k]`` advantages (in reward units); they sum to 0 in each group.

    Raises:
        ConfigError: ``k < 2``.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ConfigError(f"rloo_advantages: each group needs k >= 2 completions, got k={k}.")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def grpo_advantages(rewards: Float[Tensor, "groups k"], eps: float = 1e-4) -> Float[Tensor, "groups k"]:
    """GRPO advantages: ``(r_i - mean) / (std + eps)`` within each group (Shao et al. 2024).

    ``std`` is the unbiased standard deviation of the group (as in TRL's GRPO); a group whose rewards
    are all equal (``std = 0``) gets advantages exactly 0.

    Args:
        rewards: ``[groups, k]``, ``k >= 2``.
        eps: added to the std.

    Returns:
        ``[groups, k]`` advantages (unitless).

    Raises:
        ConfigError: ``k < 2``.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ConfigError(f"grpo_advantages: each group needs k >= 2 completions, got k={k}.")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    adv = (rewards - mean) / (std + eps)
    return torch.where(std > 0, adv, torch.zeros_like(adv))


def reinforce_advantages(
    rewards: Float[Tensor, " batch"], baseline: Float[Tensor, ""] | None, decay: float = 0.9
) -> tuple[Float[Tensor, " batch"], Float[Tensor, ""]]:
    """REINFORCE with a moving-average baseline: ``A_i = r_i - b`` (Williams 1992).

    Args:
        rewards: ``[batch]`` rewards of this step.
        baseline: the running baseline ``b`` (``None`` at the first step: ``b`` = this batch's mean).
        decay: ``b_new = decay * b + (1 - decay) * mean(rewards)``.

    Returns:
        ``(advantages [batch], new baseline)``; the advantages use the baseline *before* this batch.
    """
    mean = rewards.mean()
    b = mean if baseline is None else baseline
    return rewards - b, decay * b + (1 - decay) * mean


# ---------------------------------------------------------------------------------------------------
# log-probabilities and the loss
# ---------------------------------------------------------------------------------------------------
def completion_logprobs(
    steered: SteeredTransformer,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"],
    prompt_len: int,
    *,
    with_entropy: bool = True,
) -> tuple[Float[Tensor, "batch new"], Float[Tensor, "batch new"] | None]:
    """Log-probabilities (nats) of the generated tokens under ``steered``, by one training forward.

    ``tokens[:, prompt_len + t]`` is scored from the logits at position ``prompt_len + t - 1``;
    left padding is masked by ``attention_mask`` (positions are those of the unpadded sequences).
    Run it under ``steered.disabled()`` for the base model's log-probabilities.

    Args:
        steered: the :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, prompt_len + new]`` as in :class:`~steer_lens.generation.Generation`.
        attention_mask: ``[batch, prompt_len + new]``.
        prompt_len: padded prompt length.
        with_entropy: also return the entropy (nats) of each next-token distribution.

    Returns:
        ``(logp [batch, new], entropy [batch, new] or None)``; values at masked positions are
        meaningless (mask them with the completion mask).
    """
    batch = tokens.shape[0]
    lengths = torch.full((batch,), prompt_len, device=tokens.device)
    logits = steered(tokens, attention_mask=attention_mask, prompt_lengths=lengths)
    logits = logits[:, prompt_len - 1 : -1].float()
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tokens[:, prompt_len:, None])[..., 0]
    ent = None
    if with_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def k3_kl(
    logp: Float[Tensor, "*shape"], ref_logp: Float[Tensor, "*shape"]
) -> Float[Tensor, "*shape"]:
    """The k3 estimator of ``KL(pi || pi_ref)`` per sampled token: ``e^d - 1 - d`` with ``d = ref - logp``.

    Non-negative for every token (``e^d >= 1 + d``), unbiased for the KL when tokens are sampled from
    ``pi``, and 0 when the two log-probabilities are equal (Schulman 2020, "Approximating KL
    divergence"). Units: nats.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


def policy_loss(
    logp: Float[Tensor, "batch new"],
    advantages: Float[Tensor, " batch"],
    mask: Bool[Tensor, "batch new"],
    *,
    old_logp: Float[Tensor, "batch new"] | None = None,
    ref_logp: Float[Tensor, "batch new"] | None = None,
    entropy: Float[Tensor, "batch new"] | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    clip_eps: float = 0.2,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """Clipped policy-gradient loss over generated tokens, normalised by their number ``N``.

    ``L = -(1/N) sum_{i,t} mask * min(rho A_i, clip(rho, 1 +- eps) A_i) + kl_coef * KL_k3 -
    entropy_coef * H`` with ``rho = exp(logp - old_logp)`` (``old_logp = logp.detach()`` by default:
    the on-policy REINFORCE gradient). Masked positions (prompt, padding, after EOS) contribute
    nothing, whatever their values.

    Args:
        logp: ``[batch, new]`` log-probs of the sampled tokens (with gradient).
        advantages: ``[batch]`` one advantage per completion.
        mask: ``[batch, new]`` True for generated tokens up to and including EOS.
        old_logp: log-probs under the policy that sampled (for PPO epochs).
        ref_logp: log-probs under the base model (for the KL term).
        entropy: per-position entropy (for the bonus).
        kl_coef: weight of the KL term.
        entropy_coef: weight of the entropy bonus.
        clip_eps: PPO ratio clipping.

    Returns:
        ``(loss, metrics)`` with metrics ``pg_loss``, ``kl`` (nats/token, 0 without ``ref_logp``),
        ``entropy`` (nats/token), ``clip_frac`` (detached scalars).
    """
    m = mask.to(torch.bool)
    n = m.sum().clamp_min(1).to(logp.dtype)
    zeros = torch.zeros_like(logp)
    logp = torch.where(m, logp, zeros)
    old = logp.detach() if old_logp is None else torch.where(m, old_logp, zeros)
    ratio = torch.exp(logp - old)
    adv = advantages[:, None].to(logp.dtype)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    pg = -torch.where(m, surr, zeros).sum() / n
    loss = pg
    metrics: dict[str, Tensor] = {"pg_loss": pg.detach()}
    if ref_logp is not None:
        kl = torch.where(m, k3_kl(logp, torch.where(m, ref_logp, zeros)), zeros).sum() / n
        metrics["kl"] = kl.detach()
        if kl_coef:
            loss = loss + kl_coef * kl
    if entropy is not None:
        ent = torch.where(m, entropy, zeros).sum() / n
        metrics["entropy"] = ent.detach()
        if entropy_coef:
            loss = loss - entropy_coef * ent
    clipped = ((ratio - 1).abs() > clip_eps) & m
    metrics["clip_frac"] = clipped.sum().to(logp.dtype).detach() / n
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """One batch of sampled completions and what the update needs from it.

    Attributes:
        generation: the sampled :class:`~steer_lens.generation.Generation` (``prompts_per_step *
            group_size`` rows, grouped: rows ``g*k .. g*k+k-1`` share a prompt).
        rewards: ``[batch]`` rewards.
        advantages: ``[batch]`` advantages.
        ref_logp: ``[batch, new]`` base-model log-probs (when ``kl_coef > 0``), else ``None``.
        sample_seconds: wall-clock seconds spent sampling.
    """

    generation: Generation
    rewards: Float[Tensor, " batch"]
    advantages: Float[Tensor, " batch"]
    ref_logp: Tensor | None
    sample_seconds: float
    old_logp: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class RLResult(TrainResult):
    """What :func:`rl` returns: a :class:`~steer_lens.train.loop.TrainResult` plus RL samples.

    Metrics per step (``metrics[name]``, CPU float tensors ``[steps]``): ``loss``, ``reward`` (mean),
    ``reward_std``, ``kl`` (k3 to the base, nats/token; computed always, penalised only with
    ``kl_coef``), ``entropy`` (nats/token), ``pg_loss``, ``clip_frac``, ``completion_tokens`` (mean
    generated tokens per completion), ``tokens_per_s`` (sampling throughput), ``sample_s``
    (seconds sampling), ``heldout_loss`` (nats/token; NaN between evaluations), ``grad_norm``,
    ``lr`` and ``norm/<hook>``.

    Attributes:
        last_prompts, last_completions: the last step's rollouts (text), for a look.
    """

    last_prompts: tuple[str, ...] = ()
    last_completions: tuple[str, ...] = ()

    @property
    def rewards(self) -> Float[Tensor, " steps"]:
        """Mean reward per step."""
        return self.metrics["reward"]

    def plot(self, metrics: Sequence[str] | None = None):
        """Plotly figure: reward, KL, entropy, held-out loss and vector norms per step."""
        if metrics is None:
            wanted = ["reward", "kl", "entropy", "heldout_loss", "tokens_per_s"]
            metrics = [k for k in wanted if k in self.metrics]
            metrics += [k for k in self.metrics if k.startswith("norm/")]
        return super().plot(metrics)


def _as_text_prompts(steered, prompts) -> tuple[list[Any], list[str]]:
    """Prompts as items ``sample`` accepts (texts or 1-D token tensors) and as text for rewards."""
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise EmptyInputError(
                f"prompts: a token tensor must be [n_prompts, pos] and non-empty, got {list(prompts.shape)}."
            )
        items = list(prompts)
        return items, [" ".join(str(t) for t in p.tolist()) for p in items]
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("prompts: got none; give at least one prompt.")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"prompts: expected texts, got {type(bad[0]).__name__}.")
    return prompts, prompts


def _sample(steered, items: list[Any], config: RLConfig, seed: int) -> Generation:
    if isinstance(items[0], Tensor):
        batch = torch.stack(items)
    else:
        batch = items
    return steered.sample(
        batch, config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, seed=seed, stop_at_eos=True,
    )


def _completion_texts(steered, gen: Generation) -> list[str]:
    if gen.completions is not None:
        return list(gen.completions)
    # no tokenizer (e.g. random test models): completions as space-separated token ids
    rows = gen.completion_tokens.tolist()
    keep = gen.completion_mask.tolist()
    return [" ".join(str(t) for t, k in zip(r, m, strict=True) if k) for r, m in zip(rows, keep, strict=True)]


def rl(
    steered: SteeredTransformer,
    prompts: Sequence[str] | str | Int[Tensor, "n_prompts pos"],
    reward: Callable[..., Any],
    config: RLConfig | None = None,
) -> RLResult:
    """Train the steering vectors of ``steered`` by online reinforcement learning on ``reward``.

    Only the vectors learn (AdamW; the model is frozen). Each of ``config.steps`` steps samples
    ``group_size`` completions for ``prompts_per_step`` prompts (a seeded permutation of
    ``prompts``, cycled), scores them, and updates the vectors with the chosen algorithm (module
    docstring). Progress bar, JSONL log, checkpoints, resume and the NaN guard come from
    :func:`~steer_lens.train.loop.run_loop`; the same seed gives the same run on the CPU.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` (any vector kind, e.g. gated or low rank).
        prompts: prompt texts (or token ids ``[n_prompts, pos]`` for models without a tokenizer:
            the reward then sees token ids as space-separated text).
        reward: ``f(prompts, completions) -> Float[Tensor, "batch"]`` (see
            :mod:`steer_lens.train.rewards`), on decoded text without EOS.
        config: :class:`RLConfig` (default ``RLConfig()``).

    Returns:
        An :class:`RLResult` (per-step reward, KL, entropy, held-out loss, tokens/s, vector norms;
        ``.plot()``). The vectors keep their trained values; ``steered.training_config`` records
        the run.

    Raises:
        EmptyInputError: no prompts.
        ConfigError: a bad config or prompt.
        SequenceTooLongError: a prompt plus ``max_new_tokens`` longer than ``n_ctx``.
        RewardError: the reward raised or returned a wrong shape / NaN (names the completion).
        TrainingDivergedError: non-finite loss or gradient (vectors restored to the last good state).
    """
    config = config or RLConfig()
    if not callable(reward):
        raise ConfigError(
            f"reward: expected a callable f(prompts, completions), got {type(reward).__name__}."
        )
    items, texts = _as_text_prompts(steered, prompts)
    n_prompts = len(items)
    k = config.group_size
    ppo = config.ppo_epochs

    # relative learning rates: residual scale from one unsteered rollout of (some of) the prompts
    probe_items = items[: min(n_prompts, config.prompts_per_step)]
    with steered.disabled():
        probe = _sample(steered, probe_items, config, seed=config.seed)
    resid_rms = typical_resid_rms(steered, probe.tokens, probe.attention_mask)

    n_rollouts = -(-config.steps // ppo)
    needed = n_rollouts * config.prompts_per_step
    gen = torch.Generator().manual_seed(config.seed)
    perms = [torch.randperm(n_prompts, generator=gen) for _ in range(-(-needed // n_prompts))]
    order = torch.cat(perms).tolist()

    state: dict[str, Any] = {"rollout": None, "rollout_index": -1, "baseline": None, "last": None}

    def make_rollout(r: int) -> Rollout:
        idx = order[r * config.prompts_per_step : (r + 1) * config.prompts_per_step]
        batch_items = [items[i] for i in idx for _ in range(k)]
        batch_texts = [texts[i] for i in idx for _ in range(k)]
        t0 = time.perf_counter()
        g = _sample(steered, batch_items, config, seed=config.seed * 1_000_003 + r + 1)
        dt = time.perf_counter() - t0
        completions = _completion_texts(steered, g)
        rewards = score(reward, batch_texts, completions).to(steered.device)
        if config.algorithm == "rloo":
            adv = rloo_advantages(rewards.view(-1, k)).reshape(-1)
        elif config.algorithm == "grpo":
            adv = grpo_advantages(rewards.view(-1, k)).reshape(-1)
        else:
            adv, state["baseline"] = reinforce_advantages(rewards, state["baseline"], config.baseline_decay)
        with torch.no_grad(), steered.disabled():
            ref, _ = completion_logprobs(
                steered, g.tokens, g.attention_mask, g.prompt_len, with_entropy=False
            )
        state["last"] = (batch_texts, completions)
        return Rollout(generation=g, rewards=rewards, advantages=adv, ref_logp=ref, sample_seconds=dt)

    def step_fn(step: int):
        r = step // ppo
        if state["rollout_index"] != r:
            state["rollout"] = make_rollout(r)
            state["rollout_index"] = r
        ro: Rollout = state["rollout"]
        g = ro.generation
        logp, ent = completion_logprobs(steered, g.tokens, g.attention_mask, g.prompt_len)
        if ppo > 1 and not ro.old_logp:
            ro.old_logp.append(logp.detach())
        old = ro.old_logp[0] if ro.old_logp else None
        loss, metrics = policy_loss(
            logp, ro.advantages, g.completion_mask, old_logp=old, ref_logp=ro.ref_logp, entropy=ent,
            kl_coef=config.kl_coef, entropy_coef=config.entropy_coef, clip_eps=config.clip_eps,
        )
        n_tok = g.completion_mask.sum()
        metrics.update(
            reward=ro.rewards.mean(),
            reward_std=ro.rewards.std() if ro.rewards.numel() > 1 else torch.zeros(()),
            completion_tokens=n_tok.float() / g.completion_mask.shape[0],
            tokens_per_s=n_tok.float() / max(ro.sample_seconds, 1e-9),
            sample_s=torch.tensor(ro.sample_seconds),
        )
        if config.heldout_texts and (step % config.heldout_every == 0 or step == config.steps - 1):
            from steer_lens.train import heldout_loss

            with torch.no_grad():
                metrics["heldout_loss"] = torch.tensor(heldout_loss(steered, config.heldout_texts))
        return loss, metrics

    result = run_loop(
        steered, step_fn, config, resid_rms=resid_rms, objective="rl",
        extra_config={"rl": {"reward": reward_name(reward), "n_prompts": n_prompts}},
    )
    last_p, last_c = state["last"] if state["last"] is not None else ((), ())
    return RLResult(
        metrics=result.metrics, config=result.config, resid_rms=result.resid_rms, seconds=result.seconds,
        objective="rl", last_prompts=tuple(last_p), last_completions=tuple(last_c),
    )
