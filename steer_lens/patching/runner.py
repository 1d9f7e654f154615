"""The runner of the patching sweep: forward passes of the stacked corrupted batch that start at a block.

:class:`_Runner` starts each pass at the patched block from the corrupted run's cached block input
and, for last-position metrics, computes only the positions (and, in the last block, only the query)
a site can change. :func:`steer_lens.patching.sweep._sweep` drives it; see
:mod:`steer_lens.patching.activation` for the method and its references.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor


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
            x = self._local_block(layer, n_copies, p0, p1)
            resid = self.model(
                x,
                start_at_layer=layer + 1,
                stop_at_layer=n_layers,
                attention_mask=None if mask is None else rep(mask),
                past_kv_cache=self._cache(layer + 1, n_copies, p0) if p0 > 0 else None,
            )
        return resid[:, -1:]

    def _local_block(self, layer: int, n_copies: int, p0: int, p1: int) -> Tensor:
        """Block ``layer`` on positions ``p0..p1`` only (under the current hooks): the input of block
        ``layer + 1`` for positions ``p0..T-1`` (after ``p1``: the corrupted run's)."""

        def rep(t: Tensor) -> Tensor:
            return t.repeat(n_copies, *[1] * (t.ndim - 1))

        mask = self.attention_mask
        out = self.model(
            rep(self.block_inputs[layer][:, p0 : p1 + 1]),
            start_at_layer=layer,
            stop_at_layer=layer + 1,
            attention_mask=None if mask is None else rep(mask[:, : p1 + 1]),
            past_kv_cache=self._cache(layer, n_copies, p0, stop=layer + 1) if p0 > 0 else None,
        )
        # positions after p1 leave block `layer` as in the corrupted run
        return torch.cat([out, rep(self.block_inputs[layer + 1][:, p1 + 1 :])], dim=1)

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
                x = self._local_block(layer, n_copies, p0, p1)
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


def _partial(fn: Callable, **kw):
    def wrapped(act, hook):
        return fn(act, hook, **kw)

    return wrapped


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


