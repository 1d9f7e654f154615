"""Analyses of learned steering vectors, after "Small Vectors, Big Effects" (Sinii et al. 2025).

* :func:`vector_stats` - per-hook vector norms (also relative to the hook's typical residual norm)
  and pairwise cosine similarities between the vectors of different layers.
* :func:`persistence` - add *only* the vector of one hook ``ℓ`` and follow its write through the
  residual stream: at every later residual point ``ℓ'`` the change ``Δh_ℓ'(t)`` (steered minus base,
  per token) is compared with the added vector (``cos(Δh_ℓ'(t), v_ℓ)``) and with its own mean over
  tokens (``cos(Δh_ℓ'(t), mean_t Δh_ℓ')``: does the write stay one fixed direction, or become
  token-dependent?), and its norm with ``||v_ℓ||``.
* :func:`combination_gain` - how much combining the vectors of two layers adds over the better of
  the two alone, relative to what all layers together add:
  ``gain_ij = (acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))``.
* :func:`transfer` - load a vector into another model with the same ``d_model`` and compare its
  effect there with its effect on the model it was trained on.
* :func:`sampled_rate` - the mean reward of sampled completions (e.g. how often a word appears), the
  metric these analyses usually need.

Subsets of vectors are switched on with :func:`only_hooks` (the other hooks add nothing); nothing
is changed on the model or the vectors.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import (
    ConfigError,
    EmptyInputError,
    HookNameError,
    IncompatibleVectorError,
    MetricError,
)
from steer_lens.models import HookedModel
from steer_lens.steering import SteeredTransformer

__all__ = [
    "CombinationGain",
    "Persistence",
    "Transfer",
    "VectorStats",
    "combination_gain",
    "only_hooks",
    "persistence",
    "sampled_rate",
    "transfer",
    "vector_stats",
]

_RESID = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)$")
_ORDER = {"resid_pre": 0, "attn_out": 1, "resid_mid": 2, "mlp_out": 3, "resid_post": 4}


def _order(hook: str) -> tuple[int, int]:
    m = _RESID.match(hook)
    if m is None:
        raise HookNameError(
            f"hook {hook!r}: persistence follows the residual stream and needs a hook named "
            "blocks.L.hook_resid_pre / resid_mid / resid_post / attn_out / mlp_out."
        )
    return int(m.group(1)), _ORDER[m.group(2)]


@contextlib.contextmanager
def only_hooks(steered: SteeredTransformer, hooks: Sequence[str]) -> Iterator[None]:
    """Context manager: inside it, only the vectors at ``hooks`` act (the others add zero).

    Works for every vector kind (plain, low rank, gated) by filtering ``vectors.delta``; restored on
    exit, also on error.

    Raises:
        HookNameError: a hook carries no vector.
    """
    keep = set(hooks)
    missing = keep - set(steered.hook_names)
    if missing:
        raise HookNameError(f"no vector at {sorted(missing)}; vectors are at {list(steered.hook_names)}.")
    vectors = steered.vectors
    original = vectors.delta

    def delta(hook_name, act):
        d = original(hook_name, act)
        return d if hook_name in keep else torch.zeros_like(d)

    vectors.__dict__["delta"] = delta
    try:
        yield
    finally:
        vectors.__dict__.pop("delta", None)


def _text_tokens(steered, texts: str | Sequence[str]):
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise EmptyInputError("texts: got none; give at least one text.")
    n_ctx = int(steered.cfg.n_ctx)
    seqs = [steered.to_tokens(t)[:n_ctx] for t in texts]
    tokens, mask = steered.left_pad(seqs)
    keep = mask.bool().clone()
    first = mask.argmax(1)
    keep[torch.arange(len(seqs)), first] = False  # BOS: outsized norm, not a content token
    return tokens, mask, keep


# ---------------------------------------------------------------------------------------------------
# norms and cosines
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VectorStats:
    """Norms and pairwise cosines of the vectors of a steered model.

    Attributes:
        hooks: hook names.
        norms: ``[n_hooks]`` L2 norms (residual units).
        cosines: ``[n_hooks, n_hooks]`` cosine similarities.
        resid_norms: ``[n_hooks]`` median per-token residual norm at each hook (base model, on the
            texts given), or ``None`` without texts.
    """

    hooks: list[str]
    norms: Float[Tensor, " n_hooks"]
    cosines: Float[Tensor, "n_hooks n_hooks"]
    resid_norms: Float[Tensor, " n_hooks"] | None = None

    @property
    def relative_norms(self) -> Float[Tensor, " n_hooks"] | None:
        """``||v_h|| / median_t ||x_t||`` per hook (``None`` without residual norms)."""
        return None if self.resid_norms is None else self.norms / self.resid_norms

    def to_pandas(self):
        """One row per hook: norm, residual norm, relative norm."""
        import pandas as pd

        df = pd.DataFrame({"hook": self.hooks, "norm": self.norms.tolist()})
        if self.resid_norms is not None:
            df["resid_norm"] = self.resid_norms.tolist()
            df["relative_norm"] = self.relative_norms.tolist()
        return df

    def plot(self):
        """Two panels: norms per hook (relative to the residual when known) and the cosine heatmap."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        rel = self.relative_norms
        y = rel if rel is not None else self.norms
        fig = make_subplots(rows=1, cols=2, subplot_titles=(
            "||v|| / residual norm" if rel is not None else "||v||", "cosine(v_i, v_j)"))
        fig.add_trace(go.Bar(x=self.hooks, y=y.tolist(), showlegend=False), row=1, col=1)
        fig.add_trace(go.Heatmap(z=self.cosines.tolist(), x=self.hooks, y=self.hooks, colorscale="RdBu",
                                 zmid=0, zmin=-1, zmax=1), row=1, col=2)
        fig.update_layout(title="Steering vectors: norms and cosines")
        return fig

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html()


