"""The settings of :func:`~steer_lens.train.rl.rl`: :class:`RLConfig`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from steer_lens.errors import ConfigError
from steer_lens.train.loop import OptimConfig, check_micro_batch_size, is_int, require
from steer_lens.train.recompute import valid_recompute
from steer_lens.train.rl.advantages import advantage_names, get_advantage

__all__ = ["DEFAULT_RL_LR", "SAMPLERS", "RLConfig"]

DEFAULT_RL_LR = 5e-2
SAMPLERS = ("transformer_lens", "hf")
"""Who samples the rollouts: ``RLConfig.sampler``."""
"""The default RL learning rate, in relative units (see :mod:`steer_lens.train.loop`)."""


@dataclass(frozen=True, kw_only=True)
class RLConfig(OptimConfig):
    """Settings of :func:`~steer_lens.train.rl.rl`: every :class:`~steer_lens.train.loop.OptimConfig` field plus these.

    Attributes:
        algorithm: the advantage estimator's registered name: ``"rloo"`` (default), ``"grpo"``,
            ``"reinforce"`` or one added with :func:`~steer_lens.train.rl.register_advantage`
            (see :mod:`steer_lens.train.rl.advantages`).
        group_size: completions sampled per prompt (``>= 2`` for rloo and grpo: the estimator's
            ``min_group_size``).
        prompts_per_step: prompts per step (drawn without replacement, cycling through the list).
        max_new_tokens: tokens generated per completion.
        temperature, top_p, top_k: sampling settings of the rollouts.
        tempered_logprobs: score the policy loss (and the KL) under ``softmax(logits / temperature)``,
            the distribution the rollouts came from, as Sinii et al. 2025 do (default ``True``; the
            same as untempered at ``temperature=1``).
        kl_coef: weight of the k3 KL penalty to the base model (0: off, the seeds' default).
        log_kl: with ``kl_coef=0``, still compute the k3 KL to the base model for the ``kl`` metric
            (default ``True``: one no-grad forward with the vectors off per batch of rollouts).
            ``False`` skips that reference forward when ``kl_coef=0``; the ``kl`` metric is then
            absent from the result and the log. With ``kl_coef > 0`` the KL is always computed.
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
        micro_batch_size: at most this many sequences per forward/backward (``None``: the whole
            batch of ``prompts_per_step * group_size`` rollouts at once). The gradients of the
            micro-batches are accumulated (each micro-batch's loss is divided by the generated-token
            count of the *whole* batch, so their sum is the full-batch loss) and the optimiser
            steps once per batch, as without; the reference forward is split the same way.
            Sampling is not split. Peak memory of the update scales with ``micro_batch_size``.
        sampler: who samples the rollouts: ``"transformer_lens"`` (default: the wrapper's own KV-cache
            sampler, any vector kind and position) or ``"hf"`` (:class:`~steer_lens.hf_generation.HFSampler`:
            transformers' ``generate`` on the same weights with the live vectors added by forward hooks;
            ~1.7x faster on CPU, the same next-token logits to 1e-4, not token-identical to the
            ``"transformer_lens"`` samples for a seed; constant vectors at ``positions="all"`` only,
            and a second copy of the weights in memory). The policy loss is computed by TransformerLens
            either way.
        recompute: score the policy loss under :func:`~steer_lens.train.recompute.recompute_blocks`
            (activation recomputation over the blocks from the first vector on): ``True`` / ``"full"``
            keeps only each block's input residual (about one extra forward per step), ``"selective"``
            keeps the outputs of the matrix products and reruns the element-wise ops (a fraction of a
            forward). Buys activation memory of the update (see ``docs/benchmarks/lora.md``, P4); same
            gradients (to float rounding). Sampling and the reference forward are unaffected.

    Defaults: ``steps=100`` and ``lr=5e-2`` in relative units (measured to lift the "dog" rate on
    TinyStories-656K at both ``blocks.0`` and ``blocks.1.hook_resid_pre``; see ``docs/rl.md``).

    Raises:
        ConfigError: a field outside its range (the message names it), or an unregistered algorithm.
    """

    steps: int = 100
    lr: float = DEFAULT_RL_LR
    algorithm: str = "rloo"
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 40
    temperature: float = 1.0
    tempered_logprobs: bool = True
    top_p: float = 1.0
    top_k: int | None = None
    kl_coef: float = 0.0
    log_kl: bool = True
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    baseline_decay: float = 0.9
    heldout_texts: Sequence[str] | None = None
    heldout_every: int = 10
    micro_batch_size: int | None = None
    sampler: str = "transformer_lens"
    recompute: bool | Literal["full", "selective"] = False

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(cond: bool, name: str, expected: str) -> None:
            require(cond, name, getattr(self, name), expected)

        spec = get_advantage(self.algorithm)
        need(is_int(self.group_size) and self.group_size >= 1, "group_size", "an int >= 1")
        if self.group_size < spec.min_group_size:
            fits = [n for n in advantage_names() if get_advantage(n).min_group_size <= self.group_size]
            raise ConfigError(
                f"group_size: {self.algorithm} compares completions within a group and needs "
                f"group_size >= {spec.min_group_size}, got {self.group_size}. Fix: group_size=8, or "
                f"algorithm={fits[0] if fits else 'reinforce'!r}."
            )
        need(is_int(self.prompts_per_step) and self.prompts_per_step >= 1, "prompts_per_step", "an int >= 1")
        need(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an int >= 1")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature", "a finite float > 0")
        need(0 < self.top_p <= 1, "top_p", "a float in (0, 1]")
        need(self.top_k is None or (is_int(self.top_k) and self.top_k >= 1), "top_k", "None or an int >= 1")
        need(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "a finite float >= 0")
        need(math.isfinite(self.entropy_coef) and self.entropy_coef >= 0, "entropy_coef", "a float >= 0")
        need(is_int(self.ppo_epochs) and self.ppo_epochs >= 1, "ppo_epochs", "an int >= 1")
        need(0 < self.clip_eps < 1, "clip_eps", "a float in (0, 1)")
        need(0 <= self.baseline_decay < 1, "baseline_decay", "a float in [0, 1)")
        need(is_int(self.heldout_every) and self.heldout_every >= 1, "heldout_every", "an int >= 1")
        need(isinstance(self.log_kl, bool), "log_kl", "True or False")
        check_micro_batch_size(self.micro_batch_size)
        need(self.sampler in SAMPLERS, "sampler", f"one of {list(SAMPLERS)}")
        need(valid_recompute(self.recompute), "recompute", "False, True, 'full' or 'selective'")
        if self.heldout_texts is not None:
            if isinstance(self.heldout_texts, str):
                raise ConfigError("heldout_texts: expected a list of texts, got one string. Fix: [text].")
            object.__setattr__(self, "heldout_texts", tuple(self.heldout_texts))

    @property
    def needs_reference(self) -> bool:
        """Whether a batch of rollouts needs the base model's log-probs (``kl_coef > 0`` or ``log_kl``)."""
        return self.kl_coef > 0 or self.log_kl

    @property
    def logprob_temperature(self) -> float:
        """The temperature the loss scores log-probabilities at (``temperature`` or 1)."""
        return self.temperature if self.tempered_logprobs else 1.0

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (held-out texts counted, not copied)."""
        d = super().to_dict()
        d["heldout_texts"] = None if self.heldout_texts is None else len(self.heldout_texts)
        return d
