"""Reinforcement learning of steering vectors: RLOO, GRPO, REINFORCE (or your own estimator) on sampled completions.

Each step samples ``group_size`` completions for each of ``prompts_per_step`` prompts with the vectors
on, scores them with a reward on the decoded text, turns rewards into advantages, and takes a
policy-gradient step on the vectors only. This is the recipe of "Small Vectors, Big Effects" (Sinii
et al. 2025) and "Steering LLM Reasoning Through Bias-Only Adaptation": one vector per layer trained
online with a group baseline matches full RL fine-tuning on reasoning tasks.

The package, one concern per module:

* :mod:`~steer_lens.train.rl.advantages`: the advantage-estimator protocol and its registry
  (``"rloo"``, ``"grpo"``, ``"reinforce"``; :func:`register_advantage` adds one);
* :mod:`~steer_lens.train.rl.loss`: log-probabilities of the sampled tokens, the k3 KL and the
  clipped policy-gradient loss;
* :mod:`~steer_lens.train.rl.rollout`: prompt order, sampling, rewards and advantages of a batch;
* :mod:`~steer_lens.train.rl.config`: :class:`RLConfig`;
* :mod:`~steer_lens.train.rl.trainer`: :func:`rl`, :class:`RLState` and :class:`RLResult`.

**Learning rate.** ``lr`` is relative (see :mod:`steer_lens.train.loop`): Adam moves each coordinate
by about ``lr x`` the hook's typical per-coordinate residual RMS per step, so the default works at any
hook; the RMS is measured on one unsteered rollout of the prompts before training.
"""

from __future__ import annotations

from steer_lens.train.rl.advantages import (
    AdvantageEstimator,
    AdvantageSpec,
    Reinforce,
    advantage_names,
    get_advantage,
    grpo_advantages,
    register_advantage,
    reinforce_advantages,
    rloo_advantages,
    unregister_advantage,
)
from steer_lens.train.rl.config import DEFAULT_RL_LR, RLConfig
from steer_lens.train.rl.loss import completion_logprobs, k3_kl, policy_loss
from steer_lens.train.rl.rollout import Rollout
from steer_lens.train.rl.trainer import RLResult, RLState, rl

__all__ = [
    "DEFAULT_RL_LR",
    "AdvantageEstimator",
    "AdvantageSpec",
    "RLConfig",
    "RLResult",
    "RLState",
    "Reinforce",
    "Rollout",
    "advantage_names",
    "completion_logprobs",
    "get_advantage",
    "grpo_advantages",
    "k3_kl",
    "policy_loss",
    "register_advantage",
    "reinforce_advantages",
    "rl",
    "rloo_advantages",
    "unregister_advantage",
]
