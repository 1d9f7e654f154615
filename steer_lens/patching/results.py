"""Result objects of the patching analyses: CPU tensors with axis labels, plots and tables."""

from __future__ import annotations

import html
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.patching._results_view import attribution_table, patch_figure, patch_table, path_table
from steer_lens.results import Result

__all__ = [
    "NOISE_ULPS",
    "NoisyMetricWarning",
    "PatchResult",
    "PathPatchResult",
    "PathVariantAccuracy",
    "VectorAttribution",
    "is_within_noise",
    "noise_floor",
    "warn_if_noisy",
]

_NOT_PATHS = ("all_paths", "frozen_patterns")


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


# ---------------------------------------------------------------------------------------------------
# numerical noise of a metric gap
# ---------------------------------------------------------------------------------------------------
NOISE_ULPS = 100.0
"""Units of ``eps(dtype) · max(|metric|, 1)`` below which a metric gap counts as rounding noise."""


class NoisyMetricWarning(UserWarning):
    """The gap between the two reference runs of a patching analysis (clean vs corrupted, steered vs
    base) is within the numerical noise of the model's dtype: effects, fractions and additivity
    computed from it are rounding noise, not findings. The result is marked (``within_noise``)."""


def noise_floor(scale: float, dtype: torch.dtype = torch.float32) -> float:
    """The smallest metric gap that is not rounding noise: ``NOISE_ULPS · eps(dtype) · max(|scale|, 1)``.

    Why this bound: a metric is computed from logits through a forward pass whose every matmul and
    reduction rounds at ``eps(dtype)`` relative to the magnitudes involved. Metrics are made of values of
    order ``max(|metric|, 1)`` (logits, log-probabilities, probabilities that sum to 1), so two runs
    that differ only in batching or reduction order (the batched sweep vs one pass per site) disagree
    by a few ``eps`` in that unit: measured ≤ 7·eps·scale (3.3e-6 on a logit difference of ~4, fp32,
    TinyStories-656K vs TransformerLens). ``NOISE_ULPS = 100`` leaves a >10× margin over that, yet flags
    the failure seen in practice (a ``prob_change`` of ~1e-6 on a token the model never predicts; fp32
    floor 1.2e-5).

    Args:
        scale: the metric's magnitude (e.g. ``max(|clean|, |corrupted|)``), in the metric's units.
        dtype: the precision the metric was computed in (the model's dtype); non-float dtypes use fp32.

    Returns:
        The floor, in the metric's units (fp32, scale ≤ 1: ``1.19e-5``; bf16: ``0.78``).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        dtype = torch.float32
    return NOISE_ULPS * torch.finfo(dtype).eps * max(abs(float(scale)), 1.0)


def is_within_noise(gap: float, scale: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a metric gap ``|gap|`` (e.g. clean − corrupted, steered − base) is below
    :func:`noise_floor` ``(scale, dtype)``: too small to be told apart from rounding.

    Args:
        gap: the difference of two metric values (metric's units).
        scale: the metric's magnitude (e.g. the larger of the two values' absolute values).
        dtype: the precision the metric was computed in.

    Returns:
        ``True`` when the gap is rounding noise (NaN gaps count as noise).
    """
    return not abs(float(gap)) >= noise_floor(scale, dtype)


def warn_if_noisy(
    first: float,
    second: float,
    dtype: torch.dtype,
    *,
    what: str,
    names: tuple[str, str] = ("clean", "corrupted"),
    stacklevel: int | None = None,
) -> float:
    """Warn (:class:`NoisyMetricWarning`) when ``first - second`` is within the noise floor of ``dtype``.

    Args:
        first, second: the two reference metrics (e.g. clean and corrupted; steered and base).
        dtype: the precision of the runs (the model's dtype).
        what: the analysis, for the message (e.g. ``"activation_patch"``).
        names: the names of the two runs, for the message.
        stacklevel: as :func:`warnings.warn`; default: the first caller outside steer_lens.

    Returns:
        The noise floor (:func:`noise_floor` at scale ``max(|first|, |second|)``), to store in the result.
    """
    scale = max(abs(first), abs(second))
    floor = noise_floor(scale, dtype)
    if is_within_noise(first - second, scale, dtype):
        name = str(dtype).removeprefix("torch.")
        warnings.warn(
            f"{what}: the {names[0]} and {names[1]} metrics differ by {first - second:.3g}, within the "
            f"{name} noise floor {floor:.3g} of a metric of this size: effects, normalized() fractions and "
            "additivity are rounding noise, not findings (the result has within_noise=True). Fix: use a "
            "metric with a real gap, e.g. logit_diff/logprob on tokens the model predicts rather than "
            "prob_change on a token it never predicts, or a pair of inputs (or a vector) that changes it.",
            NoisyMetricWarning,
            stacklevel=stacklevel if stacklevel is not None else _caller_level(sys._getframe()),
        )
    return floor


