"""The batched sweep of activation patching: many patched sites per forward pass.

:func:`_sweep` runs the clean input once (caching only the patched hooks), then the corrupted batch
repeated along the batch dimension, copy ``s`` patching site ``s``; the passes themselves are run by
:class:`steer_lens.patching._runner._Runner`. :func:`_finish` reads every value back to the host
once. See :mod:`steer_lens.patching.activation` for the method and its references.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError
from steer_lens.metrics import Metric, MetricFn, call_metric, evaluate_metric
from steer_lens.models import matmul_layout
from steer_lens.patching._last_query import _resolve, _Tiled
from steer_lens.patching._runner import _final_logits, _Runner
from steer_lens.patching._sites import _AXIS_DIM, _labels, _Plan
from steer_lens.patching.results import PatchResult

# hooks whose value at position p changes the output of its block at position p only (not resid_pre,
# k, v: later positions of the same block read them through attention)
_LOCAL_HOOKS = frozenset(
    {"resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "result", "pattern", "attn_scores"}
)
# hooks before the last block's keys/values whose patch acts position by position (key/value head by
# head): the patched rows' keys/values are the clean ones there, the corrupted ones elsewhere
_KV_DERIVE = {"resid_pre": "resid", "k": "k", "v": "v"}


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
def _metric_columns(model, metric, last_only: bool, hook_lists: Sequence[list]) -> Tensor | None:
    """The vocabulary columns a last-position sweep may restrict the unembedding to, or None.

    Only for a :class:`Metric` that declares ``columns`` (e.g. ``logit_diff``), on a model without
    logit soft-capping, and when no hook of the run sits on the unembedding (it would see a column slice).
    """
    columns = getattr(metric, "columns", None)
    if not last_only or columns is None or getattr(metric, "on_columns", None) is None:
        return None
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        return None
    if any(str(name).startswith("unembed") for hooks in hook_lists for name, _ in hooks):
        return None
    if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= int(model.cfg.d_vocab)):
        raise MetricError(
            f"metric {getattr(metric, 'name', metric)}: token ids {columns.tolist()} outside the vocabulary "
            f"[0, {int(model.cfg.d_vocab)}). Fix: build the metric from this model's token ids."
        )
    return columns


def _capture_clean(
    model, tokens: Tensor, names: Sequence[str], hooks: list, last_only: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clean logits (``last_only``: the final residual at the last position, as
    :meth:`_Runner.corrupted_run`) and the activations at ``names``."""
    acts: dict[str, Tensor] = {}

    def save(act, hook):
        acts[hook.name] = act.detach()

    with model.hooks(fwd_hooks=list(hooks) + [(n, save) for n in names]):  # after steering hooks
        if not last_only:
            return model(tokens), acts
        return model(tokens, stop_at_layer=int(model.cfg.n_layers))[:, -1:], acts


