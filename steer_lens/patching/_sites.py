"""Sites of activation patching: the hook kinds, the site plan, and the checks of the inputs.

:func:`_plan` turns a hook name, ``by`` axes and index restrictions into a :class:`_Plan` (validated
against the model before anything runs); the checks (tokens, metric, ``align``, a
``SteeredTransformer``'s position setting) and the axis labels of a result are shared by
:func:`~steer_lens.patching.activation_patch`, :func:`~steer_lens.patching.steering_patch`,
:func:`~steer_lens.patching.attribution_patch` and :func:`~steer_lens.patching.path_patch`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from steer_lens._utils import check_token_ids, token_pieces
from steer_lens.errors import ConfigError, EmptyInputError, HookNameError, MetricError, ShapeMismatchError
from steer_lens.models import check_hook_names

# short hook name -> (kind, hook name pattern)
HOOKS: dict[str, tuple[str, str]] = {
    "resid_pre": ("resid", "blocks.{}.hook_resid_pre"),
    "resid_mid": ("resid", "blocks.{}.hook_resid_mid"),
    "resid_post": ("resid", "blocks.{}.hook_resid_post"),
    "attn_out": ("resid", "blocks.{}.hook_attn_out"),
    "mlp_out": ("resid", "blocks.{}.hook_mlp_out"),
    "z": ("head", "blocks.{}.attn.hook_z"),
    "q": ("head", "blocks.{}.attn.hook_q"),
    "k": ("head", "blocks.{}.attn.hook_k"),
    "v": ("head", "blocks.{}.attn.hook_v"),
    "result": ("head", "blocks.{}.attn.hook_result"),
    "pattern": ("pattern", "blocks.{}.attn.hook_pattern"),
    "attn_scores": ("pattern", "blocks.{}.attn.hook_attn_scores"),
}
"""Supported short hook names: their kind and full TransformerLens hook name."""

# activation dimension (batch excluded, so 0 = pos) of each site axis, per kind
_AXIS_DIM = {"resid": {"pos": 0}, "head": {"pos": 0, "head": 1}, "pattern": {"head": 0, "pos": 1}}
_DEFAULT_BY = {"resid": ("layer", "pos"), "head": ("layer", "head"), "pattern": ("layer", "head")}
_ALIASES = {"head_index": "head", "dest_pos": "pos", "position": "pos", "layers": "layer"}

By = Sequence[str] | None


# ---------------------------------------------------------------------------------------------------
# site plan
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    hook: str
    kind: str
    by: tuple[str, ...]
    layers: tuple[int, ...]
    index: dict[str, tuple[int, ...]]  # for each non-layer axis of `by`: the indices swept
    names: dict[int, str]  # layer -> full hook name

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(self.index[a]) for a in self.by[1:])

    @property
    def n_sites(self) -> int:
        return math.prod(self.grid)

    def mask(self, sites: Tensor, act_shape: Sequence[int], device) -> Tensor:
        """Bool mask ``[len(sites), 1, *act_shape[1:]]`` (1s broadcast) selecting each site's elements."""
        n = sites.shape[0]
        rank = len(act_shape) - 1
        m = torch.ones((n, 1, *[1] * rank), dtype=torch.bool, device=device)
        flat = sites.to(device)
        for a, size in zip(reversed(self.by[1:]), reversed(self.grid), strict=True):
            i = flat % size
            flat = flat // size
            dim = _AXIS_DIM[self.kind][a]
            full = act_shape[1 + dim]
            sel = torch.tensor(self.index[a], device=device)[i]  # [n] actual index in the activation
            one_hot = sel[:, None] == torch.arange(full, device=device)[None]  # [n, full]
            shape = [n, 1] + [1] * rank
            shape[2 + dim] = full
            m = m & one_hot.view(shape)
        return m

    def site_positions(self) -> list[int]:
        """The position of each site (0 for every site when ``pos`` is not a site axis)."""
        if "pos" not in self.by:
            return [0] * self.n_sites
        k = self.by[1:].index("pos")
        inner = math.prod(self.grid[k + 1 :])
        size = self.grid[k]
        return [self.index["pos"][(s // inner) % size] for s in range(self.n_sites)]


_FULL_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def _parse_hook(hook: str) -> tuple[str, int | None]:
    """(short hook name, layer or None) of a hook kind or a full hook name.

    Accepted: a short name (``"resid_pre"``, ``"z"``), its hook-point tail (``"hook_resid_pre"``,
    ``"attn.hook_z"``, ``"hook_z"``: every layer), and a full name of one layer
    (``"blocks.3.hook_resid_pre"``, ``"blocks.2.attn.hook_z"``: what
    ``transformer_lens.utils.get_act_name(kind, layer)`` returns), which means that layer only.

    Raises:
        HookNameError: anything else (the message lists the kinds).
    """
    if isinstance(hook, str):
        if hook in HOOKS:
            return hook, None
        full = _FULL_NAME.fullmatch(hook)
        tail, layer = (full.group(2), int(full.group(1))) if full else (hook, None)
        for short, (_, pattern) in HOOKS.items():
            if tail == pattern.split(".", 2)[-1] or (layer is None and tail == "hook_" + short):
                return short, layer
    raise HookNameError(
        f"hook: expected one of the hook kinds {sorted(HOOKS)} (every layer; restrict with "
        "layers=[...]) or a full hook name of one layer such as 'blocks.0.hook_resid_pre' or "
        f"'blocks.2.attn.hook_z' (as transformer_lens.utils.get_act_name returns), got {hook!r}."
    )


def _layers(hook: str, named: int | None, layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """The layers swept: ``layers`` (default all), or the one layer a full hook name names."""
    if named is not None:
        if not 0 <= named < n_layers:
            raise ConfigError(f"hook: {hook!r} names layer {named}; this model has layers [0, {n_layers}).")
        if layers is not None and [int(x) for x in layers] != [named]:
            raise ConfigError(
                f"layers: hook {hook!r} names layer {named} only, but layers={list(layers)}. Fix: pass the "
                "hook kind (e.g. hook='resid_pre') with layers=[...], or the full name without layers."
            )
        return (named,)
    if layers is None:
        return tuple(range(n_layers))
    layer_t = tuple(int(x) for x in layers)
    bad = [x for x in layer_t if not 0 <= x < n_layers]
    if bad or not layer_t:
        raise ConfigError(f"layers: expected indices in [0, {n_layers}), got {list(layers)}.")
    return layer_t


def _n_heads(model, short: str, kind: str) -> int:
    """Heads per layer of a head or pattern hook (key/value heads for ``k``/``v`` with GQA), else 0."""
    if kind == "resid":
        return 0
    kv = getattr(model.cfg, "n_key_value_heads", None)
    if (
        kind == "head"
        and short in ("k", "v")
        and kv is not None
        and not getattr(model.cfg, "ungroup_grouped_query_attention", False)
    ):
        return int(kv)
    return int(model.cfg.n_heads)


def _axis_index(
    model, short: str, axis: str, *, pos: int, n_heads: int, heads: Sequence[int] | None,
    positions: Sequence[int] | None,
) -> tuple[int, ...]:
    """The indices swept along one non-layer site axis (``pos`` or ``head``), checked."""
    if axis == "pos":
        sel = tuple(range(pos)) if positions is None else tuple(int(p) for p in positions)
        bad = [p for p in sel if not 0 <= p < pos]
        if bad or not sel:
            raise ConfigError(
                f"positions: expected indices in [0, {pos}) (the corrupted length), got {bad or []}."
            )
        return sel
    sel = tuple(range(n_heads)) if heads is None else tuple(int(h) for h in heads)
    bad = [h for h in sel if not 0 <= h < n_heads]
    if bad or not sel:
        what = "key/value heads" if short in ("k", "v") and n_heads != model.cfg.n_heads else "heads"
        raise ConfigError(
            f"heads: hook {short!r} has {n_heads} {what} per layer; expected indices in "
            f"[0, {n_heads}), got {list(heads) if heads is not None else []}."
        )
    return sel


def _plan(
    model,
    hook: str,
    by: By,
    *,
    pos: int,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    positions: Sequence[int] | None,
) -> _Plan:
    """Validate the site specification against the model (before anything runs).

    ``hook`` is a hook kind (every layer, or ``layers``) or a full hook name of one layer
    (:func:`_parse_hook`).
    """
    short, named = _parse_hook(hook)
    kind, pattern = HOOKS[short]
    if by is None:
        by_t = _DEFAULT_BY[kind]
    else:
        by_t = tuple(_ALIASES.get(a, a) for a in ((by,) if isinstance(by, str) else by))
    allowed = {"layer", *_AXIS_DIM[kind]}
    if not by_t or by_t[0] != "layer" or len(set(by_t)) != len(by_t) or not set(by_t) <= allowed:
        raise ConfigError(
            f"by: for hook {short!r} expected 'layer' first, then distinct axes from "
            f"{sorted(allowed - {'layer'})}, got {tuple(by_t)}. Examples: ('layer', 'pos'), ('layer',), "
            "('layer', 'head'), ('layer', 'pos', 'head')."
        )
    layer_t = _layers(hook, named, layers, int(model.cfg.n_layers))
    names = {layer: pattern.format(layer) for layer in layer_t}
    check_hook_names(model, list(names.values()))
    n_heads = _n_heads(model, short, kind)
    index = {
        a: _axis_index(model, short, a, pos=pos, n_heads=n_heads, heads=heads, positions=positions)
        for a in by_t[1:]
    }
    if positions is not None and "pos" not in by_t:
        raise ConfigError("positions: only meaningful when 'pos' is in by; add it or drop positions.")
    if heads is not None and "head" not in by_t:
        raise ConfigError("heads: only meaningful when 'head' is in by; add it or drop heads.")
    return _Plan(short, kind, by_t, layer_t, index, names)


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------
def _check_tokens(tokens: Tensor, what: str, model) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise ShapeMismatchError(
            f"{what}: expected token ids as a tensor [batch, pos], got {type(tokens).__name__}."
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ShapeMismatchError(f"{what}: expected token ids [batch, pos], got shape {list(tokens.shape)}.")
    if tokens.numel() == 0:
        raise EmptyInputError(f"{what}: got an empty token tensor; give at least one token.")
    check_token_ids(tokens, model.cfg, what)  # integer ids in [0, d_vocab), at most n_ctx positions
    return tokens.to(_device(model))


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device(model.cfg.device)


def _check_metric(metric: Any) -> None:
    if not callable(metric):
        raise MetricError(f"metric: expected a callable logits -> scalar, got {type(metric).__name__}.")


def _unwrap(model):
    """(base model, steering hooks) for a model or a SteeredTransformer."""
    from steer_lens.steering import SteeredTransformer

    if isinstance(model, SteeredTransformer):
        return model.model, model.fwd_hooks()
    return model, []


def _steer_limits(steered) -> dict[str, Any]:
    """What a steered model's position setting allows the sweep to do.

    The vector's hook finds its positions by absolute index from the start of the call, so runs over
    a suffix of positions only work with ``positions="all"``. (An explicit ``[batch, pos]`` mask is
    tiled over the stacked copies of a batched pass by the steering hook itself.)
    """
    from steer_lens.steering import SteeredTransformer

    if not isinstance(steered, SteeredTransformer):
        return {}
    pos = steered.positions
    limits: dict[str, Any] = {}
    if not (isinstance(pos, str) and pos == "all"):
        limits["positional"] = True
    return limits


def _labels(model, plan: _Plan, tokens: Tensor) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {"layer": [str(x) for x in plan.layers]}
    tok_strs: list[str] | None = None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        try:
            tok_strs = token_pieces(tokenizer, tokens[0].tolist())
        except Exception:  # pragma: no cover - exotic tokenizers
            tok_strs = None
    for a in plan.by[1:]:
        if a == "pos":
            labels[a] = [f"{p}: {tok_strs[p]}" if tok_strs else str(p) for p in plan.index[a]]
        else:
            labels[a] = [str(h) for h in plan.index[a]]
    return labels


def _check_align(align, clean_pos: int, corrupted_pos: int, kind: str) -> Tensor | None:
    if align is None:
        return None
    a = torch.as_tensor(align, dtype=torch.long).reshape(-1)
    if kind == "pattern":
        raise ConfigError("align: not supported for attention patterns (dest and src positions both move).")
    if a.shape[0] != corrupted_pos or (a < 0).any() or (a >= clean_pos).any():
        raise ShapeMismatchError(
            f"align: expected {corrupted_pos} clean positions (one per corrupted position) in [0, {clean_pos}), "
            f"got {a.tolist()}."
        )
    return a


def _prepare(
    model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Any, hook: str, by: By, *,
    layers: Sequence[int] | None, heads: Sequence[int] | None, positions: Sequence[int] | None,
) -> tuple[Any, list, Tensor, Tensor, _Plan]:
    """The common checks of a clean/corrupted patching call, in order: the model (unwrapped), both
    token tensors, the metric, then the site plan (against the corrupted length).

    Returns:
        ``(base model, steering hooks, clean tokens, corrupted tokens, plan)``.
    """
    base, hooks = _unwrap(model)
    clean_tokens = _check_tokens(clean_tokens, "clean_tokens", base)
    corrupted_tokens = _check_tokens(corrupted_tokens, "corrupted_tokens", base)
    _check_metric(metric)
    plan = _plan(
        base, hook, by, pos=corrupted_tokens.shape[1], layers=layers, heads=heads, positions=positions
    )
    return base, hooks, clean_tokens, corrupted_tokens, plan