_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../steer_lens


def _caller_level(frame) -> int:
    """``stacklevel`` (1 = ``frame``, the one calling ``warnings.warn``) of the first frame outside
    steer_lens and outside generated or type-checking wrappers (jaxtyping, beartype)."""
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith((_PKG, "<")) or "jaxtyping" in name or "beartype" in name):
            break
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True, kw_only=True)
class PatchResult(Result):
    """The metric for every patched site (or its attribution estimate), with axis labels.

    Attributes:
        values: ``[*axes]`` tensor on the CPU, one value per site. For ``activation_patch`` and
            ``steering_patch`` this is the metric of the patched run (exactly what TransformerLens's
            ``get_act_patch_*`` returns); for ``attribution_patch`` it is the first-order estimate of
            the *change* ``metric(patched) - metric(corrupted)``.
        axes: axis names, e.g. ``("layer", "pos")`` or ``("layer", "pos", "head")``.
        labels: for each axis, one label per index (positions carry their token, e.g. ``"3: dog"``).
        hook: the short hook name patched (``"resid_pre"``, ``"z"`` ...).
        kind: ``"activation"``, ``"denoise"``, ``"noise"`` or ``"attribution"``.
        metric_name: name of the metric.
        clean_metric: metric of the clean run (source of the patched activations).
        corrupted_metric: metric of the corrupted run (the run that is patched).
        noise_floor: the smallest ``|clean_metric - corrupted_metric|`` that is not rounding noise for
            the model's dtype (:func:`noise_floor`; metric's units; ``0.0``: not computed).
        vector_hooks: ``steering_patch`` only: the hooks where the steering vector is added.
        before_vector: ``steering_patch`` only: the swept layers whose patched hook fires before every
            vector hook (e.g. ``blocks.0.hook_resid_post`` for a vector at ``blocks.1.hook_resid_pre``):
            there the steered and base activations are the same, so those values equal the baseline
            up to rounding.
    """

    _rank_by = "effect"  # top(k): the k sites with the largest absolute effect
    _rank_abs = True

    values: Float[Tensor, "..."]
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    hook: str
    kind: str
    metric_name: str
    clean_metric: float
    corrupted_metric: float
    noise_floor: float = 0.0
    vector_hooks: tuple[str, ...] = ()
    before_vector: tuple[int, ...] = ()

    @property
    def within_noise(self) -> bool:
        """Whether the clean–corrupted (steered–base) gap is below :attr:`noise_floor`: the effects
        are then rounding noise (a :class:`NoisyMetricWarning` was issued when the result was made)."""
        return abs(self.clean_metric - self.corrupted_metric) < self.noise_floor

    @property
    def effect(self) -> Float[Tensor, "..."]:
        """Change of the metric caused by each patch: ``values - corrupted_metric`` (attribution: values)."""
        if self.kind == "attribution":
            return self.values
        return self.values - self.corrupted_metric

    def normalized(self) -> Float[Tensor, "..."]:
        """Fraction of the clean-vs-corrupted gap each patch recovers: ``effect / (clean - corrupted)``.

        ``1`` means the patch alone restores the clean metric, ``0`` means no effect. Returns NaN
        everywhere when the two runs have the same metric or the gap is :attr:`within_noise`
        (dividing by rounding noise gives arbitrary fractions).
        """
        gap = self.clean_metric - self.corrupted_metric
        if gap == 0 or self.within_noise:
            return torch.full_like(self.effect, float("nan"))
        return self.effect / gap

    def to_pandas(self):
        """Long table: one row per site with the axis indices, their labels, ``value`` and ``effect``."""
        return patch_table(self)

    def plot(self, *, normalized: bool = False):
        """Plotly figure: a heatmap for 2 axes (layer × position with token labels, layer × head), one
        heatmap per layer for 3 axes, a bar chart for 1 axis. Never calls ``.show()``.

        Args:
            normalized: plot :meth:`normalized` (fraction of the gap recovered) instead of the values.
        """
        return patch_figure(self, normalized)

    def token_view(self, *, normalized: bool = False):
        """circuitsvis colored-tokens view of the effect per position (summed over the other axes).

        Needs ``"pos"`` among the axes; the tokens are the position labels (the corrupted run's first
        sequence).

        Raises:
            ConfigError: the result has no position axis.
        """
        from steer_lens import plotting
        from steer_lens.errors import ConfigError

        if "pos" not in self.axes:
            raise ConfigError(
                f"token_view: the result's axes {self.axes} have no 'pos'; patch with by=(..., 'pos')."
            )
        v = self.normalized() if normalized else self.effect
        k = self.axes.index("pos")
        per_pos = v.movedim(k, 0).reshape(v.shape[k], -1).sum(1)
        tokens = [lab.split(": ", 1)[-1] for lab in self.labels["pos"]]
        return plotting.token_view(tokens, per_pos)

    def _notes(self) -> list[str]:
        notes = []
        if self.vector_hooks:
            notes.append(f"vector at {', '.join(self.vector_hooks)}")
        if self.before_vector:
            notes.append(f"layers {list(self.before_vector)} are before the vector")
        if self.within_noise:
            notes.append(f"WITHIN NOISE (gap below {self.noise_floor:.2g})")
        return notes

    def _summary(self) -> str:
        notes = "".join(f"; {html.escape(n)}" for n in self._notes())
        return (
            f"<b>PatchResult</b> ({html.escape(self.kind)}, hook <code>{html.escape(self.hook)}</code>, "
            f"metric {html.escape(self.metric_name)}): axes {self.axes} shape {list(self.values.shape)}; "
            f"clean {_fmt(self.clean_metric)}, corrupted {_fmt(self.corrupted_metric)}{notes}"
        )

    def __repr__(self) -> str:
        notes = "".join(f", {n}" for n in self._notes())
        return (
            f"PatchResult(kind={self.kind!r}, hook={self.hook!r}, axes={self.axes}, "
            f"shape={list(self.values.shape)}, clean={self.clean_metric:.4g}, "
            f"corrupted={self.corrupted_metric:.4g}{notes})"
        )


