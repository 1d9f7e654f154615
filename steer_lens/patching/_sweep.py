"""The batched sweep of activation patching: many patched sites per forward pass.

:func:`_sweep` runs the clean input once (caching only the patched hooks), then the corrupted batch
repeated along the batch dimension, copy ``s`` patching site ``s``; the passes themselves are run by
:class:`steer_lens.patching._runner._Runner`. :func:`_finish` reads every value back to the host
once. See :mod:`steer_lens.patching.activation` for the method and its references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError
from steer_lens.metrics import Metric, MetricFn, call_metric, evaluate_metric
from steer_lens.models import matmul_layout
from steer_lens.patching._last_query import _Deferred, _resolve, _Tiled
from steer_lens.patching._runner import _final_logits, _Runner
from steer_lens.patching._sites import _AXIS_DIM, _labels, _Plan
from steer_lens.patching.results import PatchResult, warn_if_noisy
from steer_lens.patching.strategy import Strategy, choose_strategy

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


@dataclass(frozen=True)
class _Schedule:
    """How the sites of a sweep are grouped into passes (chosen once, before any pass runs)."""

    copies: int  # sites per pass
    last_copies: int  # sites per pass in the last block with a last-query runner (no position groups)
    grouped: bool  # by-position passes that start at their earliest site's position
    local: bool  # sites change their block's output at their own position only: the block runs p0..p1
    order: Tensor  # the sites in the order of the passes
    site_pos: Tensor  # each site's position (0 for sites over all positions)
    skip_dead: bool  # last-block sites local to a position before the last cannot reach the metric
    derive: str  # last-query: how a last-block site's keys/values come from the clean/corrupted rows
    pos_dim: int  # the position axis of the activation (batch included)
    fused: bool  # the clean run rides in the corrupted run's passes (last-query, same hooks and shape)

    def layer_passes(self, layer: int, last_block: int, n_pos: int, last_query: bool) -> tuple[Tensor, int, int]:
        """(site order, first site that needs a pass, sites per pass) for block ``layer``."""
        order, first = self.order, 0
        if self.skip_dead and layer == last_block:
            order = torch.argsort(self.site_pos, stable=True)
            first = int((self.site_pos < n_pos - 1).sum())
        step = self.last_copies if last_query and layer == last_block else self.copies
        return order, first, step


def _schedule(
    runner: _Runner, plan: _Plan, strategy: Strategy, *, batch: int, n_pos: int, copies: int, fused: bool
) -> _Schedule:
    """The :class:`_Schedule` of a sweep with ``copies`` sites per pass at most."""
    last_only = runner.last_only
    site_pos = torch.tensor(plan.site_positions())
    grouped = runner.suffix and "pos" in plan.by
    all_copies = copies
    if grouped:  # several passes per layer, each over the positions from its earliest site on
        groups = strategy.position_groups
        if groups is None:
            # up to 6 passes per layer, each of >= ~12 sequences at d_model 512 and more on narrower
            # models, where a pass costs more in calls than in compute (measured on CPU)
            rows = 12 * max(1, 512 // int(runner.model.cfg.d_model))
            groups = max(1, min(6, plan.n_sites * batch // rows))
        copies = min(copies, -(-plan.n_sites // min(groups, len(plan.index["pos"]))))
    return _Schedule(
        copies=copies,
        last_copies=all_copies,
        grouped=grouped,
        local=grouped and plan.hook in _LOCAL_HOOKS,
        # sites ordered by position, so that each pass starts as late as its earliest site allows
        order=torch.argsort(site_pos, stable=True) if grouped else torch.arange(plan.n_sites),
        site_pos=site_pos,
        skip_dead=last_only and "pos" in plan.by and plan.hook in _LOCAL_HOOKS,
        derive="corrupted" if plan.hook in _LOCAL_HOOKS else _KV_DERIVE.get(plan.hook, ""),
        pos_dim=1 + _AXIS_DIM[plan.kind].get("pos", 0),
        fused=fused,
    )


@dataclass
class _Baselines:
    """The clean and corrupted runs of a sweep."""

    clean_acts: dict[str, Tensor]  # the clean activations at the patched hooks
    clean_m: Tensor | None  # metrics (None: unembedded with the passes, last-position sweeps)
    corrupted_m: Tensor | None
    corrupted_row: Tensor | _Deferred | None  # last-position sweeps: the corrupted final residual
    rows: list  # last-position sweeps: final residuals to unembed (baselines first)
    first_pass: _Deferred | None = None  # fused: block 0's first pass, run inside the baseline pass


def _baselines(runner: _Runner, plan: _Plan, sched: _Schedule, clean_tokens: Tensor, metric, *,
               clean_hooks: list, same_runs: bool, columns: Tensor | None) -> _Baselines:
    """Run the clean and corrupted inputs (one pass when they share hooks and shape; with the first
    pass of block 0 in it when fused), caching only the patched hooks' clean activations."""
    model, last_only = runner.model, runner.last_only
    names = list(plan.names.values())
    if sched.fused:
        first = None
        if plan.layers[0] == 0 < int(model.cfg.n_layers) - 1:
            sites = sched.order[: sched.copies]
            first = (plan.names[0], sites.shape[0], _site_mask(plan, sites, runner.tokens.device), sched.pos_dim)
        clean_d, corrupted, acts, first_d = runner.last.fused_run(plan.layers, clean_tokens, names, first)
        return _Baselines(acts, None, None, corrupted, [clean_d, corrupted], first_pass=first_d)
    if same_runs:  # one forward pass for both runs (clean rows first)
        corrupted, clean_logits, acts = runner.corrupted_run(plan.layers, clean_tokens, names)
    else:
        clean_logits, acts = _capture_clean(model, clean_tokens, names, clean_hooks, last_only)
        corrupted = runner.corrupted_run(plan.layers)[0]
    if last_only:  # clean_logits holds the final residual of the last position
        clean_logits = _final_logits(model, clean_logits, clean_hooks, columns)
    clean_m = call_metric(metric if columns is None else metric.on_columns, clean_logits)
    if last_only:
        return _Baselines(acts, clean_m, None, corrupted, [corrupted])
    return _Baselines(acts, clean_m, call_metric(metric, corrupted), None, [])


