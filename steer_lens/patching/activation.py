"""Batched activation patching and steering patching.

Activation patching (Meng et al. 2022, ROME; Wang et al. 2022, IOI; Heimersheim & Nanda 2024, "How
to use and interpret activation patching") runs the model on a *corrupted* input while one
activation (a *site*: a layer, position, head ...) is replaced by its value from a *clean* run, and
records a metric of the output. TransformerLens's ``patching.get_act_patch_*`` does one forward pass
per site and reads the metric back to the host after each. Here:

* **Many sites share one forward pass.** The corrupted batch is repeated along the batch dimension
  and copy ``s`` patches site ``s`` (a ``torch.where`` against a one-hot site mask), so one pass
  evaluates ``n_sites`` patches; sites are chunked so that a pass holds at most ``max_batch``
  sequences (by default derived from a memory budget).
* **The unchanged prefix is computed once.** A site at layer ``l`` cannot change anything before
  block ``l``, so (for a ``HookedTransformer``) the sweep starts at block ``l`` from the corrupted
  run's input to that block (``start_at_layer``): on average half the model is skipped.
* **Positions before a site are not recomputed.** A site at position ``p`` cannot change earlier
  positions (causal attention): large by-position sweeps are split into a few passes by position,
  each computing positions ``>= p0`` against the corrupted run's cached keys and values of the
  earlier ones; a metric of every position (a plain function of the logits) reads the corrupted
  run's logits there. For a metric that reads only the last position (the factories' default
  ``pos=-1``) the final norm and unembedding run at that position only.
* **Sites local to their position** (``z``, ``q``, ``pattern``, ``resid_mid``, ``attn_out``, ...)
  change their block's output at their own position only: their block runs on the pass's site
  positions alone, and the next block takes the corrupted run's input for the later positions; in the
  last block, such sites before the last position cannot reach a last-position metric and need no pass.
* **The last block computes one query.** The last block runs the last
  position alone (query, attention output, MLP), attending through a key/value cache to keys and
  values computed for the other positions by the block's own ``hook_resid_pre``, ``ln1`` and
  ``attn.calculate_qkv_matrices``; the passes of earlier blocks and the sites of the last block share
  one such call (:mod:`steer_lens.patching._last_query`); the keys/values of the last block's own sites
  are mixed from the clean and corrupted rows' (``resid_pre``, ``k``, ``v``: by position and head) or
  are the corrupted ones (later hooks). When clean and corrupted runs share hooks and
  shape, the clean rows ride along: last-block sites are patched from them inside that call, and the
  first pass of block 0 runs inside the clean/corrupted pass itself.
* **The unembedding runs once.** Last-position passes keep only the final residual; the final norm
  and unembedding run for all passes together at the end, and for a metric that reads a few raw
  logits (``logit_diff``: ``Metric.columns``) only those vocabulary columns are computed.
* **Sites that cannot differ are not run.** A causal model's activations at the positions before
  the first token where clean and corrupted differ are equal in both runs: those sites' value is the
  corrupted metric (every strategy but ``"full"``; a minimal pair skips most of its sites).
* **No per-pass weight copies**: the sweep runs inside :func:`steer_lens.models.matmul_layout`.
* **Only the patched hooks are cached**, and the metric of every copy is kept on the device and read
  back once at the end.

The numbers equal TransformerLens's (``get_act_patch_resid_pre``, ``..._attn_head_out_by_pos``, ...)
up to float rounding; the tests check it for every hook on GPT-2-, NeoX- and Llama-like models and
on a real Llama with grouped-query attention (where ``k``/``v`` sites are the key/value heads).

Which of these savings a sweep uses is its *strategy* (``strategy=``; :mod:`steer_lens.patching.strategy`):
``"full"`` uses batching only, ``"prefix"`` adds the shared prefix and the single unembedding,
``"suffix"`` the position-grouped passes, local sites and skipped last-block sites, ``"last_query"`` the
single-query last block; ``"auto"`` takes the most economical one the run allows.

This module holds the public functions; the site plan and the input checks are in
:mod:`steer_lens.patching._sites`, the batched engine in :mod:`steer_lens.patching._sweep` (passes: :mod:`steer_lens.patching._runner`,
:mod:`steer_lens.patching._last_query`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens.errors import ConfigError, ShapeMismatchError
from steer_lens.metrics import Metric, MetricFn

# the sweep engine; `_Runner` and `_chunk` are also reached from here by tests and benchmarks
from steer_lens.patching._runner import _Runner  # noqa: F401
from steer_lens.patching._sites import (
    HOOKS,
    By,
    _check_align,
    _check_metric,
    _check_tokens,
    _Plan,
    _plan,
    _prepare,
    _steer_limits,
    _unwrap,
)
from steer_lens.patching._sweep import _chunk, _finish, _sweep  # noqa: F401
from steer_lens.patching.results import NoisyMetricWarning, PatchResult, warn_if_noisy
from steer_lens.patching.strategy import Strategy

__all__ = ["BLOCK_EVERY_HOOKS", "HOOKS", "activation_patch", "activation_patch_block_every", "steering_patch"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------
def activation_patch(
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
    align: Sequence[int] | Tensor | None = None,
    max_batch: int | None = None,
    memory_budget: int = 1 << 30,
    strategy: str | Strategy = "auto",
    progress: bool = False,
) -> PatchResult:
    """Patch clean activations into the corrupted run, one site at a time, many sites per pass.

    For each site (a layer and, per ``by``, a position and/or head) the corrupted input is run with
    that activation replaced by its value on the clean input, and ``metric`` of the output is
    recorded: the same numbers as TransformerLens's ``patching.get_act_patch_*`` (e.g.
    ``get_act_patch_resid_pre`` is ``hook="resid_pre", by=("layer", "pos")``;
    ``get_act_patch_attn_head_out_by_pos`` is ``hook="z", by=("layer", "pos", "head")``;
    ``get_act_patch_attn_head_pattern_by_pos`` is ``hook="pattern", by=("layer", "head", "pos")``).
    On models with grouped-query attention, ``k``/``v`` sites are the ``n_key_value_heads`` key/value
    heads (as in TransformerLens).

    Args:
        model: a ``HookedTransformer`` (or a ``SteeredTransformer``: its vectors stay on in both runs).
        clean_tokens: ``[batch, pos]`` input whose activations are patched in.
        corrupted_tokens: ``[batch, pos]`` input that is run and patched.
        metric: logits ``[batch, pos, d_vocab]`` -> scalar (a TransformerLens metric works unchanged;
            ``[batch]`` outputs are averaged), or a :class:`~steer_lens.patching.Metric`.
        hook: a hook kind, swept over every layer (or ``layers``): ``resid_pre``, ``resid_mid``,
            ``resid_post``, ``attn_out``, ``mlp_out`` (sites by layer and position), ``z``, ``q``, ``k``,
            ``v``, ``result`` (per head), ``pattern``, ``attn_scores`` (per head; ``pos`` is the
            destination position); or a full hook name of **one layer**, e.g. ``"blocks.3.hook_resid_pre"``
            or ``transformer_lens.utils.get_act_name("z", 2)``: that layer only (a ``[1, ...]`` result,
            the same numbers as that row of the all-layer sweep). For ``resid_pre``, ``attn_out`` and
            ``mlp_out`` in one result see :func:`activation_patch_block_every`.
        by: site axes, ``"layer"`` first: ``("layer", "pos")`` (default for residual hooks),
            ``("layer",)``, ``("layer", "head")`` (default for head hooks), ``("layer", "pos", "head")``,
            ``("layer", "head", "pos")``. Result axes follow this order.
        layers, heads, positions: restrict the sweep to these indices (default all).
        align: for clean and corrupted inputs of different lengths: for each corrupted position, the
            clean position whose activation is patched in (``[corrupted_pos]``).
        max_batch: most sequences per forward pass (patched copies × batch); default from ``memory_budget``.
        memory_budget: bytes of activations one pass may use when ``max_batch`` is not given.
        strategy: which work the passes may skip: ``"auto"`` (default: the most economical this run
            allows), ``"full"``, ``"prefix"``, ``"suffix"``, ``"last_query"``, or a
            :class:`~steer_lens.patching.Strategy` (e.g. with ``position_groups``); every strategy
            gives TransformerLens's numbers (see :mod:`steer_lens.patching.strategy`).
        progress: show a tqdm bar.

    Returns:
        :class:`~steer_lens.patching.PatchResult` with ``values`` ``[n_layers, ...]`` (metric of each
        patched run, metric's units) and the clean / corrupted baselines.

    Raises:
        HookNameError: unknown hook, or not in this model (e.g. ``resid_mid`` with parallel attention).
        ConfigError: bad ``by``, a layer/head/position index out of range (also the layer of a full hook
            name), ``layers`` that disagree with a full hook name, ``max_batch`` below the batch,
            a ``strategy`` this run does not allow (e.g. ``"last_query"`` with a metric of every position).
        ShapeMismatchError: clean and corrupted shapes differ (and no ``align``), bad ``align``.
        MetricError: the metric returns the wrong shape, or NaN/inf.

    Warns:
        NoisyMetricWarning: the clean and corrupted metrics differ by less than the dtype's noise floor
            (:func:`~steer_lens.patching.noise_floor`); the result is marked ``within_noise``.
    """
    base, hooks, clean_tokens, corrupted_tokens, plan = _prepare(
        model, clean_tokens, corrupted_tokens, metric, hook, by,
        layers=layers, heads=heads, positions=positions,
    )
    if clean_tokens.shape[0] != corrupted_tokens.shape[0]:
        raise ShapeMismatchError(
            f"clean_tokens has batch {clean_tokens.shape[0]}, corrupted_tokens {corrupted_tokens.shape[0]}; "
            "expected the same batch (pairs of clean and corrupted prompts)."
        )
    if clean_tokens.shape[1] != corrupted_tokens.shape[1] and align is None:
        raise ShapeMismatchError(
            f"clean_tokens has {clean_tokens.shape[1]} positions, corrupted_tokens {corrupted_tokens.shape[1]}; "
            "expected the same length. Fix: pad both to one length, or pass align=[clean position for each "
            "corrupted position]."
        )
    al = _check_align(align, clean_tokens.shape[1], corrupted_tokens.shape[1], plan.kind)
    full_plan, plan = plan, _changed_sites(base, plan, clean_tokens, corrupted_tokens, al, strategy)
    values, cm, km = _sweep(
        base,
        plan,
        clean_tokens,
        corrupted_tokens,
        metric,
        clean_hooks=hooks,
        corrupted_hooks=hooks,
        max_batch=max_batch,
        memory_budget=memory_budget,
        align=al,
        strategy=strategy,
        progress=progress,
        **_steer_limits(model),
    )
    values = _with_unchanged_sites(values, km, plan, full_plan)
    return _finish(
        values, cm, km, plan=full_plan, model=base, tokens=corrupted_tokens, kind="activation", metric=metric
    )


def _shared_prefix(clean_tokens: Tensor, corrupted_tokens: Tensor) -> int:
    """Number of leading positions at which every clean row equals its corrupted row."""
    n = min(clean_tokens.shape[1], corrupted_tokens.shape[1])
    differs = (clean_tokens[:, :n] != corrupted_tokens[:, :n].to(clean_tokens.device)).any(0)
    return int(differs.int().argmax()) if bool(differs.any()) else n


def _changed_sites(model, plan: _Plan, clean_tokens: Tensor, corrupted_tokens: Tensor, align, strategy) -> _Plan:
    """``plan`` without the sites whose clean and corrupted activations are equal, so the patched run is
    the corrupted run (its metric is the corrupted metric, exactly as TransformerLens computes it).

    In a causal model every hook's value at position ``p`` (``pattern``: destination ``p``) is a function
    of the tokens ``<= p`` (and of the steering hooks, the same in both runs). Positions before the first
    one where any clean row differs from its corrupted row therefore carry identical activations at every
    layer: the BOS token always, and most of a minimal pair (IOI-style prompts that differ in one name).
    Kept as is for ``strategy="full"`` (the reference), ``align``, sweeps without a ``pos`` axis, and a
    non-causal model; when every swept position would go, the plan is kept (the inputs are identical).
    """
    if (
        getattr(strategy, "name", strategy) == "full"
        or align is not None
        or "pos" not in plan.by
        or getattr(model.cfg, "attention_dir", "causal") != "causal"
    ):
        return plan
    same = _shared_prefix(clean_tokens, corrupted_tokens)
    kept = tuple(p for p in plan.index["pos"] if p >= same)
    if not kept or len(kept) == len(plan.index["pos"]):
        return plan
    return replace(plan, index={**plan.index, "pos": kept})


def _with_unchanged_sites(values: Tensor, corrupted_m: Tensor, plan: _Plan, full_plan: _Plan) -> Tensor:
    """``values`` of ``plan``'s sites spread over ``full_plan``'s grid (layers and positions), the
    corrupted metric at the sites ``plan`` leaves out (:func:`_changed_sites`, :func:`_vector_layers`)."""
    axes = [(0, full_plan.layers, plan.layers)]
    if "pos" in full_plan.by:  # the layer axis is dim 0 of values
        axes.append((full_plan.by.index("pos"), full_plan.index["pos"], plan.index["pos"]))
    for dim, every, kept in axes:
        if tuple(kept) == tuple(every):
            continue
        shape = list(values.shape)
        shape[dim] = len(every)
        full = corrupted_m.reshape(()).to(values.dtype).expand(shape).clone()
        kept_set = set(kept)
        where = [i for i, x in enumerate(every) if x in kept_set]
        values = full.index_copy_(dim, torch.tensor(where, device=values.device), values)
    return values


def _vector_layers(plan: _Plan, before: Sequence[int], strategy) -> _Plan:
    """``plan`` without the layers whose hook fires before every steering vector (``before``): there the
    steered and base activations are equal, so the patched run is the corrupted run. Kept as is for
    ``strategy="full"`` and when no layer would remain."""
    skipped = set(before)
    keep = tuple(layer for layer in plan.layers if layer not in skipped)
    if getattr(strategy, "name", strategy) == "full" or not keep or len(keep) == len(plan.layers):
        return plan
    return replace(plan, layers=keep, names={layer: plan.names[layer] for layer in keep})


BLOCK_EVERY_HOOKS = ("resid_pre", "attn_out", "mlp_out")
"""The hooks of :func:`activation_patch_block_every` (as TransformerLens's ``get_act_patch_block_every``)."""


def activation_patch_block_every(
    model,
    clean_tokens: Int[Tensor, "clean_batch clean_pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: MetricFn | Metric,
    *,
    hooks: Sequence[str] = BLOCK_EVERY_HOOKS,
    **kwargs,
) -> PatchResult:
    """Activation patching of ``resid_pre``, ``attn_out`` and ``mlp_out`` in one result: TransformerLens's
    ``patching.get_act_patch_block_every``.

    One :func:`activation_patch` sweep per hook, stacked along a leading ``"hook"`` axis.

    Args:
        model, clean_tokens, corrupted_tokens, metric: as :func:`activation_patch`.
        hooks: the hook kinds stacked (default ``("resid_pre", "attn_out", "mlp_out")``); they must give
            sites of one shape (e.g. all residual-stream hooks).
        **kwargs: the other keywords of :func:`activation_patch` (``by``, ``layers``, ``positions``,
            ``align``, ``max_batch``, ``memory_budget``, ``strategy``, ``progress``).

    Returns:
        :class:`~steer_lens.patching.PatchResult` with ``values`` ``[len(hooks), n_layers, pos]`` (by
        default; metric's units), axes ``("hook", *by)``, ``hook`` the hooks joined by ``", "``.

    Raises:
        ConfigError: no hooks, or hooks whose sites differ in shape; and as :func:`activation_patch`
            (``HookNameError``, ``ShapeMismatchError``, ``MetricError``). Warns
            :class:`~steer_lens.patching.NoisyMetricWarning` once when the clean–corrupted gap is noise.
    """
    if isinstance(hooks, str) or not hooks:
        raise ConfigError(f"hooks: expected a non-empty sequence of hook kinds, got {hooks!r}.")
    with warnings.catch_warnings():  # one warning for the stacked result, not one per hook
        warnings.simplefilter("ignore", NoisyMetricWarning)
        parts = [activation_patch(model, clean_tokens, corrupted_tokens, metric, h, **kwargs) for h in hooks]
    first = parts[0]
    bad = [
        (p.hook, p.axes, list(p.values.shape))
        for p in parts
        if p.values.shape != first.values.shape or p.axes != first.axes
    ]
    if bad:
        raise ConfigError(
            f"hooks: expected hooks with sites of one shape, got {first.hook!r} {first.axes} "
            f"{list(first.values.shape)} and {bad}. Fix: stack residual-stream hooks only."
        )
    dtype = getattr(_unwrap(model)[0].cfg, "dtype", torch.float32)
    warn_if_noisy(first.clean_metric, first.corrupted_metric, dtype, what="activation_patch_block_every")
    return replace(
        first, values=torch.stack([p.values for p in parts]), axes=("hook", *first.axes),
        labels={"hook": [p.hook for p in parts], **first.labels}, hook=", ".join(p.hook for p in parts),
    )


def steering_patch(
    steered,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricFn | Metric,
    hook: str = "resid_post",
    *,
    by: By = None,
    mode: Literal["denoise", "noise"] = "denoise",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    max_batch: int | None = None,
    memory_budget: int = 1 << 30,
    strategy: str | Strategy = "auto",
    progress: bool = False,
) -> PatchResult:
    """Which sites carry a steering vector's effect: patch between the steered and the base run.

    * ``mode="denoise"``: the base run (vectors off) is patched with the *steered* activation at one
      site; a site whose value alone restores the steered metric carries the vector's effect.
    * ``mode="noise"``: the steered run is patched with the *base* activation at one site; a site
      whose removal destroys the effect is necessary for it.

    The steered run adds ``steered.fwd_hooks()`` in the same ``model.hooks(...)`` context as the
    patching hooks (patching runs after the vector at the same hook point). Batching as
    :func:`activation_patch`. For ``"denoise"`` the result's ``clean_metric`` is the steered metric and
    ``corrupted_metric`` the base one; for ``"noise"`` the other way round.

    **Which hooks see the vector.** A hook point holds the activation at that point of the forward
    pass, so a vector added at ``blocks.L.hook_X`` is seen by that hook (the patch runs after the
    vector) and every hook that fires later, never by earlier ones. In particular
    ``blocks.{L-1}.hook_resid_post`` fires *before* ``blocks.L.hook_resid_pre`` adds the vector: the two
    carry the same tensor in an unhooked run, but at ``resid_post`` of layer ``L-1`` the steered and base
    activations are equal and that row is the baseline. The result names the vector's hooks
    (``vector_hooks``) and the swept layers that come before all of them (``before_vector``); sweep
    ``hook="resid_pre"`` to see a ``resid_pre`` vector at its own layer. Those layers are not run: their
    patched run is the unpatched one, so their values are exactly the baseline (``corrupted_metric``);
    ``strategy="full"`` runs them (TransformerLens's way, equal up to rounding).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, pos]`` input (both runs).
        metric, hook, by, layers, heads, positions, max_batch, memory_budget, strategy, progress:
            as :func:`activation_patch`.
        mode: ``"denoise"`` or ``"noise"``.

    Returns:
        :class:`~steer_lens.patching.PatchResult` (``kind`` is the mode; ``vector_hooks``,
        ``before_vector`` and ``noise_floor`` set).

    Raises:
        ConfigError: ``steered`` is not a SteeredTransformer, bad mode; and as :func:`activation_patch`.

    Warns:
        NoisyMetricWarning: the steered and base metrics differ by rounding noise only (the vector does
            not move this metric); the result is marked ``within_noise``.
    """
    from steer_lens.steering import SteeredTransformer

    if not isinstance(steered, SteeredTransformer):
        raise ConfigError(
            f"steered: expected a SteeredTransformer, got {type(steered).__name__}. Fix: wrap the model and "
            "its vector with sl.SteeredTransformer(model, hooks=[...], init=vector)."
        )
    if mode not in ("denoise", "noise"):
        raise ConfigError(f"mode: expected 'denoise' or 'noise', got {mode!r}.")
    model = steered.model
    tokens = _check_tokens(tokens, "tokens", model)
    _check_metric(metric)
    plan = _plan(model, hook, by, pos=tokens.shape[1], layers=layers, heads=heads, positions=positions)
    steer = steered.fwd_hooks()
    clean_hooks, corrupted_hooks = (steer, []) if mode == "denoise" else ([], steer)
    vector_hooks = tuple(steered.hook_names)
    before = _before_vector(model, tokens, plan, vector_hooks)
    full_plan, plan = plan, _vector_layers(plan, before, strategy)
    values, cm, km = _sweep(
        model,
        plan,
        tokens,
        tokens,
        metric,
        clean_hooks=clean_hooks,
        corrupted_hooks=corrupted_hooks,
        max_batch=max_batch,
        memory_budget=memory_budget,
        align=None,
        strategy=strategy,
        progress=progress,
        **_steer_limits(steered),
    )
    values = _with_unchanged_sites(values, km, plan, full_plan)
    names = ("steered", "base") if mode == "denoise" else ("base", "steered")
    return _finish(
        values, cm, km, plan=full_plan, model=model, tokens=tokens, kind=mode, metric=metric,
        what="steering_patch", names=names, vector_hooks=vector_hooks, before_vector=before,
    )


def _firing_order(model, tokens: Tensor) -> dict[str, int]:
    """The order in which the model's hook points fire (one 1-token forward pass, no hooks of the caller)."""
    order: dict[str, int] = {}

    def record(act, hook):
        order.setdefault(hook.name, len(order))

    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda name: True, record)]):
        model(tokens[:1, :1])
    return order


def _before_vector(model, tokens: Tensor, plan, vector_hooks: Sequence[str]) -> tuple[int, ...]:
    """The swept layers whose patched hook fires before every vector hook (so it never sees the vector).

    A hook point holds the value *at that point of the forward pass*: ``blocks.L.hook_resid_post`` fires
    before ``blocks.{L+1}.hook_resid_pre`` adds a vector, although both carry the same tensor without
    hooks. At the vector's own hook the patch runs after the vector, so it sees it.
    """
    order = _firing_order(model, tokens)
    first = min((order[h] for h in vector_hooks if h in order), default=None)
    if first is None:
        return ()
    return tuple(layer for layer in plan.layers if order.get(plan.names[layer], first) < first)