@dataclass(frozen=True, kw_only=True)
class VectorAttribution(Result):
    """Attribution of the metric to the steering vector at each position: ``delta · ∂metric/∂h``.

    Attributes:
        values: ``[hook, batch, pos]`` first-order estimate of how much the vector added at that
            hook and position changes the (batch-mean) metric; summing over positions and hooks
            estimates the whole vector's effect.
        hooks: the steered hook names.
        tokens: per sequence, the token strings (``None`` without a tokenizer).
        total_effect: the exact ``metric(steered) - metric(base)``.
        at: ``"steered"`` or ``"base"``: where the gradient was taken.
        metric_name: name of the metric.
    """

    _rank_by = "attribution"  # top(k): the k (hook, sequence, position) rows of largest |attribution|
    _rank_abs = True

    values: Float[Tensor, "hook batch pos"]
    hooks: tuple[str, ...]
    tokens: list[list[str]] | None
    total_effect: float
    at: str
    metric_name: str

    @property
    def per_position(self) -> Float[Tensor, "hook pos"]:
        """Attribution summed over the batch, ``[hook, pos]``."""
        return self.values.sum(1)

    def to_pandas(self):
        """One row per (hook, sequence, position) with the token and the attribution."""
        return attribution_table(self)

    def plot(self, *, batch_index: int | None = None):
        """Bar chart per position (summed over the batch, or one sequence), first hook.

        Args:
            batch_index: plot one sequence instead of the batch sum.
        """
        from steer_lens import plotting

        v = self.per_position[0] if batch_index is None else self.values[0, batch_index]
        b = 0 if batch_index is None else batch_index
        labels = (
            [f"{p}: {t}" for p, t in enumerate(self.tokens[b])]
            if self.tokens
            else [str(p) for p in range(v.shape[0])]
        )
        return plotting.bar(
            v,
            labels,
            title=f"vector attribution at {self.hooks[0]} ({self.metric_name})",
            y_title=f"delta · grad ({self.metric_name})",
        )

    def token_view(self, batch_index: int = 0, hook_index: int = 0):
        """circuitsvis colored-tokens view of one sequence's attribution per position."""
        from steer_lens import plotting

        toks = self.tokens[batch_index] if self.tokens else [str(p) for p in range(self.values.shape[2])]
        return plotting.token_view(toks, self.values[hook_index, batch_index])

    def _repr_html_(self) -> str:
        est = float(self.values.sum())
        return (
            f"<div><b>VectorAttribution</b> at {html.escape(', '.join(self.hooks))} "
            f"(gradient at the {self.at} run): sum {_fmt(est)} vs exact effect {_fmt(self.total_effect)} "
            f"({html.escape(self.metric_name)})</div>"
        )