def _site_mask(plan: _Plan, sites: Tensor, device):
    return lambda shape: plan.mask(sites, shape, device)


def _layer(runner: _Runner, plan: _Plan, sched: _Schedule, layer: int, base: _Baselines, metric, bar) -> tuple[Tensor, list]:
    """The passes of block ``layer``: (site order of its values, metric values per pass — or, for
    last-position sweeps, nothing: the final residuals go to ``base.rows``)."""
    last_block = int(runner.model.cfg.n_layers) - 1
    n_pos = runner.tokens.shape[1]
    name = plan.names[layer]
    order, first, step = sched.layer_passes(layer, last_block, n_pos, runner.last_query)
    if first:  # sites that cannot reach the last position: the corrupted run's final residual
        base.rows.append(_Tiled(base.corrupted_row, first))
        if bar is not None:
            bar.update(first)
    values = []
    for start in range(first, plan.n_sites, step):
        sites = order[start : start + step]
        n = sites.shape[0]
        p0 = int(sched.site_pos[sites[0]]) if sched.grouped else 0
        if base.first_pass is not None and layer == 0 and start == 0:  # ran in the fused pass
            base.rows.append(base.first_pass)
        elif runner.last_query and layer == last_block:  # patched inside the flush's calls
            src = None if sched.fused else base.clean_acts[name]
            mask = _site_mask(plan, sites, runner.tokens.device)
            base.rows.append(runner.last.defer_last(name, n, mask, src, sched.pos_dim, p0, sched.derive))
        else:
            p1 = int(sched.site_pos[sites[-1]]) if sched.local else None
            out = _pass(runner, plan, layer, sites, base.clean_acts[name], p0, p1, sched.pos_dim)
            if runner.last_only:
                base.rows.append(out)
            else:
                values.append(evaluate_metric(metric, out, n))
            del out
        if bar is not None:
            bar.update(n)
    return order, values


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
    strategy: str | Strategy,
    progress: bool,
    positional: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(values [len(layers), *grid] on device, clean metric, corrupted metric).

    ``strategy`` is resolved by :func:`~steer_lens.patching.strategy.choose_strategy`;
    ``positional``: the run's hooks find positions by absolute index (a position-specific steering
    vector), so every pass must cover all positions.
    """
    batch, pos = corrupted_tokens.shape
    last_position = bool(getattr(metric, "last_position_only", False))
    strategy = choose_strategy(model, strategy, last_position_metric=last_position, positional=positional, n_pos=pos)
    runner = _Runner(model, corrupted_tokens, corrupted_hooks, strategy=strategy, last_only=last_position)
    columns = _metric_columns(model, metric, runner.last_only, [clean_hooks, corrupted_hooks])
    same_runs = clean_hooks is corrupted_hooks and clean_tokens.shape == corrupted_tokens.shape
    if runner.last is not None:
        runner.last.flush_bytes = min(memory_budget // 4, 8 << 20)  # stays in cache (measured on CPU)
    copies = min(_chunk(model, pos, batch, max_batch, memory_budget), plan.n_sites)
    # fused: the clean run in the same passes as the patched copies (the patch reads its rows)
    fused = runner.last_query and same_runs and align is None
    sched = _schedule(runner, plan, strategy, batch=batch, n_pos=pos, copies=copies, fused=fused)
    with torch.no_grad(), matmul_layout(model, unembed=columns is None):
        base = _baselines(
            runner, plan, sched, clean_tokens, metric, clean_hooks=clean_hooks, same_runs=same_runs, columns=columns
        )
        if align is not None:
            dim = 1 if plan.kind != "pattern" else None
            for n in base.clean_acts:
                base.clean_acts[n] = base.clean_acts[n].index_select(dim, align.to(base.clean_acts[n].device))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.layers) * plan.n_sites, desc=f"patching {plan.hook}")
        orders, out = [], []
        with runner.session(list(plan.names.values())):  # one hooks context for every pass
            for layer in plan.layers:
                order, values = _layer(runner, plan, sched, layer, base, metric, bar)
                orders.append(order)
                if not runner.last_only:
                    out.append(torch.cat(values))
            if bar is not None:
                bar.close()
            clean_m, corrupted_m = base.clean_m, base.corrupted_m
            if runner.last_only:
                rows = _resolve(runner, base.rows)  # passes whose last block has not run yet
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
    what: str = "activation_patch",
    names: tuple[str, str] = ("clean", "corrupted"),
    **extra,
) -> PatchResult:
    """The :class:`PatchResult` of a sweep (one read-back), with its noise floor; warns
    (:class:`NoisyMetricWarning`) when the two reference metrics differ by rounding noise only.
    ``extra``: further fields of the result (``vector_hooks``, ``before_vector``)."""
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
    clean, corrupted = float(host[-2]), float(host[-1])
    dtype = getattr(model.cfg, "dtype", torch.float32)
    floor = warn_if_noisy(clean, corrupted, dtype, what=what, names=names)
    return PatchResult(
        values=vals,
        axes=plan.by,
        labels=_labels(model, plan, tokens),
        hook=plan.hook,
        kind=kind,
        metric_name=getattr(metric, "name", getattr(metric, "__name__", "metric")),
        clean_metric=clean,
        corrupted_metric=corrupted,
        noise_floor=floor,
        **extra,
    )
