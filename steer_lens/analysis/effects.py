"""What the vectors do to a metric: alone, in pairs, on another model, in sampled text.

* :func:`combination_gain` - how much combining the vectors of two layers adds over the better of
  the two alone, relative to what all layers together add:
  ``gain_ij = (acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))``.
* :func:`transfer` - load a vector into another model with the same ``d_model`` and compare its
  effect there with its effect on the model it was trained on.
* :func:`sampled_rate` - the mean reward of sampled completions (e.g. how often a word appears), the
  metric these analyses usually need; a :class:`SampledRate` converts to ``float``.

Subsets of vectors are switched on with :meth:`~steer_lens.SteeredTransformer.only_hooks` (the
other hooks add nothing); nothing is changed on the model or the vectors. After "Small Vectors, Big
Effects" (Sinii et al. 2025).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.analysis._common import number
from steer_lens.errors import ConfigError, IncompatibleVectorError
from steer_lens.models import HookedModel
from steer_lens.results import Result
from steer_lens.steering import SteeredTransformer

__all__ = [
    "CombinationGain",
    "SampledRate",
    "Transfer",
    "combination_gain",
    "copy_vectors",
    "pair_gain",
    "sampled_rate",
    "transfer",
]


# ---------------------------------------------------------------------------------------------------
# combination gain
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CombinationGain(Result):
    """Accuracies of single hooks, pairs and all hooks together, and the pairwise gain.

    Attributes:
        hooks: hook names.
        single: ``[n]`` ``acc_i`` with only hook ``i``'s vector on.
        pair: ``[n, n]`` ``acc_ij`` with hooks ``i`` and ``j`` on (diagonal = ``single``).
        all: ``acc_all``: every vector on, or the jointly trained reference (``joint``).
        base: accuracy with no vector.
        gain: ``[n, n]`` ``(acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))``; NaN on the
            diagonal and where the denominator is 0.
    """

    hooks: list[str]
    single: Float[Tensor, " n"]
    pair: Float[Tensor, "n n"]
    all: float
    base: float
    gain: Float[Tensor, "n n"]

    _rank_by = "gain"

    def to_pandas(self):
        """One row per pair ``i < j``: accuracies and gain."""
        import pandas as pd

        rows = []
        for i, j in itertools.combinations(range(len(self.hooks)), 2):
            rows.append({"hook_i": self.hooks[i], "hook_j": self.hooks[j], "acc_i": float(self.single[i]),
                         "acc_j": float(self.single[j]), "acc_ij": float(self.pair[i, j]),
                         "acc_all": self.all, "gain": float(self.gain[i, j])})
        return pd.DataFrame(rows)

    def plot(self):
        """Heatmap of the pairwise gain."""
        from steer_lens.plotting import heatmap

        return heatmap(self.gain, x_labels=self.hooks, y_labels=self.hooks, colorbar_title="gain",
                       title=f"Gain from combining layers (acc_all={self.all:.3g}, base={self.base:.3g})")

    def _summary(self) -> str:
        return f"<b>CombinationGain</b> of {len(self.hooks)} hooks: all {self.all:.4g}, base {self.base:.4g}"


def pair_gain(acc_i: float, acc_j: float, acc_ij: float, acc_all: float) -> float:
    """``(acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))``; NaN when the denominator is 0."""
    best = max(acc_i, acc_j)
    den = acc_all - best
    return float("nan") if den == 0 else (acc_ij - best) / den


def combination_gain(
    steered: SteeredTransformer,
    evaluate: Callable[..., object],
    *,
    joint: SteeredTransformer | float | None = None,
) -> CombinationGain:
    """Evaluate every single hook, every pair and all hooks, and the gain of each pair.

    ``evaluate(steered) -> float`` is called with the vectors switched on selectively
    (:meth:`~steer_lens.SteeredTransformer.only_hooks`): ``n + n(n-1)/2 + 2`` calls (singles, pairs,
    all, none). The gain ``(acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))`` is 1 when a
    pair recovers all of what the full set adds over its better member and 0 when the pair adds
    nothing (Sinii et al. 2025).

    **The paper's reference.** Sinii et al. take the singles and pairs from vectors trained *one layer
    at a time* and ``acc_all`` from the model whose vectors at all layers were trained *jointly*. Put
    the isolated vectors in ``steered`` (e.g. one wrapper whose vector at each hook is that hook's
    isolated run, :func:`copy_vectors`) and pass the jointly trained wrapper as ``joint``: then
    ``acc_all = evaluate(joint)`` (a float is used as given). Without ``joint``, ``acc_all`` is
    ``steered`` with all its vectors on, which is the paper's definition only when ``steered``'s
    vectors were themselves trained jointly.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` with at least two hooks.
        evaluate: the accuracy (or any metric, larger is better), e.g. ``lambda s: sampled_rate(s, ...)``.
        joint: the jointly trained all-hook wrapper (or its accuracy) for ``acc_all``; see above.

    Returns:
        A :class:`CombinationGain`.

    Raises:
        ConfigError: fewer than two hooks, or ``joint`` neither a wrapper nor a finite number.
        MetricError: ``evaluate`` returned a non-number or a non-finite value.
    """
    hooks = list(steered.hook_names)
    n = len(hooks)
    if n < 2:
        raise ConfigError(f"combination_gain needs vectors at >= 2 hooks, got {hooks}.")
    number_ok = isinstance(joint, int | float) and not isinstance(joint, bool) and math.isfinite(joint)
    if not (joint is None or number_ok or isinstance(joint, SteeredTransformer)):
        raise ConfigError(f"joint: expected a SteeredTransformer (the jointly trained vectors) or its finite "
                          f"accuracy, got {joint!r}.")
    single = torch.zeros(n)
    pair = torch.full((n, n), float("nan"))
    for i, h in enumerate(hooks):
        with steered.only_hooks([h]):
            single[i] = number(evaluate, steered)
        pair[i, i] = single[i]
    for i, j in itertools.combinations(range(n), 2):
        with steered.only_hooks([hooks[i], hooks[j]]):
            pair[i, j] = pair[j, i] = number(evaluate, steered)
    if joint is None:
        acc_all = number(evaluate, steered)
    else:
        acc_all = number(evaluate, joint) if isinstance(joint, SteeredTransformer) else float(joint)
    with steered.disabled():
        base = number(evaluate, steered)
    gain = torch.full((n, n), float("nan"))
    for i, j in itertools.combinations(range(n), 2):
        gain[i, j] = gain[j, i] = pair_gain(float(single[i]), float(single[j]), float(pair[i, j]), acc_all)
    return CombinationGain(hooks=hooks, single=single, pair=pair, all=acc_all, base=base, gain=gain)


# ---------------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transfer(Result):
    """The effect of a vector on its own model and on another model with the same ``d_model``.

    Attributes:
        source_model, target_model: model names.
        source_base, source_steered: metric on the source model without / with the vector.
        target_base, target_steered: the same on the target model.
    """

    source_model: str
    target_model: str
    source_base: float
    source_steered: float
    target_base: float
    target_steered: float

    @property
    def source_effect(self) -> float:
        """``source_steered - source_base``."""
        return self.source_steered - self.source_base

    @property
    def target_effect(self) -> float:
        """``target_steered - target_base``."""
        return self.target_steered - self.target_base

    @property
    def transfer_ratio(self) -> float:
        """``target_effect / source_effect`` (NaN when the source effect is 0)."""
        return float("nan") if self.source_effect == 0 else self.target_effect / self.source_effect

    def to_pandas(self):
        """Two rows (source, target) with base, steered and effect."""
        import pandas as pd

        return pd.DataFrame({
            "model": [self.source_model, self.target_model],
            "base": [self.source_base, self.target_base],
            "steered": [self.source_steered, self.target_steered],
            "effect": [self.source_effect, self.target_effect],
        })

    def plot(self):
        """Grouped bars: base and steered metric on both models."""
        from steer_lens.plotting import bars

        models = [self.source_model, self.target_model]
        return bars({"base": (models, [self.source_base, self.target_base]),
                     "steered": (models, [self.source_steered, self.target_steered])},
                    title=f"Transfer of the vector (ratio {self.transfer_ratio:.2f})")

    def _summary(self) -> str:
        return f"<b>Transfer</b> {self.source_model} → {self.target_model}: ratio {self.transfer_ratio:.3g}"


def copy_vectors(vectors, hook_map: Mapping[str, str] | None = None):
    """A copy of a vectors module (any kind), optionally with hooks renamed by ``hook_map``."""
    hook_map = dict(hook_map or {})
    new_hooks = [hook_map.get(h, h) for h in vectors.hook_names]
    clone = type(vectors).from_config(new_hooks, vectors.d_model, vectors.kind_config())
    rename = {h: hook_map.get(h, h) for h in vectors.hook_names}
    tensors = {}
    for name, t in vectors.tensors().items():
        for old, new in rename.items():  # tensor names embed hook names
            if name.endswith(old):
                name = name[: -len(old)] + new
                break
        tensors[name] = t
    clone.load_tensors(tensors)
    return clone


def transfer(
    steered: SteeredTransformer,
    target_model: HookedModel,
    evaluate: Callable[..., object],
    *,
    hook_map: Mapping[str, str] | None = None,
) -> Transfer:
    """Apply the vectors of ``steered`` to ``target_model`` (same ``d_model``) and compare effects.

    ``evaluate(steered) -> float`` is computed on both models with and without the vectors. The
    vectors are copied (the source is not modified); ``hook_map`` renames hooks when the target has
    another layer count (e.g. ``{"blocks.5.hook_resid_pre": "blocks.3.hook_resid_pre"}``).

    Returns:
        A :class:`Transfer` (effects, ratio target/source; ``.plot()``).

    Raises:
        IncompatibleVectorError: the models' ``d_model`` differ.
        HookNameError: a (mapped) hook does not exist in the target model.
        MetricError: ``evaluate`` returned a non-number.
    """
    from steer_lens.models import model_info

    d_src, d_tgt = int(steered.cfg.d_model), int(target_model.cfg.d_model)
    if d_src != d_tgt:
        raise IncompatibleVectorError(
            f"transfer needs the same d_model: source {steered.info.name!r} has {d_src}, target "
            f"{model_info(target_model).name!r} has {d_tgt}."
        )
    vecs = copy_vectors(steered.vectors, hook_map)
    target = SteeredTransformer(target_model, list(vecs.hook_names), scale=steered.scale,
                                positions=steered.positions, vectors=vecs)
    with steered.disabled():
        sb = number(evaluate, steered)
    ss = number(evaluate, steered)
    with target.disabled():
        tb = number(evaluate, target)
    ts = number(evaluate, target)
    return Transfer(source_model=steered.info.name, target_model=target.info.name, source_base=sb,
                    source_steered=ss, target_base=tb, target_steered=ts)


# ---------------------------------------------------------------------------------------------------
# a metric for the analyses
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampledRate(Result):
    """The mean reward of sampled completions (see :func:`sampled_rate`); ``float(r)`` is the rate.

    Attributes:
        rate: mean reward over the completions (for a 0/1 reward: the fraction that has it).
        rewards: ``[n_completions]`` the reward of each completion (prompt by prompt, ``n_samples``
            each).
        completions: the sampled completions.
    """

    rate: float
    rewards: Float[Tensor, " n_completions"] = field(repr=False)
    completions: list[str] = field(repr=False)

    _rank_by = "reward"

    def __float__(self) -> float:
        return self.rate

    def __format__(self, spec: str) -> str:
        return format(self.rate, spec)

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`rate` (``std / sqrt(n)``, 0 for a single completion)."""
        n = self.rewards.numel()
        return float(self.rewards.double().std() / n**0.5) if n > 1 else 0.0

    def to_pandas(self):
        """One row per completion: ``completion, reward``."""
        import pandas as pd

        return pd.DataFrame({"completion": self.completions, "reward": self.rewards.tolist()})

    def plot(self):
        """Histogram of the rewards."""
        from steer_lens.plotting import histogram

        return histogram(self.rewards, title=f"reward of {len(self.completions)} completions (mean {self.rate:.3g})",
                         x_title="reward", y_title="completions")

    def _summary(self) -> str:
        return f"<b>SampledRate</b> {self.rate:.4g} ± {self.stderr:.2g} over {len(self.completions)} completions"


@torch.no_grad()
def sampled_rate(
    steered: SteeredTransformer,
    prompts: str | Sequence[str],
    reward: Callable[..., object],
    *,
    n_samples: int = 64,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
) -> SampledRate:
    """Mean reward of ``n_samples`` sampled completions per prompt (e.g. the rate of a word).

    With ``reward=steer_lens.train.rewards.contains("dog")`` this is the fraction of completions
    that contain "dog". Uses the vectors as they are (wrap in ``steered.disabled()`` for the base).
    The result converts to ``float`` (so ``lambda s: sampled_rate(s, ...)`` is an ``evaluate`` for
    :func:`combination_gain` and :func:`transfer`).

    Returns:
        A :class:`SampledRate` (``.rate``, per-completion ``.rewards``).

    Raises:
        EmptyInputError: no prompts.
        RewardError: the reward failed (see :func:`steer_lens.train.rewards.score`).
    """
    from steer_lens.generation import repeat_prompts
    from steer_lens.train.rewards import score

    prompts = repeat_prompts(prompts, n_samples)
    gen = steered.sample(prompts, max_new_tokens, temperature=temperature, seed=seed)
    rewards = score(reward, prompts, gen.completions)
    return SampledRate(rate=float(rewards.mean()), rewards=rewards, completions=list(gen.completions or []))
