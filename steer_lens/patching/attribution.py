"""Attribution patching: a gradient estimate of activation patching for every site at once.

Attribution patching (Nanda 2023, "Attribution patching: activation patching at industrial scale";
Syed et al. 2023; Kramár et al. 2024, AtP) replaces the patched run by its first-order Taylor
expansion around the corrupted run:

``metric(patched at site s) - metric(corrupted) ≈ Σ_{elements of s} (a_clean - a_corrupted) · ∂metric/∂a``

where the gradient is taken on the corrupted run. One clean forward pass (no gradient), one
corrupted forward pass and one backward pass give the estimate for every site of every layer.
The estimate is exact for sites whose effect is linear (e.g. the last residual stream position
feeding a logit difference through the final norm is *not* linear, so expect deviations there);
:func:`activation_patch` gives the exact numbers.

:func:`vector_attribution` applies the same idea to a steering vector: ``delta · ∂metric/∂h`` at each
position where the vector ``delta`` is added estimates how much the vector at that position
contributes to the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens._utils import token_pieces
from steer_lens.errors import ConfigError, MetricError, ShapeMismatchError
from steer_lens.metrics import Metric, MetricFn, call_metric
from steer_lens.patching._sites import (
    _AXIS_DIM,
    By,
    _check_metric,
    _check_tokens,
    _labels,
    _prepare,
)
from steer_lens.patching.results import PatchResult, VectorAttribution, warn_if_noisy

__all__ = ["attribution_patch", "vector_attribution"]


def _grab_hooks(acts: dict[str, Tensor], names: Sequence[str]) -> list:
    """Hooks that keep each activation on the autograd graph (a fresh leaf when nothing upstream is)."""

    def grab(act, hook):
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    return [(n, grab) for n in names]


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "clean_batch clean_pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: MetricFn | Metric,
    hook: str = "resid_pre",
    *,
    by: By = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PatchResult:
    """First-order estimate of activation patching for every site, in 2 forward + 1 backward passes.

    ``values[site] = Σ_{batch, elements of site} (a_clean - a_corrupted) · ∂metric/∂a |_corrupted``,
    an estimate of ``metric(patched) - metric(corrupted)`` (note: the *change*, whereas
    :func:`activation_patch` returns the patched metric itself; compare with its ``.effect``).
    The gradient at a hook includes every downstream path (it is the total derivative).

    Args:
        model: a ``HookedTransformer`` or ``SteeredTransformer`` (vectors on in both runs).
        clean_tokens, corrupted_tokens: ``[batch, pos]`` inputs of the same shape.
        metric: logits -> scalar (or ``[batch]``, averaged), as :func:`activation_patch`.
        hook, by, layers, heads, positions: the sites, as :func:`activation_patch` (a full hook name
            such as ``"blocks.1.hook_resid_pre"`` means that layer only).

    Returns:
        :class:`~steer_lens.patching.PatchResult` with ``kind="attribution"``; ``values`` in the metric's
        units (a change of the metric).

    Raises:
        HookNameError, ConfigError, ShapeMismatchError: as :func:`activation_patch`.
        MetricError: the metric is not a differentiable scalar, or is non-finite.

    Warns:
        NoisyMetricWarning: the clean and corrupted metrics differ by rounding noise only (the result
            is marked ``within_noise``).
    """
    base, hooks, clean_tokens, corrupted_tokens, plan = _prepare(
        model, clean_tokens, corrupted_tokens, metric, hook, by,
        layers=layers, heads=heads, positions=positions,
    )
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ShapeMismatchError(
            f"clean_tokens has shape {list(clean_tokens.shape)}, corrupted_tokens "
            f"{list(corrupted_tokens.shape)}; expected the same shape. Fix: pad both to one length."
        )
    names = [plan.names[layer] for layer in plan.layers]
    clean_acts: dict[str, Tensor] = {}

    def save(act, hook):
        clean_acts[hook.name] = act.detach()

    with torch.no_grad(), base.hooks(fwd_hooks=list(hooks) + [(n, save) for n in names]):
        clean_m = call_metric(metric, base(clean_tokens))
    acts: dict[str, Tensor] = {}
    with torch.enable_grad(), base.hooks(fwd_hooks=list(hooks) + _grab_hooks(acts, names)):
        value = call_metric(metric, base(corrupted_tokens))
        if not value.requires_grad:
            raise MetricError(
                "metric: its value does not depend on the logits through autograd (did it call .item(), "
                "detach, or convert to numpy?). Fix: compute it with torch operations on the logits."
            )
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    with torch.no_grad():
        values = _site_sums(plan, names, acts, grads, clean_acts)
        flat = torch.cat(
            [values.reshape(-1).double(), clean_m.reshape(1).double(), value.reshape(1).double()]
        )
        host = flat.cpu()
    if not torch.isfinite(host).all():
        raise MetricError("attribution_patch: the metric or its gradient is NaN or inf.")
    clean, corrupted = float(host[-2]), float(host[-1])
    dtype = getattr(base.cfg, "dtype", torch.float32)
    return PatchResult(
        values=host[:-2].view(values.shape).to(values.dtype),
        axes=plan.by,
        labels=_labels(base, plan, corrupted_tokens),
        hook=plan.hook,
        kind="attribution",
        metric_name=getattr(metric, "name", getattr(metric, "__name__", "metric")),
        clean_metric=clean,
        corrupted_metric=corrupted,
        noise_floor=warn_if_noisy(clean, corrupted, dtype, what="attribution_patch"),
    )


def _site_sums(plan, names: Sequence[str], acts: dict, grads, clean_acts: dict) -> Tensor:
    """``Σ (a_clean - a_corrupted) · grad`` per site, ``[len(layers), *grid]`` (on the device)."""
    per_layer = []
    dims = _AXIS_DIM[plan.kind]
    for n, g in zip(names, grads, strict=True):
        a = acts[n].detach()
        if g is None:
            g = torch.zeros_like(a)
        prod = ((clean_acts[n] - a) * g).sum(0).sum(-1)  # [pos] | [pos, head] | [head, dest]
        keep = [dims[ax] for ax in plan.by[1:]]
        drop = tuple(d for d in range(prod.ndim) if d not in keep)
        if drop:
            prod = prod.sum(drop)
        remaining = sorted(keep)  # axes of prod now, in activation order
        prod = prod.permute([remaining.index(dims[ax]) for ax in plan.by[1:]]) if keep else prod
        for i, ax in enumerate(plan.by[1:]):
            prod = prod.index_select(i, torch.tensor(plan.index[ax], device=prod.device))
        per_layer.append(prod)
    return torch.stack(per_layer)


def vector_attribution(
    steered,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricFn | Metric,
    *,
    at: Literal["steered", "base"] = "steered",
) -> VectorAttribution:
    """Attribution of the metric to the steering vector at each position: ``delta · ∂metric/∂h``.

    ``delta[b, t]`` is what the vector adds at its hook (captured from the steered run, so scale,
    position masks and gated kinds are included) and the gradient of the batch-mean metric is taken
    at the hook's activation on the steered run (``at="steered"``: estimates what removing the vector
    at that position costs) or the base run (``at="base"``: what adding it there gains). Summed over
    positions it estimates the total effect ``metric(steered) - metric(base)``, reported alongside.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, pos]`` input.
        metric: logits -> scalar (or ``[batch]``), or a :class:`~steer_lens.patching.Metric`.
        at: ``"steered"`` or ``"base"``.

    Returns:
        :class:`~steer_lens.patching.VectorAttribution` with ``values`` ``[hook, batch, pos]`` (metric units).

    Raises:
        ConfigError: not a SteeredTransformer, or bad ``at``.
        MetricError: the metric is not differentiable or non-finite.
    """
    from steer_lens.steering import SteeredTransformer

    if not isinstance(steered, SteeredTransformer):
        raise ConfigError(f"steered: expected a SteeredTransformer, got {type(steered).__name__}.")
    if at not in ("steered", "base"):
        raise ConfigError(f"at: expected 'steered' or 'base', got {at!r}.")
    model = steered.model
    tokens = _check_tokens(tokens, "tokens", model)
    _check_metric(metric)
    names = list(steered.hook_names)
    pre: dict[str, Tensor] = {}
    post: dict[str, Tensor] = {}

    def save_pre(act, hook):
        pre[hook.name] = act.detach()

    def save_post(act, hook):
        post[hook.name] = act.detach()

    steer = steered.fwd_hooks()
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(n, save_pre) for n in names] + steer + [(n, save_post) for n in names]):
            steered_m = call_metric(metric, model(tokens))
        base_m = call_metric(metric, model(tokens))
        deltas = {n: post[n] - pre[n] for n in names}
    acts: dict[str, Tensor] = {}
    run_hooks = (steer if at == "steered" else []) + _grab_hooks(acts, names)
    with torch.enable_grad(), model.hooks(fwd_hooks=run_hooks):
        value = call_metric(metric, model(tokens))
        if not value.requires_grad:
            raise MetricError("metric: its value does not depend on the logits through autograd.")
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    with torch.no_grad():
        vals = torch.stack(
            [
                (deltas[n] * (g if g is not None else torch.zeros_like(deltas[n]))).sum(-1)
                for n, g in zip(names, grads, strict=True)
            ]
        )
        flat = torch.cat([vals.reshape(-1).double(), (steered_m - base_m).reshape(1).double()]).cpu()
    if not torch.isfinite(flat).all():
        raise MetricError("vector_attribution: the metric or its gradient is NaN or inf.")
    tok_strs = None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tok_strs = [token_pieces(tokenizer, row) for row in tokens.tolist()]
    return VectorAttribution(
        values=flat[:-1].view(vals.shape).float(),
        hooks=tuple(names),
        tokens=tok_strs,
        total_effect=float(flat[-1]),
        at=at,
        metric_name=getattr(metric, "name", getattr(metric, "__name__", "metric")),
    )