@dataclass(frozen=True, kw_only=True)
class PathPatchResult(Result):
    """A steering vector's effect on the metric split by path.

    Attributes:
        effects: ``{path name: metric change}`` (metric of the path run minus the base metric). Names:
            ``"direct"``, ``"head L.H"``, ``"mlp L"`` (single paths), ``"all_paths"`` (every
            single path at once) and the frozen-pattern run ``"frozen_patterns"``.
        variants: the "Small Vectors, Big Effects" runs on the first block that reads the vector:
            ``{name: metric change}`` (``"skip_attention"``, ``"skip_layer"``, ``"attn_to_residual"``,
            ``"attn_to_mlp"``, ``"attn_to_both"``, ``"knockout head H"``, ``"only head H"``; with
            ``variants="full"`` the routed ``"knockout head H -> all|residual|mlp"`` / ``"only head H ->
            ..."`` instead of the last two, ``"knockout q head H"``, ``"knockout k kv-head G"``,
            ``"knockout v kv-head G"``, ``"knockout v all heads"``, ``"knockout group G"`` and the
            ``"only ..."`` of each). :meth:`to_pandas` splits the names into columns.
        total_effect: ``metric(steered) - metric(base)``.
        base_metric, steered_metric: the two reference runs.
        hook: the vector's hook.
        block: the block the variants act on (``None`` when no block reads the vector).
        metric_name: name of the metric.
        head_effects: ``[layer, head]`` effects of the single head paths of the layers that read the vector.
        variant_kl: ``{variant: [batch, pos] float64}`` per-token ``KL(p_ref || p_variant)`` (NaN at
            padding), when ``path_patch(..., kl=...)``; else ``None``.
        kl_reference: which run ``p_ref`` is: ``"paper"`` (the steered run; the ``skip_attention`` run for
            the ``only ...`` variants), ``"steered"`` or ``"base"``; ``None`` without KL.
        noise_floor: the metric's noise floor in the model's dtype (:func:`noise_floor`); when
            ``|total_effect|`` is below it the result is :attr:`within_noise`, a
            :class:`NoisyMetricWarning` was raised and :attr:`additivity` is NaN.
    """

    _rank_by = "effect"  # top(k): the k paths / variants with the largest absolute effect
    _rank_abs = True

    effects: dict[str, float]
    variants: dict[str, float]
    total_effect: float
    base_metric: float
    steered_metric: float
    hook: str
    block: int | None
    metric_name: str
    head_effects: Float[Tensor, "layer head"] | None = field(default=None)
    variant_kl: dict[str, Float[Tensor, "batch pos"]] | None = field(default=None)
    kl_reference: str | None = field(default=None)
    noise_floor: float = field(default=0.0)

    @property
    def within_noise(self) -> bool:
        """Whether the steered-minus-base metric gap is within the dtype's noise floor (effects are noise)."""
        return abs(self.total_effect) <= self.noise_floor

    @property
    def path_sum(self) -> float:
        """Sum of the single-path effects (direct + every head + every MLP, each measured alone)."""
        return float(sum(v for k, v in self.effects.items() if k not in _NOT_PATHS))

    @property
    def additivity(self) -> float:
        """``path_sum / total_effect``: 1 when the paths add up to the whole effect (NaN if no effect, or
        when the effect is within the noise floor: a ratio of float noise means nothing)."""
        if self.total_effect == 0 or self.within_noise:
            return float("nan")
        return self.path_sum / self.total_effect

    def to_pandas(self):
        """Table with one row per path and per variant: ``group``, ``name``, ``effect``, ``fraction``, and
        for the variants the parts of the name: ``kind`` (``knockout`` / ``only``, or the whole-block
        variant's name), ``part`` (``z``: the head's output, ``q`` / ``k`` / ``v``), ``unit`` (``head``,
        ``kv-head``, ``group``, ``all heads``), ``head`` (query head or key-value head / group index),
        ``route`` (``all`` / ``residual`` / ``mlp``) and ``kl`` (mean per-token KL, when computed)."""
        return path_table(self)

    def plot(self, *, variants: bool = False):
        """Bar chart of path contributions (with the total and the sum of paths), or of the variants."""
        from steer_lens import plotting

        items = (
            dict(self.variants)
            if variants
            else {**{k: v for k, v in self.effects.items()}, "sum of paths": self.path_sum}
        )
        items["total"] = self.total_effect
        title = (
            f"'Small Vectors, Big Effects' variants on block {self.block}"
            if variants
            else f"paths of the vector at {self.hook}"
        ) + f" ({self.metric_name} change)"
        return plotting.bar(
            torch.tensor(list(items.values())),
            list(items),
            title=title,
            y_title=f"change of {self.metric_name}",
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in self.effects.items()
        )
        return (
            f"<div><b>PathPatchResult</b> vector at <code>{html.escape(self.hook)}</code> "
            f"({html.escape(self.metric_name)}): total {_fmt(self.total_effect)}, sum of paths "
            f"{_fmt(self.path_sum)} ({self.additivity:.1%})<table>{rows}</table></div>"
        )


