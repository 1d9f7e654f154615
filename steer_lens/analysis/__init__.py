"""Analyses of learned steering vectors, after "Small Vectors, Big Effects" (Sinii et al. 2025).

Free functions that take a :class:`~steer_lens.SteeredTransformer` and inputs and return a frozen
result (:class:`~steer_lens.results.Result`: ``to_pandas``, ``top``, ``plot``, ``token_view``).

* geometry (:mod:`steer_lens.analysis.geometry`): :func:`vector_stats` (norms, cosines, norms
  relative to the residual), :func:`persistence` (how a vector's write travels down the stream);
* effects on a metric (:mod:`steer_lens.analysis.effects`): :func:`combination_gain` (pairs of
  layers), :func:`transfer` (another model of the same width), :func:`sampled_rate` (mean reward of
  sampled completions, the metric these usually take);
* shifts (:mod:`steer_lens.analysis.shift`): :func:`generation_shift` (next-token distribution per
  generated position) and :func:`activation_shift` (SAE features at a hook);
* first token (:mod:`steer_lens.analysis.first_token`): :func:`first_token_concentration` (the
  largest probability increase per generated position, and of named tokens) and
  :func:`prefix_substitution` (the base model's metric with the boosted token prefixed);
* gates (:mod:`steer_lens.analysis.gates`): :func:`gate_values`, the per-token gate of gated vectors;
* direct logit attribution (:mod:`steer_lens.analysis.dla`): :func:`vector_dla`, per component
  (embeddings, heads, MLPs, biases, the vector) in the base and the steered run.

Subsets of vectors are switched on with :meth:`SteeredTransformer.only_hooks
<steer_lens.SteeredTransformer.only_hooks>`; nothing is changed on the model or the vectors.
"""

from steer_lens.analysis.dla import VectorDLA, vector_dla
from steer_lens.analysis.effects import (
    CombinationGain,
    SampledRate,
    Transfer,
    combination_gain,
    copy_vectors,
    pair_gain,
    sampled_rate,
    transfer,
)
from steer_lens.analysis.first_token import (
    FirstTokenConcentration,
    PrefixSubstitution,
    first_token_concentration,
    prefix_substitution,
)
from steer_lens.analysis.gates import GateValues, gate_values
from steer_lens.analysis.geometry import Persistence, VectorStats, persistence, vector_stats
from steer_lens.analysis.shift import ActivationShift, GenerationShift, activation_shift, generation_shift

__all__ = [
    "ActivationShift",
    "CombinationGain",
    "FirstTokenConcentration",
    "GateValues",
    "GenerationShift",
    "Persistence",
    "PrefixSubstitution",
    "SampledRate",
    "Transfer",
    "VectorDLA",
    "VectorStats",
    "activation_shift",
    "combination_gain",
    "copy_vectors",
    "first_token_concentration",
    "gate_values",
    "generation_shift",
    "pair_gain",
    "persistence",
    "prefix_substitution",
    "sampled_rate",
    "transfer",
    "vector_dla",
    "vector_stats",
]
