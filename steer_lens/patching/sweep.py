"""The batched sweep of activation patching: many patched sites per forward pass.

:func:`_sweep` runs the clean input once (caching only the patched hooks), then the corrupted batch
repeated along the batch dimension, copy ``s`` patching site ``s``; :class:`_Runner` starts each pass
at the patched block from the corrupted run's cached block input and, for last-position metrics,
computes only the positions a site can change. :func:`_finish` reads every value back to the host
once. See :mod:`steer_lens.patching.activation` for the method and its references.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError
from steer_lens.models import matmul_layout
from steer_lens.patching.metrics import Metric, MetricFn, call_metric, evaluate_metric
from steer_lens.patching.results import PatchResult
from steer_lens.patching.sites import _AXIS_DIM, _labels, _Plan


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
    * ``p1`` (in :meth:`run`): sites local to their position run block ``l`` on ``p0..p1`` only.
    * ``last_query`` (set by the sweep, with ``suffix``): the last block computes the query, attention
      output and MLP of the last position only; for the earlier positions it computes just the keys
      and values (``hook_resid_pre`` -> ``ln1`` -> ``attn.calculate_qkv_matrices``, TransformerLens's
      own modules and hooks), and the last position attends to them through a key/value cache. Passes
      of sites before the last block go into one such call together (:meth:`flush`).
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
        self._patches: dict[str, Callable] | None = None  # set inside `session`
        self.last_query = False
        # positions (start, length), relative to the pass's first position, of the activation the
        # current call computes; None: all of them (the patch narrows its mask to this window)
        self.window: tuple[int, int] | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor, _Deferred]] = []
        self._pending_bytes = 0
        self.flush_bytes = 1 << 28

    def kv_ok(self) -> bool:
        """Whether the last block's keys and values can be computed apart from its queries (the block
        feeds ``ln1(resid_pre)`` straight to ``attn.calculate_qkv_matrices`` and caches what it
        returns), as ``last_query`` needs."""
        cfg = self.model.cfg
        try:
            from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
        except ImportError:  # pragma: no cover - other TransformerLens versions: keep the full block
            return False
        post_norm = set(POST_NORM_ARCHITECTURES) | {"OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"}
        block = self.model.blocks[int(cfg.n_layers) - 1]
        return (
            self.suffix
            and self.tokens.shape[1] >= 2
            and not getattr(cfg, "use_attn_in", False)
            and not getattr(cfg, "use_split_qkv_input", False)
            and getattr(cfg, "original_architecture", None) not in post_norm
            and getattr(cfg, "clip_qkv", None) is None
            and hasattr(block, "ln1")
            and hasattr(block.attn, "calculate_qkv_matrices")
        )

    def corrupted_run(
        self, layers: Sequence[int], clean: Tensor | None = None, clean_names: Sequence[str] = ()
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Logits of the corrupted run (``last_only``: its final residual at the last position, before
        the final norm); records the input of each block in ``layers`` (and keys/values).

        With ``clean`` (same shape as the corrupted tokens, same hooks) the clean run goes in the same
        forward pass, stacked before the corrupted batch: returns (corrupted output, clean output, clean
        activations at ``clean_names``); otherwise (corrupted output, None, {}).
        """
        capture, after = [], []
        b = 0 if clean is None else clean.shape[0]  # the corrupted rows start at b
        clean_acts: dict[str, Tensor] = {}
        if self.prefix:

            def save(act, hook, store, layer):
                store[layer] = act[b:].detach()

            wanted = set(layers) | {i + 1 for i in layers if i + 1 < int(self.model.cfg.n_layers)}
            capture = [
                (f"blocks.{layer}.hook_resid_pre", _partial(save, store=self.block_inputs, layer=layer))
                for layer in sorted(wanted)
            ]
            if self.suffix:
                for i in range(min(layers), int(self.model.cfg.n_layers)):
                    after.append((f"blocks.{i}.attn.hook_k", _partial(save, store=self.keys, layer=i)))
                    after.append((f"blocks.{i}.attn.hook_v", _partial(save, store=self.values, layer=i)))
            self.attention_mask = self.model.input_to_embed(self.tokens)[3]

        def save_clean(act, hook):
            clean_acts[hook.name] = act[:b].detach()

        after += [(n, save_clean) for n in clean_names]  # after the run's own (steering) hooks
        tokens = self.tokens if clean is None else torch.cat([clean, self.tokens])
        # block inputs are captured first (the raw input), keys/values last (what attention used)
        with self.model.hooks(fwd_hooks=capture + list(self.hooks) + after):
            if self.last_only:
                out = self.model(tokens, stop_at_layer=int(self.model.cfg.n_layers))[:, -1:]
            else:
                out = self.model(tokens)
        return out[b:], (None if clean is None else out[:b]), clean_acts

    def unembed(self, resid: Tensor, columns: Tensor | None = None) -> Tensor:
        """Logits ``[rows, 1, d_vocab]`` (or ``[rows, 1, n_columns]``) of final residuals, under the hooks."""
        if self._patches is not None:  # inside `session`: the hooks are installed already
            self._patches.clear()
            return _final_logits(self.model, resid, [], columns)
        return _final_logits(self.model, resid, self.hooks, columns)

    @contextmanager
    def session(self, names: Sequence[str]) -> Iterator[None]:
        """One ``model.hooks`` context for many passes: the run's hooks, then a dispatcher at each
        patched hook ``names`` that applies the current pass's patch (installing and removing hooks
        walks every hook point, ~0.3 ms per pass on a small model)."""
        patches: dict[str, Callable] = {}

        def dispatch(act, hook):
            fn = patches.get(hook.name)
            return act if fn is None else fn(act, hook)

        with self.model.hooks(fwd_hooks=list(self.hooks) + [(n, dispatch) for n in names]):
            self._patches = patches
            try:
                yield
            finally:
                self._patches = None

    def _hooked(self, hooks: list):
        """The hooks of one pass: set on the session's dispatcher, or installed for the call."""
        if self._patches is None:
            return self.model.hooks(fwd_hooks=list(self.hooks) + hooks)
        self._patches.clear()
        self._patches.update(dict(hooks))
        return nullcontext()

    def _cache(self, layer: int, n_copies: int, p0: int, stop: int | None = None):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        def rep(t: Tensor) -> Tensor:
            return t[:, :p0].repeat(n_copies, *[1] * (t.ndim - 1))

        entries = [
            TransformerLensKeyValueCacheEntry(
                past_keys=rep(self.keys[i]), past_values=rep(self.values[i]), frozen=True
            )
            if layer <= i < (stop or int(self.model.cfg.n_layers))
            else None
            for i in range(int(self.model.cfg.n_layers))
        ]
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(self.tokens.shape, dtype=torch.long, device=self.tokens.device)
        return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=rep(mask), frozen=True)

    def run(
        self, layer: int, n_copies: int, hooks: list, p0: int = 0, p1: int | None = None
    ) -> Tensor | _Deferred:
        """Logits of ``n_copies`` stacked copies of the corrupted batch, from block ``layer`` on.

        With ``last_only`` the final residual ``[n_copies * batch, 1, d_model]`` at the last position is
        returned instead (see :meth:`unembed`): TransformerLens's unembedding copies ``W_U`` on every
        call, so the sweep unembeds all passes together. With ``p0 > 0`` (suffix mode) only positions
        ``>= p0`` are computed. With ``p1`` (suffix mode, sites that change block ``layer``'s output at
        their own position only, e.g. ``z``) block ``layer`` runs on positions ``p0..p1`` alone and the
        later blocks take the corrupted run's block input for the positions after ``p1``.
        """
        n_layers = int(self.model.cfg.n_layers)
        if self.last_query:
            return self._run_last_query(layer, n_copies, hooks, p0, p1)
        if p1 is not None and self.local_ok(layer, p1):
            return self._run_local(layer, n_copies, hooks, p0, p1)
        with self._hooked(hooks):
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
            resid = self.model(
                x, start_at_layer=layer, stop_at_layer=n_layers, attention_mask=mask, past_kv_cache=cache
            )
            return resid[:, -1:]  # final norm and unembedding later, for all passes at once (`unembed`)

    def local_ok(self, layer: int, p1: int) -> bool:
        """Whether :meth:`run` with ``p1`` takes the position-local path."""
        return self.suffix and layer + 1 < int(self.model.cfg.n_layers) and p1 + 1 < self.tokens.shape[1]

    def _run_local(self, layer: int, n_copies: int, hooks: list, p0: int, p1: int) -> Tensor:
        """:meth:`run` for sites local to their position: block ``layer`` on positions ``p0..p1`` only."""

        def rep(t: Tensor) -> Tensor:
            return t.repeat(n_copies, *[1] * (t.ndim - 1))

        n_layers = int(self.model.cfg.n_layers)
        mask = self.attention_mask
        with self._hooked(hooks):
            out = self.model(
                rep(self.block_inputs[layer][:, p0 : p1 + 1]),
                start_at_layer=layer,
                stop_at_layer=layer + 1,
                attention_mask=None if mask is None else rep(mask[:, : p1 + 1]),
                past_kv_cache=self._cache(layer, n_copies, p0, stop=layer + 1) if p0 > 0 else None,
            )
            # positions after p1 leave block `layer` as in the corrupted run
            x = torch.cat([out, rep(self.block_inputs[layer + 1][:, p1 + 1 :])], dim=1)
            resid = self.model(
                x,
                start_at_layer=layer + 1,
                stop_at_layer=n_layers,
                attention_mask=None if mask is None else rep(mask),
                past_kv_cache=self._cache(layer + 1, n_copies, p0) if p0 > 0 else None,
            )
        return resid[:, -1:]


    # -- last-query mode -----------------------------------------------------------------------------
    def _run_last_query(
        self, layer: int, n_copies: int, hooks: list, p0: int, p1: int | None
    ) -> Tensor | _Deferred:
        """:meth:`run` in ``last_query`` mode: a :class:`_Deferred` final residual for sites before the
        last block (resolved by :meth:`flush`), the final residual itself for sites in the last block."""
        last = int(self.model.cfg.n_layers) - 1

        def rep(t: Tensor) -> Tensor:
            return t.repeat(n_copies, *[1] * (t.ndim - 1))

        mask = self.attention_mask
        with self._hooked(hooks):
            if layer == last:  # the patch acts in the last block: keys/values and the query here
                x = rep(self.block_inputs[last][:, p0:])
                keys, values = self._last_keys_values(x, n_copies, p0, window=True)
                self.window = (x.shape[1] - 1, 1)
                try:
                    return self._last_position(x[:, -1:], keys, values, n_copies)
                finally:
                    self.window = None
            if p1 is not None and self.local_ok(layer, p1):  # block `layer` on positions p0..p1 only
                out = self.model(
                    rep(self.block_inputs[layer][:, p0 : p1 + 1]),
                    start_at_layer=layer,
                    stop_at_layer=layer + 1,
                    attention_mask=None if mask is None else rep(mask[:, : p1 + 1]),
                    past_kv_cache=self._cache(layer, n_copies, p0, stop=layer + 1) if p0 > 0 else None,
                )
                x = torch.cat([out, rep(self.block_inputs[layer + 1][:, p1 + 1 :])], dim=1)
                start = layer + 1
            else:
                x = rep(self.block_inputs[layer][:, p0:])
                start = layer
            if start < last:
                x = self.model(
                    x,
                    start_at_layer=start,
                    stop_at_layer=last,
                    attention_mask=None if mask is None else rep(mask),
                    past_kv_cache=self._cache(start, n_copies, p0, stop=last) if p0 > 0 else None,
                )
            keys, values = self._last_keys_values(x, n_copies, p0)
        deferred = _Deferred()
        self._pending.append((keys, values, x[:, -1:], deferred))
        self._pending_bytes += (keys.numel() + values.numel() + x.shape[0] * x.shape[-1]) * x.element_size()
        if self._pending_bytes > self.flush_bytes:
            self.flush()
        return deferred

    def _last_keys_values(
        self, x: Tensor, n_copies: int, p0: int, window: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Keys and values of the last block for positions ``0..T-2``: the corrupted run's before
        ``p0``, computed from the block input ``x`` (positions ``p0..T-1``) for ``p0..T-2``."""
        last = int(self.model.cfg.n_layers) - 1
        prefix_k = self.keys[last][:, :p0].repeat(n_copies, *[1] * (self.keys[last].ndim - 1))
        prefix_v = self.values[last][:, :p0].repeat(n_copies, *[1] * (self.values[last].ndim - 1))
        if x.shape[1] < 2:
            return prefix_k, prefix_v
        block = self.model.blocks[last]
        if window:
            self.window = (0, x.shape[1] - 1)
        try:
            # as TransformerBlock.forward up to the key/value cache (same modules, same hooks)
            resid = block.hook_resid_pre(x[:, :-1])
            _, k, v = block.attn.calculate_qkv_matrices(block.ln1(resid), block.ln1(resid), block.ln1(resid))
        finally:
            self.window = None
        return torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1)

    def _last_position(self, x: Tensor, keys: Tensor, values: Tensor, n_copies: int) -> Tensor:
        """The last block at the last position only (input ``x`` ``[rows, 1, d_model]``), attending to
        ``keys``/``values`` of positions ``0..T-2``: the final residual ``[rows, 1, d_model]``."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        n_layers = int(self.model.cfg.n_layers)
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(self.tokens.shape, dtype=torch.long, device=self.tokens.device)
        mask = mask.repeat(n_copies, 1)
        entries = [None] * (n_layers - 1) + [
            TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
        ]
        cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask[:, :-1], frozen=True)
        return self.model(
            x,
            start_at_layer=n_layers - 1,
            stop_at_layer=n_layers,
            attention_mask=None if self.attention_mask is None else mask,
            past_kv_cache=cache,
        )

    def flush(self) -> None:
        """Run the last block for every pending pass in one call (no patch is active there: each of
        these passes patched an earlier block) and resolve their :class:`_Deferred` results."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        keys = torch.cat([p[0] for p in pending])
        values = torch.cat([p[1] for p in pending])
        x = torch.cat([p[2] for p in pending])
        with self._hooked([]):
            out = self._last_position(x, keys, values, x.shape[0] // self.tokens.shape[0])
        start = 0
        for _, _, xi, deferred in pending:
            deferred.value = out[start : start + xi.shape[0]]
            start += xi.shape[0]


class _Deferred:
    """The final residual of a pass whose last block runs later, in :meth:`_Runner.flush`."""

    value: Tensor | None = None


def _resolve(runner: _Runner, rows: list) -> list[Tensor]:
    """``rows`` with every :class:`_Deferred` replaced by its tensor (flushing the runner first)."""
    runner.flush()
    return [r.value if isinstance(r, _Deferred) else r for r in rows]


# hooks whose value at position p changes the output of its block at position p only (not resid_pre,
# k, v: later positions of the same block read them through attention)
_LOCAL_HOOKS = frozenset(
    {"resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "result", "pattern", "attn_scores"}
)


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
def _final_logits(model, resid: Tensor, hooks: list, columns: Tensor | None) -> Tensor:
    """Final norm and unembedding of residuals ``[rows, pos, d_model]`` under ``hooks``.

    With ``columns`` only those vocabulary entries are computed (``ln_final``, ``unembed.hook_in``,
    then ``x @ W_U[:, columns] + b_U[columns]``): ``[rows, pos, n_columns]``.
    """
    n_layers = int(model.cfg.n_layers)
    # installing hooks and removing them walks every hook point (~0.3 ms on a small model): skip if none
    with model.hooks(fwd_hooks=list(hooks)) if hooks else nullcontext():
        if columns is None:
            return model(resid, start_at_layer=n_layers)
        x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        x = model.unembed.hook_in(x)
        w_u = model.unembed.W_U
        cols = columns.to(w_u.device)
        logits = x @ w_u[:, cols].to(x.dtype)
        b_u = getattr(model.unembed, "b_U", None)
        return logits if b_u is None else logits + b_u[cols].to(x.dtype)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """(values [len(layers), *grid] on device, clean metric, corrupted metric)."""
    batch, pos = corrupted_tokens.shape
    runner = _Runner(
        model,
        corrupted_tokens,
        corrupted_hooks,
        share_prefix=share_prefix,
        last_only=bool(getattr(metric, "last_position_only", False)),
    )
    last_only = runner.last_only
    columns = _metric_columns(model, metric, last_only, [clean_hooks, corrupted_hooks])
    with torch.no_grad(), matmul_layout(model, unembed=columns is None):
        names = list(plan.names.values())
        if clean_hooks is corrupted_hooks and clean_tokens.shape == corrupted_tokens.shape:
            # one forward pass for both runs (clean rows first)
            corrupted, clean_logits, clean_acts = runner.corrupted_run(plan.layers, clean_tokens, names)
        else:
            clean_logits, clean_acts = _capture_clean(model, clean_tokens, names, clean_hooks, last_only)
            corrupted = runner.corrupted_run(plan.layers)[0]
        if last_only:  # clean_logits holds the final residual of the last position
            clean_logits = _final_logits(model, clean_logits, clean_hooks, columns)
        clean_m = call_metric(metric if columns is None else metric.on_columns, clean_logits)
        del clean_logits
        rows: list[Tensor] = []  # last_only: final residuals, unembedded together at the end
        if last_only:
            rows.append(corrupted)
        else:
            corrupted_m = call_metric(metric, corrupted)
        del corrupted
        if align is not None:
            dim = 1 if plan.kind != "pattern" else None
            for n in clean_acts:
                clean_acts[n] = clean_acts[n].index_select(dim, align.to(clean_acts[n].device))
        copies = min(_chunk(model, pos, batch, max_batch, memory_budget), plan.n_sites)
        out: list[Tensor] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.layers) * plan.n_sites, desc=f"patching {plan.hook}")
        site_pos = torch.tensor(plan.site_positions())
        if position_groups is None:  # up to 6 passes per layer, each of >= ~12 sequences (measured on CPU)
            position_groups = min(6, plan.n_sites * batch // 12)
        suffix = runner.suffix and "pos" in plan.by and position_groups > 1
        # the last block computes the last position's query only (keys/values for the others)
        runner.last_query = suffix and runner.kv_ok()
        runner.flush_bytes = min(memory_budget // 4, 8 << 20)  # stays in cache (measured on CPU)
        last_block = int(model.cfg.n_layers) - 1
        all_copies = copies  # sites in the last block: keys/values are cheap, no position groups
        if suffix:  # several passes per layer, each over the positions from its earliest site on
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
        orders: list[Tensor] = []  # per layer: the site order of its values
        with runner.session(list(plan.names.values())):  # one hooks context for every pass
            for layer in plan.layers:
                name = plan.names[layer]
                clean = clean_acts[name]
                layer_out = []
                layer_order, first = order, 0
                if skip_dead and layer == last_block:
                    layer_order = torch.argsort(site_pos, stable=True)
                    first = int((site_pos < pos - 1).sum())
                    if first:
                        rows.append(rows[0].repeat(first, 1, 1))  # the corrupted run's final residual
                        if bar is not None:
                            bar.update(first)
                orders.append(layer_order)
                step = all_copies if runner.last_query and layer == last_block else copies
                for start in range(first, plan.n_sites, step):
                    sites = layer_order[start : start + step]
                    n = sites.shape[0]
                    m = plan.mask(sites, clean.shape, clean.device)
                    p0 = int(site_pos[sites[0]]) if suffix else 0
                    p1 = int(site_pos[sites[-1]]) if local else None
                    src = clean
                    end = clean.shape[pos_dim]
                    if local and runner.local_ok(layer, p1):  # block `layer` runs on positions p0..p1
                        end = p1 + 1
                    else:
                        p1 = None
                    if p0 > 0 or end < clean.shape[pos_dim]:  # activations hold positions p0..end-1 only
                        m = m.narrow(pos_dim + 1, p0, end - p0)
                        src = clean.narrow(pos_dim, p0, end - p0)
                        if plan.kind == "pattern" and end < src.shape[-1]:  # keys seen: positions < end
                            src = src.narrow(-1, 0, end)

                    def patch(act, hook, m=m, src=src, n=n):
                        if runner.window is not None:  # the call computes some of the pass's positions
                            m = m.narrow(pos_dim + 1, *runner.window)
                            src = src.narrow(pos_dim, *runner.window)
                        a = act.view(n, act.shape[0] // n, *act.shape[1:])
                        return torch.where(m, src[None].to(act.dtype), a).view(act.shape)

                    out_n = runner.run(layer, n, [(name, patch)], p0=p0, p1=p1)
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
                corrupted_m, vals = vals[0], vals[1:]
                out = list(vals.view(len(plan.layers), plan.n_sites))
        # back from the order of the passes to site order
        out = [torch.empty_like(v).index_copy_(0, o.to(v.device), v) for v, o in zip(out, orders, strict=True)]
        values = torch.cat(out).view(len(plan.layers), *plan.grid)
    return values, clean_m, corrupted_m


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