@dataclass(frozen=True, kw_only=True)
class PathVariantAccuracy(Result):
    """Accuracy of answers sampled through each path-patching variant (:func:`path_variant_accuracy`).

    Attributes:
        variants: the variant names, in the order asked.
        accuracy: ``[variant]`` fraction of the ``n_prompts * n_samples`` answers that are correct.
        ci_low, ci_high: ``[variant]`` Wilson 95% interval of :attr:`accuracy` over those answers (it treats
            the answers as independent draws; the samples of one prompt are not, so read it as a lower
            bound on the uncertainty and :attr:`per_prompt` for the spread over prompts).
        per_prompt: ``[variant, prompt]`` fraction of a prompt's samples that are correct.
        rewards: ``[variant, prompt, sample]`` the reward of every answer (float64).
        completions: ``{variant: completions}`` in prompt-major order (``n_samples`` per prompt).
        hook: the analysed vector's hook; block: the block the variants act on.
        n_samples, max_new_tokens: sampling settings; temperature: 0.0 for greedy decoding.
        others: whether the wrapper's other vectors were on in every copy.
        step_logits: ``{variant: ([rows, steps, d_vocab], ...)}`` next-token logits per chunk of prompts
            (``keep_logits=True`` only).
    """

    _rank_by: ClassVar[str | None] = None  # the table keeps the order asked

    variants: tuple[str, ...]
    accuracy: Float[Tensor, " variant"]
    ci_low: Float[Tensor, " variant"]
    ci_high: Float[Tensor, " variant"]
    per_prompt: Float[Tensor, "variant prompt"]
    rewards: Float[Tensor, "variant prompt sample"]
    completions: dict[str, tuple[str, ...]]
    hook: str
    block: int
    n_samples: int
    temperature: float
    max_new_tokens: int
    others: bool = False
    step_logits: dict[str, tuple[Tensor, ...]] | None = field(default=None)

    def __getitem__(self, variant: str) -> float:
        """The accuracy of one variant."""
        return float(self.accuracy[self.variants.index(variant)])

    def to_pandas(self):
        """One row per variant: ``variant``, ``accuracy``, ``ci_low``, ``ci_high``, ``correct``, ``n``,
        ``mean_reward``, and the accuracy change against ``"base"`` / ``"steered"`` when those ran."""
        import pandas as pd

        n = self.rewards.shape[1] * self.rewards.shape[2]
        df = pd.DataFrame({
            "variant": list(self.variants), "accuracy": self.accuracy.tolist(), "ci_low": self.ci_low.tolist(),
            "ci_high": self.ci_high.tolist(), "correct": (self.accuracy * n).round().long().tolist(), "n": n,
            "mean_reward": self.rewards.mean((1, 2)).tolist(),
        })
        for ref in ("base", "steered"):
            if ref in self.variants:
                df[f"vs_{ref}"] = df["accuracy"] - self[ref]
        return df

    def plot(self):
        """Bar chart of the accuracy per variant with its Wilson interval."""
        from steer_lens import plotting

        fig = plotting.bar(self.accuracy, list(self.variants), y_title="accuracy",
                           title=f"accuracy of sampled answers per variant (vector at {self.hook}, block {self.block})")
        fig.update_traces(error_y={"type": "data", "symmetric": False,
                                   "array": (self.ci_high - self.accuracy).tolist(),
                                   "arrayminus": (self.accuracy - self.ci_low).tolist()})
        return fig

    def _summary(self) -> str:
        n_p, n_s = self.rewards.shape[1], self.rewards.shape[2]
        return (f"<b>PathVariantAccuracy</b> vector at <code>{html.escape(self.hook)}</code>, block {self.block}: "
                f"{n_p} prompts x {n_s} samples, temperature {self.temperature:g}, "
                f"{self.max_new_tokens} new tokens")