def _unembed_metric(
    runner: _Runner, metric, rows: list[Tensor], batch: int, memory_budget: int, columns: Tensor | None
) -> Tensor:
    """Metric of each copy from final residuals ``[copies * batch, 1, d_model]`` (chunks to the budget)."""
    resid = torch.cat(rows)
    width = int(runner.model.cfg.d_vocab) if columns is None else columns.numel()
    per_row = 3 * width * resid.element_size()  # logits + log-softmax + slack
    step = max(1, memory_budget // per_row // batch) * batch
    if columns is not None:
        metric = metric.on_columns
    out = []
    for start in range(0, resid.shape[0], step):
        chunk = resid[start : start + step]
        out.append(evaluate_metric(metric, runner.unembed(chunk, columns), chunk.shape[0] // batch))
    return torch.cat(out)


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
    positional: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(values [len(layers), *grid] on device, clean metric, corrupted metric).

    ``positional``: the run's hooks find positions by absolute index (a position-specific steering
    vector), so every pass must cover all positions.
    """
    batch, pos = corrupted_tokens.shape
    runner = _Runner(
        model,
        corrupted_tokens,
        corrupted_hooks,
        share_prefix=share_prefix,
        last_only=bool(getattr(metric, "last_position_only", False)),
    )
    last_only = runner.last_only
    last_block = int(model.cfg.n_layers) - 1
    columns = _metric_columns(model, metric, last_only, [clean_hooks, corrupted_hooks])
    # how the sites are grouped into passes
    copies = min(_chunk(model, pos, batch, max_batch, memory_budget), plan.n_sites)
    site_pos = torch.tensor(plan.site_positions())
    suffix = runner.suffix and "pos" in plan.by and not positional
    # the last block computes the last position's query only (keys/values for the others)
    # (also for sites over all positions, whose passes all start at position 0)
    runner.last_query = runner.suffix and not positional and runner.kv_ok()
    runner.flush_bytes = min(memory_budget // 4, 8 << 20)  # stays in cache (measured on CPU)
    # fused: the clean run in the same passes as the patched copies (the patch reads its rows)
    fused = (
        runner.last_query
        and clean_hooks is corrupted_hooks
        and clean_tokens.shape == corrupted_tokens.shape
        and align is None
    )
    all_copies = copies  # sites in the last block: keys/values are cheap, no position groups
    if suffix:  # several passes per layer, each over the positions from its earliest site on
        if position_groups is None:
            # up to 6 passes per layer, each of >= ~12 sequences at d_model 512 and more on narrower
            # models, where a pass costs more in calls than in compute (measured on CPU)
            rows = 12 * max(1, 512 // int(model.cfg.d_model))
            position_groups = max(1, min(6, plan.n_sites * batch // rows))
        n_pos = len(plan.index["pos"])
        copies = min(copies, -(-plan.n_sites // min(position_groups, n_pos)))
    # sites that change block `layer`'s output at their own position only
    local = suffix and plan.hook in _LOCAL_HOOKS
    # sites ordered by position, so that each pass starts as late as its earliest site allows
    order = torch.argsort(site_pos, stable=True) if suffix else torch.arange(plan.n_sites)
    pos_dim = 1 + _AXIS_DIM[plan.kind].get("pos", 0)  # the position axis of the activation
    # in the last block, a site local to a position before the last one cannot reach the last
    # position's logits: its run is the corrupted run (no pass needed)
    skip_dead = last_only and "pos" in plan.by and plan.hook in _LOCAL_HOOKS
    # last block: the patched rows' keys/values come from the clean/corrupted rows (see _Entry.derive)
    derive = "corrupted" if plan.hook in _LOCAL_HOOKS else _KV_DERIVE.get(plan.hook, "")

    def site_mask(sites: Tensor):
        return lambda shape: plan.mask(sites, shape, corrupted_tokens.device)

    with torch.no_grad(), matmul_layout(model, unembed=columns is None):
        names = list(plan.names.values())
        rows: list = []  # last_only: final residuals, unembedded together at the end
        fused_first = None  # fused: the first pass of block 0, run inside the clean/corrupted pass
        if fused:
            first_layer = plan.layers[0]
            if first_layer == 0 < last_block:
                sites = order[:copies]
                fused_first = (plan.names[0], sites.shape[0], site_mask(sites), pos_dim)
            clean_d, corrupted, clean_acts, first_d = runner.fused_run(
                plan.layers, clean_tokens, names, fused_first
            )
            rows += [clean_d, corrupted]
        elif clean_hooks is corrupted_hooks and clean_tokens.shape == corrupted_tokens.shape:
            # one forward pass for both runs (clean rows first)
            corrupted, clean_logits, clean_acts = runner.corrupted_run(plan.layers, clean_tokens, names)
        else:
            clean_logits, clean_acts = _capture_clean(model, clean_tokens, names, clean_hooks, last_only)
            corrupted = runner.corrupted_run(plan.layers)[0]
        if not fused:
            if last_only:  # clean_logits holds the final residual of the last position
                clean_logits = _final_logits(model, clean_logits, clean_hooks, columns)
            clean_m = call_metric(metric if columns is None else metric.on_columns, clean_logits)
            del clean_logits
            if last_only:
                rows.append(corrupted)
            else:
                corrupted_m = call_metric(metric, corrupted)
        corrupted_row = rows[-1] if last_only else None
        del corrupted
        if align is not None:
            dim = 1 if plan.kind != "pattern" else None
            for n in clean_acts:
                clean_acts[n] = clean_acts[n].index_select(dim, align.to(clean_acts[n].device))
        out: list[Tensor] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.layers) * plan.n_sites, desc=f"patching {plan.hook}")
        orders: list[Tensor] = []  # per layer: the site order of its values
        with runner.session(names):  # one hooks context for every pass
            for layer in plan.layers:
                name = plan.names[layer]
                layer_out = []
                layer_order, first = order, 0
                if skip_dead and layer == last_block:
                    layer_order = torch.argsort(site_pos, stable=True)
                    first = int((site_pos < pos - 1).sum())
                    if first:
                        rows.append(_Tiled(corrupted_row, first))  # the corrupted run's final residual
                        if bar is not None:
                            bar.update(first)
                orders.append(layer_order)
                step = all_copies if runner.last_query and layer == last_block else copies
                for start in range(first, plan.n_sites, step):
                    sites = layer_order[start : start + step]
                    n = sites.shape[0]
                    p0 = int(site_pos[sites[0]]) if suffix else 0
                    if fused_first is not None and layer == 0 and start == 0:  # ran in the fused pass
                        rows.append(first_d)
                    elif runner.last_query and layer == last_block:  # patched inside the flush's calls
                        src = None if fused else clean_acts[name]
                        rows.append(runner.defer_last(name, n, site_mask(sites), src, pos_dim, p0, derive))
                    else:
                        p1 = int(site_pos[sites[-1]]) if local else None
                        out_n = _pass(runner, plan, layer, sites, clean_acts[name], p0, p1, pos_dim)
                        if last_only:
                            rows.append(out_n)
                        else:
                            layer_out.append(evaluate_metric(metric, out_n, n))
                        del out_n
                    if bar is not None:
                        bar.update(n)
                if not last_only:
                    out.append(torch.cat(layer_out))
            if bar is not None:
                bar.close()
            if last_only:
                rows = _resolve(runner, rows)  # passes whose last block has not run yet
                vals = _unembed_metric(runner, metric, rows, batch, memory_budget, columns)
                if fused:
                    clean_m, vals = vals[0], vals[1:]
                corrupted_m, vals = vals[0], vals[1:]
                out = list(vals.view(len(plan.layers), plan.n_sites))
        # back from the order of the passes to site order
        out = [torch.empty_like(v).index_copy_(0, o.to(v.device), v) for v, o in zip(out, orders, strict=True)]
        values = torch.cat(out).view(len(plan.layers), *plan.grid)
    return values, clean_m, corrupted_m


def _pass(
    runner: _Runner, plan: _Plan, layer: int, sites: Tensor, clean: Tensor, p0: int, p1: int | None, pos_dim: int
):
    """One pass: the sites' copies of the corrupted batch, patched at block ``layer`` from ``clean``
    (final residuals, logits or a deferred result, as :meth:`_Runner.run` returns)."""
    n = sites.shape[0]
    m = plan.mask(sites, clean.shape, clean.device)
    src = clean
    end = clean.shape[pos_dim]
    if p1 is not None and runner.local_ok(layer, p1):  # block `layer` runs on positions p0..p1
        end = p1 + 1
    else:
        p1 = None
    if p0 > 0 or end < clean.shape[pos_dim]:  # activations hold positions p0..end-1 only
        m = m.narrow(pos_dim + 1, p0, end - p0)
        src = clean.narrow(pos_dim, p0, end - p0)
        if plan.kind == "pattern" and end < src.shape[-1]:  # keys seen: positions < end
            src = src.narrow(-1, 0, end)

    def patch(act, hook):
        a = act.view(n, act.shape[0] // n, *act.shape[1:])
        return torch.where(m, src[None].to(act.dtype), a).view(act.shape)

    return runner.run(layer, n, [(plan.names[layer], patch)], p0=p0, p1=p1)


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
