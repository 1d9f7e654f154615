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
* **Last-position metrics skip the rest.** For a metric that reads only the last position (the
  factories' default ``pos=-1``) the final norm and unembedding run at that position only, and a
  site at position ``p`` cannot change earlier positions (causal attention): large by-position
  sweeps are split into a few passes by position, each computing positions ``>= p0`` against the
  corrupted run's cached keys and values of the earlier ones.
* **Only the patched hooks are cached**, and the metric of every copy is kept on the device and read
  back once at the end.

The numbers equal TransformerLens's (``get_act_patch_resid_pre``, ``..._attn_head_out_by_pos``, ...)
up to float rounding; the tests check it for every hook on GPT-2-, NeoX- and Llama-like models and
on a real Llama with grouped-query attention (where ``k``/``v`` sites are the key/value heads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens.errors import ConfigError, EmptyInputError, HookNameError, MetricError, ShapeMismatchError
from steer_lens.models import check_hook_names
from steer_lens.patching.metrics import Metric, MetricFn, call_metric, evaluate_metric
from steer_lens.patching.results import PatchResult

__all__ = ["HOOKS", "activation_patch", "steering_patch"]

logger = logging.getLogger(__name__)

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


def _short_hook(hook: str) -> str:
    if hook in HOOKS:
        return hook
    for short, (_, pattern) in HOOKS.items():  # accept "hook_resid_pre" or "attn.hook_z"
        if hook == pattern.split(".", 2)[-1] or (hook.endswith("hook_" + short) and "{" not in hook):
            return short
    raise HookNameError(
        f"hook: expected one of {sorted(HOOKS)} (a hook kind; the layer is a site axis), got {hook!r}. "
        "Fix: pass e.g. hook='resid_pre' and restrict layers with layers=[...]."
    )


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
    """Validate the site specification against the model (before anything runs)."""
    short = _short_hook(hook)
    kind, pattern = HOOKS[short]
    n_layers = int(model.cfg.n_layers)
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
    if layers is None:
        layer_t = tuple(range(n_layers))
    else:
        layer_t = tuple(int(x) for x in layers)
        bad = [x for x in layer_t if not 0 <= x < n_layers]
        if bad or not layer_t:
            raise ConfigError(f"layers: expected indices in [0, {n_layers}), got {list(layers)}.")
    names = {layer: pattern.format(layer) for layer in layer_t}
    check_hook_names(model, list(names.values()))
    if kind == "head":
        n_heads = int(model.cfg.n_heads)
        kv = getattr(model.cfg, "n_key_value_heads", None)
        if (
            short in ("k", "v")
            and kv is not None
            and not getattr(model.cfg, "ungroup_grouped_query_attention", False)
        ):
            n_heads = int(kv)
    elif kind == "pattern":
        n_heads = int(model.cfg.n_heads)
    else:
        n_heads = 0
    index: dict[str, tuple[int, ...]] = {}
    for a in by_t[1:]:
        if a == "pos":
            sel = tuple(range(pos)) if positions is None else tuple(int(p) for p in positions)
            bad = [p for p in sel if not 0 <= p < pos]
            if bad or not sel:
                raise ConfigError(
                    f"positions: expected indices in [0, {pos}) (the corrupted length), got {bad or []}."
                )
            index[a] = sel
        else:
            sel = tuple(range(n_heads)) if heads is None else tuple(int(h) for h in heads)
            bad = [h for h in sel if not 0 <= h < n_heads]
            if bad or not sel:
                what = "key/value heads" if short in ("k", "v") and n_heads != model.cfg.n_heads else "heads"
                raise ConfigError(
                    f"heads: hook {short!r} has {n_heads} {what} per layer; expected indices in "
                    f"[0, {n_heads}), got {list(heads) if heads is not None else []}."
                )
            index[a] = sel
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
    if tokens.shape[1] > int(model.cfg.n_ctx):
        from steer_lens.errors import SequenceTooLongError

        raise SequenceTooLongError(
            f"{what}: {tokens.shape[1]} tokens exceed the model's n_ctx={model.cfg.n_ctx}."
        )
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
    a suffix of positions only work with ``positions="all"``; an explicit ``[batch, pos]`` mask covers
    one copy of the batch, so such sweeps patch one site per pass.
    """
    from steer_lens.steering import SteeredTransformer

    if not isinstance(steered, SteeredTransformer):
        return {}
    pos = steered.positions
    limits: dict[str, Any] = {}
    if not (isinstance(pos, str) and pos == "all"):
        limits["position_groups"] = 1
    if isinstance(pos, Tensor) and pos.ndim == 2 and pos.shape[0] > 1:
        limits["max_copies"] = 1
    return limits


# ---------------------------------------------------------------------------------------------------
# the runner: forward passes that may start at a block
# ---------------------------------------------------------------------------------------------------
class _Runner:
    """Runs the corrupted batch (repeated) from block ``l`` with hooks, sharing the unchanged prefix.

    * ``prefix``: start at block ``l`` from the corrupted run's input to that block.
    * ``last_only``: the metric reads the last position only: unembed it alone.
    * ``suffix``: (with ``last_only``) a site at position ``p`` cannot change positions ``< p`` (causal
      attention), so blocks ``>= l`` run on positions ``>= p0`` only, attending to the corrupted run's
      keys and values of the earlier positions through a frozen key/value cache.
    """

    def __init__(
        self,
        model,
        tokens: Tensor,
        hooks: list,
        *,
        share_prefix: bool = True,
        last_only: bool = False,
    ) -> None:
        from transformer_lens import HookedTransformer

        self.model = model
        self.tokens = tokens
        self.hooks = hooks
        self.prefix = (
            share_prefix
            and isinstance(model, HookedTransformer)
            and getattr(model.cfg, "positional_embedding_type", "") != "shortformer"
        )
        self.last_only = last_only and self.prefix
        self.suffix = self.last_only and getattr(model.cfg, "positional_embedding_type", "") in (
            "standard",
            "rotary",
        )
        self.block_inputs: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.attention_mask: Tensor | None = None

    def corrupted_run(self, layers: Sequence[int]) -> Tensor:
        """Logits of the corrupted run; records the input of each block in ``layers`` (and keys/values)."""
        capture, after = [], []
        if self.prefix:

            def save(act, hook, store, layer):
                store[layer] = act.detach()

            capture = [
                (f"blocks.{layer}.hook_resid_pre", _partial(save, store=self.block_inputs, layer=layer))
                for layer in sorted(set(layers))
            ]
            if self.suffix:
                for i in range(min(layers), int(self.model.cfg.n_layers)):
                    after.append((f"blocks.{i}.attn.hook_k", _partial(save, store=self.keys, layer=i)))
                    after.append((f"blocks.{i}.attn.hook_v", _partial(save, store=self.values, layer=i)))
            self.attention_mask = self.model.input_to_embed(self.tokens)[3]
        # block inputs are captured first (the raw input), keys/values last (what attention used)
        with self.model.hooks(fwd_hooks=capture + list(self.hooks) + after):
            return self.model(self.tokens)

    def _cache(self, layer: int, n_copies: int, p0: int):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        def rep(t: Tensor) -> Tensor:
            return t[:, :p0].repeat(n_copies, *[1] * (t.ndim - 1))

        entries = [
            TransformerLensKeyValueCacheEntry(
                past_keys=rep(self.keys[i]), past_values=rep(self.values[i]), frozen=True
            )
            if i >= layer
            else None
            for i in range(int(self.model.cfg.n_layers))
        ]
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(self.tokens.shape, dtype=torch.long, device=self.tokens.device)
        return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=rep(mask), frozen=True)

    def run(self, layer: int, n_copies: int, hooks: list, p0: int = 0) -> Tensor:
        """Logits of ``n_copies`` stacked copies of the corrupted batch, from block ``layer`` on.

        With ``p0 > 0`` (suffix mode) only positions ``>= p0`` are computed and the logits are those
        of the last position.
        """
        with self.model.hooks(fwd_hooks=list(self.hooks) + hooks):
            if not self.prefix:
                return self.model(self.tokens.repeat(n_copies, 1))
            x = self.block_inputs[layer]
            mask = self.attention_mask
            cache = None
            if p0 > 0:
                cache = self._cache(layer, n_copies, p0)
                x = x[:, p0:]
                if mask is not None:  # the full mask: cached positions and the suffix
                    mask = mask.repeat(n_copies, 1)
            elif mask is not None:
                mask = mask.repeat(n_copies, 1)
            x = x.repeat(n_copies, *[1] * (x.ndim - 1))
            if not self.last_only:
                return self.model(x, start_at_layer=layer, attention_mask=mask)
            n_layers = int(self.model.cfg.n_layers)
            resid = self.model(
                x, start_at_layer=layer, stop_at_layer=n_layers, attention_mask=mask, past_kv_cache=cache
            )
            return self.model(resid[:, -1:], start_at_layer=n_layers)  # no blocks: norm, unembed, softcap


def _partial(fn: Callable, **kw):
    def wrapped(act, hook):
        return fn(act, hook, **kw)

    return wrapped


def _bytes_per_sequence(model, pos: int) -> int:
    cfg = model.cfg
    el = torch.finfo(getattr(cfg, "dtype", torch.float32)).bits // 8
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model)
    per_tok = 2 * cfg.d_vocab + 3 * d_mlp + 10 * cfg.d_model + 3 * cfg.n_heads * pos
    return int(el * pos * per_tok)


def _chunk(model, pos: int, batch: int, max_batch: int | None, memory_budget: int) -> int:
    """Number of patched copies per forward pass."""
    if max_batch is None:
        max_batch = max(batch, memory_budget // max(1, _bytes_per_sequence(model, pos)))
    if max_batch < batch:
        raise ConfigError(
            f"max_batch: expected at least the batch size ({batch}) so one patched copy fits, got {max_batch}."
        )
    return max(1, max_batch // batch)


# ---------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------
def _capture_clean(
    model, tokens: Tensor, names: Sequence[str], hooks: list
) -> tuple[Tensor, dict[str, Tensor]]:
    acts: dict[str, Tensor] = {}

    def save(act, hook):
        acts[hook.name] = act.detach()

    with model.hooks(fwd_hooks=list(hooks) + [(n, save) for n in names]):  # after steering hooks
        logits = model(tokens)
    return logits, acts


def _sweep(
    model,
    plan: _Plan,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: MetricFn | Metric,
    *,
    clean_hooks: list,
    corrupted_hooks: list,
    max_batch: int | None,
    memory_budget: int,
    align: Tensor | None,
    share_prefix: bool,
    progress: bool,
    position_groups: int | None = None,
    max_copies: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(values [len(layers), *grid] on device, clean metric, corrupted metric)."""
    batch, pos = corrupted_tokens.shape
    with torch.no_grad():
        clean_logits, clean_acts = _capture_clean(model, clean_tokens, list(plan.names.values()), clean_hooks)
        runner = _Runner(
            model,
            corrupted_tokens,
            corrupted_hooks,
            share_prefix=share_prefix,
            last_only=bool(getattr(metric, "last_position_only", False)),
        )
        corrupted_logits = runner.corrupted_run(plan.layers)
        clean_m = call_metric(metric, clean_logits)
        corrupted_m = call_metric(metric, corrupted_logits)
        del clean_logits, corrupted_logits
        if align is not None:
            dim = 1 if plan.kind != "pattern" else None
            for n in clean_acts:
                clean_acts[n] = clean_acts[n].index_select(dim, align.to(clean_acts[n].device))
        copies = min(
            _chunk(model, pos, batch, max_batch, memory_budget), plan.n_sites, max_copies or plan.n_sites
        )
        out: list[Tensor] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.layers) * plan.n_sites, desc=f"patching {plan.hook}")
        site_pos = torch.tensor(plan.site_positions())
        if position_groups is None:  # split only sweeps large enough to keep passes >= 64 sequences
            position_groups = min(6, plan.n_sites * batch // 64)
        suffix = runner.suffix and "pos" in plan.by and position_groups > 1
        if suffix:  # several passes per layer, each over the positions from its earliest site on
            n_pos = len(plan.index["pos"])
            copies = min(copies, -(-plan.n_sites // min(position_groups, n_pos)))
        # sites ordered by position, so that each pass starts as late as its earliest site allows
        order = torch.argsort(site_pos, stable=True) if suffix else torch.arange(plan.n_sites)
        pos_dim = 1 + _AXIS_DIM[plan.kind].get("pos", 0)  # the position axis of the activation
        for layer in plan.layers:
            name = plan.names[layer]
            clean = clean_acts[name]
            layer_out = []
            for start in range(0, plan.n_sites, copies):
                sites = order[start : start + copies]
                n = sites.shape[0]
                m = plan.mask(sites, clean.shape, clean.device)
                p0 = int(site_pos[sites[0]]) if suffix else 0
                src = clean
                if p0 > 0:  # activations hold positions >= p0 only
                    m = m.narrow(pos_dim + 1, p0, m.shape[pos_dim + 1] - p0)
                    src = clean.narrow(pos_dim, p0, clean.shape[pos_dim] - p0)

                def patch(act, hook, m=m, src=src, n=n):
                    a = act.view(n, act.shape[0] // n, *act.shape[1:])
                    return torch.where(m, src[None].to(act.dtype), a).view(act.shape)

                logits = runner.run(layer, n, [(name, patch)], p0=p0)
                layer_out.append(evaluate_metric(metric, logits, n))
                del logits
                if bar is not None:
                    bar.update(n)
            vals = torch.cat(layer_out)
            out.append(
                vals if not suffix else torch.empty_like(vals).index_copy_(0, order.to(vals.device), vals)
            )
        if bar is not None:
            bar.close()
        values = torch.cat(out).view(len(plan.layers), *plan.grid)
    return values, clean_m, corrupted_m


def _labels(model, plan: _Plan, tokens: Tensor) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {"layer": [str(x) for x in plan.layers]}
    tok_strs: list[str] | None = None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        try:
            tok_strs = [tokenizer.decode([t]) for t in tokens[0].tolist()]
        except Exception:  # pragma: no cover - exotic tokenizers
            tok_strs = None
    for a in plan.by[1:]:
        if a == "pos":
            labels[a] = [f"{p}: {tok_strs[p]}" if tok_strs else str(p) for p in plan.index[a]]
        else:
            labels[a] = [str(h) for h in plan.index[a]]
    return labels


def _finish(
    values: Tensor,
    clean_m: Tensor,
    corrupted_m: Tensor,
    *,
    plan: _Plan,
    model,
    tokens: Tensor,
    kind: str,
    metric,
) -> PatchResult:
    # one read-back for everything
    flat = torch.cat(
        [values.reshape(-1).double(), clean_m.reshape(1).double(), corrupted_m.reshape(1).double()]
    )
    host = flat.cpu()
    if not torch.isfinite(host).all():
        raise MetricError(
            "metric returned NaN or inf for some patched runs (or the clean/corrupted run). Fix: make the "
            "metric finite, e.g. use log-probabilities instead of log of probabilities that can be 0."
        )
    vals = host[:-2].view(values.shape).to(values.dtype)
    return PatchResult(
        values=vals,
        axes=plan.by,
        labels=_labels(model, plan, tokens),
        hook=plan.hook,
        kind=kind,
        metric_name=getattr(metric, "name", getattr(metric, "__name__", "metric")),
        clean_metric=float(host[-2]),
        corrupted_metric=float(host[-1]),
    )


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
    share_prefix: bool = True,
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
        hook: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (sites by layer
            and position), ``z``, ``q``, ``k``, ``v``, ``result`` (per head), ``pattern``,
            ``attn_scores`` (per head; ``pos`` is the destination position).
        by: site axes, ``"layer"`` first: ``("layer", "pos")`` (default for residual hooks),
            ``("layer",)``, ``("layer", "head")`` (default for head hooks), ``("layer", "pos", "head")``,
            ``("layer", "head", "pos")``. Result axes follow this order.
        layers, heads, positions: restrict the sweep to these indices (default all).
        align: for clean and corrupted inputs of different lengths: for each corrupted position, the
            clean position whose activation is patched in (``[corrupted_pos]``).
        max_batch: most sequences per forward pass (patched copies × batch); default from ``memory_budget``.
        memory_budget: bytes of activations one pass may use when ``max_batch`` is not given.
        share_prefix: start each pass at the patched block from the cached corrupted block input.
        progress: show a tqdm bar.

    Returns:
        :class:`~steer_lens.patching.PatchResult` with ``values`` ``[n_layers, ...]`` (metric of each
        patched run, metric's units) and the clean / corrupted baselines.

    Raises:
        HookNameError: unknown hook, or not in this model (e.g. ``resid_mid`` with parallel attention).
        ConfigError: bad ``by``, a layer/head/position index out of range, ``max_batch`` below the batch.
        ShapeMismatchError: clean and corrupted shapes differ (and no ``align``), bad ``align``.
        MetricError: the metric returns the wrong shape, or NaN/inf.
    """
    base, hooks = _unwrap(model)
    clean_tokens = _check_tokens(clean_tokens, "clean_tokens", base)
    corrupted_tokens = _check_tokens(corrupted_tokens, "corrupted_tokens", base)
    _check_metric(metric)
    plan = _plan(
        base, hook, by, pos=corrupted_tokens.shape[1], layers=layers, heads=heads, positions=positions
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
        share_prefix=share_prefix,
        progress=progress,
        **_steer_limits(model),
    )
    return _finish(
        values, cm, km, plan=plan, model=base, tokens=corrupted_tokens, kind="activation", metric=metric
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
    share_prefix: bool = True,
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

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        tokens: ``[batch, pos]`` input (both runs).
        metric, hook, by, layers, heads, positions, max_batch, memory_budget, share_prefix, progress:
            as :func:`activation_patch`.
        mode: ``"denoise"`` or ``"noise"``.

    Returns:
        :class:`~steer_lens.patching.PatchResult` (``kind`` is the mode).

    Raises:
        ConfigError: ``steered`` is not a SteeredTransformer, bad mode; and as :func:`activation_patch`.
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
        share_prefix=share_prefix,
        progress=progress,
        **_steer_limits(steered),
    )
    return _finish(values, cm, km, plan=plan, model=model, tokens=tokens, kind=mode, metric=metric)