def vector_stats(steered: SteeredTransformer, texts: str | Sequence[str] | None = None) -> VectorStats:
    """Per-hook norms and pairwise cosine similarities of the steering vectors.

    With ``texts``, also the median per-token residual norm at each hook on them (base model, BOS
    and padding left out), so norms can be read relative to the stream they are added to (the
    "small vectors" of Sinii et al. 2025). For gated vectors the norms are those before the gate.

    Returns:
        A :class:`VectorStats`.

    Raises:
        EmptyInputError: ``texts`` is an empty list.
    """
    hooks = list(steered.hook_names)
    vecs = torch.stack([steered.vectors.direction(h).detach().float().cpu() for h in hooks])
    norms = vecs.norm(dim=-1)
    unit = vecs / norms.clamp_min(1e-12)[:, None]
    cos = unit @ unit.T
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.full_like(cos, float("nan")))
    resid = None
    if texts is not None:
        tokens, mask, keep = _text_tokens(steered, texts)
        with torch.no_grad(), steered.disabled():
            _, cache = steered.run_with_cache(tokens, attention_mask=mask, names_filter=hooks, return_type=None)
        resid = torch.stack([cache[h].float().norm(dim=-1)[keep].median().cpu() for h in hooks])
    return VectorStats(hooks=hooks, norms=norms, cosines=cos, resid_norms=resid)


