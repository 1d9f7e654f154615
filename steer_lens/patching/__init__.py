"""Activation, attribution and path patching, batched, for models and their steering vectors.

* :func:`activation_patch`: exact activation patching (the same numbers as TransformerLens's
  ``patching.get_act_patch_*``), many sites per forward pass; :func:`activation_patch_block_every`
  (``get_act_patch_block_every``: ``resid_pre``, ``attn_out``, ``mlp_out`` in one result).
* :func:`steering_patch`: which sites carry a steering vector's effect (denoising / noising).
* :func:`attribution_patch`: the first-order estimate of every site at once (Nanda 2023;
  Kramár et al. 2024, AtP), and :func:`vector_attribution`, the vector's effect per position.
* :func:`path_patch`: a vector's effect split into paths (direct, per head, per MLP, frozen attention
  patterns), with the last-block variants of "Small Vectors, Big Effects" (Sinii et al. 2025);
  :func:`path_variant_accuracy`: those variants scored by the accuracy of answers sampled through them.
* :class:`Strategy` / :func:`choose_strategy`: which work a sweep skips (``strategy=`` of the sweeps).
* Metrics: :func:`logit_diff`, :func:`logprob`, :func:`kl_to`, :func:`prob_change`.
* Noise: :func:`noise_floor` / :func:`is_within_noise` (a metric gap below rounding noise) and the
  :class:`NoisyMetricWarning` the analyses issue for one.
"""

from __future__ import annotations

from steer_lens.metrics import Metric, MetricFn, kl_to, logit_diff, logprob, prob_change
from steer_lens.patching.activation import (
    BLOCK_EVERY_HOOKS,
    HOOKS,
    activation_patch,
    activation_patch_block_every,
    steering_patch,
)
from steer_lens.patching.attribution import attribution_patch, vector_attribution
from steer_lens.patching.path import path_patch, per_token_kl
from steer_lens.patching.path_generation import group_combinations, path_variant_accuracy
from steer_lens.patching.results import (
    NOISE_ULPS,
    NoisyMetricWarning,
    PatchResult,
    PathPatchResult,
    PathVariantAccuracy,
    VectorAttribution,
    is_within_noise,
    noise_floor,
)
from steer_lens.patching.strategy import STRATEGIES, Strategy, choose_strategy

__all__ = [
    "BLOCK_EVERY_HOOKS",
    "HOOKS",
    "NOISE_ULPS",
    "NoisyMetricWarning",
    "STRATEGIES",
    "Metric",
    "MetricFn",
    "PatchResult",
    "PathPatchResult",
    "PathVariantAccuracy",
    "Strategy",
    "VectorAttribution",
    "activation_patch",
    "activation_patch_block_every",
    "attribution_patch",
    "choose_strategy",
    "group_combinations",
    "is_within_noise",
    "kl_to",
    "logit_diff",
    "logprob",
    "noise_floor",
    "path_patch",
    "path_variant_accuracy",
    "per_token_kl",
    "prob_change",
    "steering_patch",
    "vector_attribution",
]
