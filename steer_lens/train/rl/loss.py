"""The policy-gradient loss of RL on steering vectors, and the log-probabilities it needs.

The loss over generated tokens only (prompt, left padding and tokens after EOS are masked; EOS itself
counts), normalised by the number of generated tokens in the whole batch ``N`` (also when the batch
is split into micro-batches: see ``n_tokens`` of :func:`policy_loss`):

``L = -(1/N) sum_{i,t} min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
      + kl_coef * (1/N) sum_{i,t} k3_it - entropy_coef * (1/N) sum_{i,t} H_it``

with ``rho = exp(log pi - log pi_old)`` (1 in the default single on-policy update, where the loss's
gradient is the REINFORCE estimate ``-(1/N) sum_i A_i sum_t grad log pi(y_it)``), the KL estimator
``k3 = exp(log pi_base - log pi) - 1 - (log pi_base - log pi) >= 0`` to the base model (Schulman 2020)
and the entropy ``H`` of the steered next-token distribution; the clipped surrogate is PPO's
(Schulman et al. 2017).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens.steering import SteeredTransformer
from steer_lens.train.scored import scored_logits, shared_prompt_logits

__all__ = ["completion_logprobs", "k3_kl", "policy_loss"]


def completion_logprobs(
    steered: SteeredTransformer,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"],
    prompt_len: int,
    *,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    temperature: float = 1.0,
    share_prompts: bool = True,
) -> tuple[Float[Tensor, "batch new"], Float[Tensor, "batch new"] | None]:
    """Log-probabilities (nats) of the generated tokens under ``steered``, by one training forward.

    ``tokens[:, prompt_len + t]`` is scored from the logits at position ``prompt_len + t - 1``;
    left padding is masked by ``attention_mask`` (positions are those of the unpadded sequences).
    Run it under ``steered.disabled()`` for the base model's log-probabilities. The forward records
    the graph into the vectors (``steered.gradients()``) unless torch's grad mode is off.

    Args:
        steered: the :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, prompt_len + new]`` as in :class:`~steer_lens.generation.Generation`.
        attention_mask: ``[batch, prompt_len + new]``.
        prompt_len: padded prompt length.
        with_entropy: also return the entropy (nats) of each next-token distribution.
        entropy_grad: keep the entropy's graph (needed only with an entropy bonus). ``False``
            computes it without gradient, which saves the ``[batch, new, d_vocab]`` tensor the
            entropy's backward would keep (verl likewise computes the entropy only when
            ``entropy_coeff != 0``: volcengine/verl ``verl/workers/actor/dp_actor.py:573`` at b178a3c).
        temperature: score under ``softmax(logits / temperature)``, the distribution the rollouts
            were sampled from (Sinii et al. 2025's policy loss divides the logits by the sampling
            temperature); 1 leaves the logits as they are.

    Returns:
        ``(logp [batch, new], entropy [batch, new] or None)``; values at masked positions are
        meaningless (mask them with the completion mask).
    """
    batch = tokens.shape[0]
    lengths = torch.full((batch,), prompt_len, device=tokens.device)
    with steered.gradients():  # a training forward: the policy's log-probs carry the vectors' graph
        logits = shared_prompt_logits(steered, tokens, attention_mask, prompt_len) if share_prompts else None
        if logits is None:  # the final norm and unembedding on the scored positions only (steer_lens.train.scored)
            logits = scored_logits(steered, tokens, lambda x: x[:, prompt_len - 1 : -1],
                                   attention_mask=attention_mask, prompt_lengths=lengths)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tokens[:, prompt_len:, None])[..., 0]
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            lp = logp_all if entropy_grad else logp_all.detach()
            ent = -(lp.exp() * lp).sum(-1)
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
    n_tokens: Tensor | int | None = None,
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
        n_tokens: the normaliser ``N`` (default: the number of True entries of ``mask``). When a
            batch is split into micro-batches, give every micro-batch the generated-token count of
            the *whole* batch: the micro-batch losses (and metrics) then add up to the full-batch
            ones, and so do their gradients (verl's ``agg_loss(..., batch_num_tokens=...)``,
            volcengine/verl ``verl/trainer/ppo/core_algos.py:1055-1058`` at b178a3c).

    Returns:
        ``(loss, metrics)`` with metrics ``pg_loss``, ``kl`` (nats/token, 0 without ``ref_logp``),
        ``entropy`` (nats/token), ``clip_frac`` (detached scalars).
    """
    m = mask.to(torch.bool)
    count = m.sum() if n_tokens is None else torch.as_tensor(n_tokens, device=logp.device)
    n = count.clamp_min(1).to(logp.dtype)
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