# ---------------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Persistence:
    """How the write of each vector, added alone, persists through later residual points.

    Attributes:
        sources: the hooks whose vector was added (one at a time).
        points: the residual-stream points measured, in forward order.
        cos_vector: ``[n_sources, n_points]`` mean over tokens of ``cos(Δh_p(t), v_source)``.
        cos_mean_shift: ``[n_sources, n_points]`` mean over tokens of ``cos(Δh_p(t), mean_t Δh_p)``
            (1: the same shift at every token; lower: token-dependent).
        norm_ratio: ``[n_sources, n_points]`` mean over tokens of ``||Δh_p(t)|| / ||v_source||``
            (all three are NaN where the point precedes the source).
    """

    sources: list[str]
    points: list[str]
    cos_vector: Float[Tensor, "n_sources n_points"]
    cos_mean_shift: Float[Tensor, "n_sources n_points"]
    norm_ratio: Float[Tensor, "n_sources n_points"]

    def to_pandas(self):
        """Long table: ``source, point, cos_vector, cos_mean_shift, norm_ratio`` (measured cells only)."""
        import pandas as pd

        rows = []
        for i, s in enumerate(self.sources):
            for j, p in enumerate(self.points):
                if not math.isnan(float(self.cos_vector[i, j])):
                    rows.append({"source": s, "point": p, "cos_vector": float(self.cos_vector[i, j]),
                                 "cos_mean_shift": float(self.cos_mean_shift[i, j]),
                                 "norm_ratio": float(self.norm_ratio[i, j])})
        return pd.DataFrame(rows)

    def plot(self):
        """Lines per source vector across later points: the three measures in three panels."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=(
            "cos(Δh, v_source)", "cos(Δh(t), mean_t Δh)", "||Δh|| / ||v_source||"))
        for i, s in enumerate(self.sources):
            for row, vals in enumerate((self.cos_vector, self.cos_mean_shift, self.norm_ratio), start=1):
                y = vals[i]
                ok = ~torch.isnan(y)
                fig.add_trace(go.Scatter(x=[p for p, k in zip(self.points, ok.tolist(), strict=True) if k],
                                         y=y[ok].tolist(), mode="lines+markers", name=s, legendgroup=s,
                                         showlegend=row == 1), row=row, col=1)
        fig.update_layout(title="Persistence of each vector's write through later layers", height=750)
        return fig

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html()


@torch.no_grad()
def persistence(
    steered: SteeredTransformer, texts: str | Sequence[str], *, sources: Sequence[str] | None = None
) -> Persistence:
    """Follow the write of each vector, added alone, through every later residual point.

    For each source hook ``ℓ`` (default: every steered hook) the texts are run with only ``v_ℓ`` on
    and with no vector; at each residual point ``p`` at or after ``ℓ`` (all
    ``blocks.L.hook_resid_pre/mid/post`` the model has, in forward order)
    ``Δh_p(t) = h_p^steered(t) - h_p^base(t)`` per token (BOS and padding left out) gives
    ``cos(Δh_p(t), v_ℓ)``, ``cos(Δh_p(t), mean_t Δh_p)`` and ``||Δh_p(t)|| / ||v_ℓ||``, averaged over
    tokens. At the source itself ``Δh = v_ℓ`` (cosines 1, ratio 1 for a plain vector). This is the
    persistence analysis of Sinii et al. 2025 ("Small Vectors, Big Effects").

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` with vectors at residual-stream hooks.
        texts: evaluation texts (one or several).
        sources: the hooks to add one at a time (default: all).

    Returns:
        A :class:`Persistence`.

    Raises:
        HookNameError: a source is not a steered residual-stream hook.
        EmptyInputError: no texts.
    """
    sources = list(sources) if sources is not None else list(steered.hook_names)
    for s in sources:
        if s not in steered.hook_names:
            raise HookNameError(f"source {s!r} carries no vector; vectors are at {list(steered.hook_names)}.")
        _order(s)
    n_layers = int(steered.cfg.n_layers)
    points = [f"blocks.{layer}.hook_{kind}" for layer in range(n_layers) for kind in ("resid_pre", "resid_mid",
              "resid_post") if f"blocks.{layer}.hook_{kind}" in steered.model.hook_dict]
    points = sorted(set(points) | set(sources), key=_order)
    tokens, mask, keep = _text_tokens(steered, texts)
    with steered.disabled():
        _, base = steered.run_with_cache(tokens, attention_mask=mask, names_filter=points, return_type=None)
    shape = (len(sources), len(points))
    cv, cm, nr = (torch.full(shape, float("nan")) for _ in range(3))
    for i, s in enumerate(sources):
        v = steered.vectors.direction(s).detach().float()
        vnorm = v.norm().clamp_min(1e-12)
        with only_hooks(steered, [s]):
            _, cache = steered.run_with_cache(tokens, attention_mask=mask, names_filter=points, return_type=None)
        for j, p in enumerate(points):
            if _order(p) < _order(s):
                continue
            dh = (cache[p].float() - base[p].float())[keep]  # [n_tokens, d_model]
            mean = dh.mean(0)
            cos_v = torch.nn.functional.cosine_similarity(dh, v[None].to(dh.device), dim=-1)
            cos_m = torch.nn.functional.cosine_similarity(dh, mean[None], dim=-1)
            cv[i, j] = cos_v.mean().cpu()
            cm[i, j] = cos_m.mean().cpu()
            nr[i, j] = (dh.norm(dim=-1) / vnorm).mean().cpu()
    return Persistence(sources=sources, points=points, cos_vector=cv, cos_mean_shift=cm, norm_ratio=nr)


# ---------------------------------------------------------------------------------------------------
# combination gain
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CombinationGain:
    """Accuracies of single hooks, pairs and all hooks together, and the pairwise gain.

    Attributes:
        hooks: hook names.
        single: ``[n]`` ``acc_i`` with only hook ``i``'s vector on.
        pair: ``[n, n]`` ``acc_ij`` with hooks ``i`` and ``j`` on (diagonal = ``single``).
        all: ``acc_all`` with every vector on.
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

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html()


def pair_gain(acc_i: float, acc_j: float, acc_ij: float, acc_all: float) -> float:
    """``(acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))``; NaN when the denominator is 0."""
    best = max(acc_i, acc_j)
    den = acc_all - best
    return float("nan") if den == 0 else (acc_ij - best) / den


def _metric(evaluate: Callable[..., object], steered) -> float:
    value = evaluate(steered)
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise MetricError(f"evaluate returned {type(value).__name__}; expected one number (e.g. an accuracy).") from e
    if not math.isfinite(value):
        raise MetricError(f"evaluate returned {value}; expected a finite number.")
    return value


def combination_gain(steered: SteeredTransformer, evaluate: Callable[..., object]) -> CombinationGain:
    """Evaluate every single hook, every pair and all hooks, and the gain of each pair.

    ``evaluate(steered) -> float`` is called with the vectors switched on selectively
    (:func:`only_hooks`): ``n + n(n-1)/2 + 2`` calls (singles, pairs, all, none). The gain
    ``(acc_ij - max(acc_i, acc_j)) / (acc_all - max(acc_i, acc_j))`` is 1 when a pair recovers all of
    what the full set adds over its better member and 0 when the pair adds nothing (Sinii et al.
    2025).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` with at least two hooks.
        evaluate: the accuracy (or any metric, larger is better), e.g. ``lambda s: sampled_rate(s, ...)``.

    Returns:
        A :class:`CombinationGain`.

    Raises:
        ConfigError: fewer than two hooks.
        MetricError: ``evaluate`` returned a non-number or a non-finite value.
    """
    hooks = list(steered.hook_names)
    n = len(hooks)
    if n < 2:
        raise ConfigError(f"combination_gain needs vectors at >= 2 hooks, got {hooks}.")
    single = torch.zeros(n)
    pair = torch.full((n, n), float("nan"))
    for i, h in enumerate(hooks):
        with only_hooks(steered, [h]):
            single[i] = _metric(evaluate, steered)
        pair[i, i] = single[i]
    for i, j in itertools.combinations(range(n), 2):
        with only_hooks(steered, [hooks[i], hooks[j]]):
            pair[i, j] = pair[j, i] = _metric(evaluate, steered)
    acc_all = _metric(evaluate, steered)
    with steered.disabled():
        base = _metric(evaluate, steered)
    gain = torch.full((n, n), float("nan"))
    for i, j in itertools.combinations(range(n), 2):
        gain[i, j] = gain[j, i] = pair_gain(float(single[i]), float(single[j]), float(pair[i, j]), acc_all)
    return CombinationGain(hooks=hooks, single=single, pair=pair, all=acc_all, base=base, gain=gain)


# ---------------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transfer:
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
        import plotly.graph_objects as go

        models = [self.source_model, self.target_model]
        fig = go.Figure([go.Bar(name="base", x=models, y=[self.source_base, self.target_base]),
                         go.Bar(name="steered", x=models, y=[self.source_steered, self.target_steered])])
        fig.update_layout(barmode="group", title=f"Transfer of the vector (ratio {self.transfer_ratio:.2f})")
        return fig

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html()


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
        sb = _metric(evaluate, steered)
    ss = _metric(evaluate, steered)
    with target.disabled():
        tb = _metric(evaluate, target)
    ts = _metric(evaluate, target)
    return Transfer(source_model=steered.info.name, target_model=target.info.name, source_base=sb,
                    source_steered=ss, target_base=tb, target_steered=ts)


# ---------------------------------------------------------------------------------------------------
# a metric for the analyses
# ---------------------------------------------------------------------------------------------------
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
) -> float:
    """Mean reward of ``n_samples`` sampled completions per prompt (e.g. the rate of a word).

    With ``reward=steer_lens.train.rewards.contains("dog")`` this is the fraction of completions
    that contain "dog". Uses the vectors as they are (wrap in ``steered.disabled()`` for the base).

    Raises:
        EmptyInputError: no prompts.
        RewardError: the reward failed (see :func:`steer_lens.train.rewards.score`).
    """
    from steer_lens.generation import repeat_prompts
    from steer_lens.train.rewards import score

    prompts = repeat_prompts(prompts, n_samples)
    gen = steered.sample(prompts, max_new_tokens, temperature=temperature, seed=seed)
    return float(score(reward, prompts, gen.completions).mean())
