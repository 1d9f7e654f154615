"""Activation, attribution and path patching, batched, for models and their steering vectors.

* :func:`activation_patch`: exact activation patching (the same numbers as TransformerLens's
  ``patching.get_act_patch_*``), many sites per forward pass.
* :func:`steering_patch`: which sites carry a steering vector's effect (denoising / noising).
* :func:`attribution_patch`: the first-order estimate of every site at once (Nanda 2023;
  Kramár et al. 2024, AtP), and :func:`vector_attribution`, the vector's effect per position.
* :func:`path_patch`: a vector's effect split into paths (direct, per head, per MLP, frozen attention
  patterns), with the last-block variants of "Small Vectors, Big Effects" (Sinii et al. 2025).
* :class:`Strategy` / :func:`choose_strategy`: which work a sweep skips (``strategy=`` of the sweeps).
* Metrics: :func:`logit_diff`, :func:`logprob`, :func:`kl_to`, :func:`prob_change`.
"""

from __future__ import annotations

from steer_lens.metrics import Metric, MetricFn, kl_to, logit_diff, logprob, prob_change
from steer_lens.patching.activation import HOOKS, activation_patch, steering_patch
from steer_lens.patching.attribution import attribution_patch, vector_attribution
from steer_lens.patching.path import path_patch
from steer_lens.patching.results import PatchResult, PathPatchResult, VectorAttribution
from steer_lens.patching.strategy import STRATEGIES, Strategy, choose_strategy

__all__ = [
    "HOOKS",
    "STRATEGIES",
    "Metric",
    "MetricFn",
    "PatchResult",
    "PathPatchResult",
    "Strategy",
    "VectorAttribution",
    "activation_patch",
    "attribution_patch",
    "choose_strategy",
    "kl_to",
    "logit_diff",
    "logprob",
    "path_patch",
    "prob_change",
    "steering_patch",
    "vector_attribution",
]
