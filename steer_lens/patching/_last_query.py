"""The last block of a last-position sweep, on the last position's query only.

A last-position metric needs the last block's output at the last position only; the other positions
matter there only through the keys and values they put in the block's attention. So the patching
passes stop *before* the last block and leave a :class:`_Entry`: the last block's input, and either
the keys/values it will attend to (computed by the pass) or nothing (computed in :meth:`flush`). A
flush then runs the last block for all pending entries together: one key/value computation
(``hook_resid_pre`` -> ``ln1`` -> ``attn.calculate_qkv_matrices``, TransformerLens's own modules and
hooks) for the positions ``0..T-2`` of the entries that need it, and one call of the block on the
last position alone, attending to those keys/values through a frozen key/value cache.

Sites *in* the last block are entries too: their patch is applied inside these two calls, to their
rows only (:func:`_patch_rows`). In the *fused* mode (clean and corrupted runs with the same hooks and
shape) the patch source is the clean rows of the same call, so a sweep needs no clean activations of
the last block at all, and the sites of block 0 go into the clean/corrupted run itself
(:meth:`_LastBlock.fused_run`): their patch reads the clean rows at the hook as the pass computes it.
See :mod:`steer_lens.patching.activation` for the method and its references.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(eq=False)
class _Deferred:
    """The final residual ``[rows, 1, d_model]`` of a pass whose last block runs later (in a flush)."""

    value: Tensor | None = None


@dataclass(eq=False)
class _Tiled:
    """``k`` copies of another row set's final residual (e.g. the corrupted run's, for sites that
    cannot reach the last position)."""

    src: Tensor | _Deferred
    k: int


@dataclass(eq=False)
class _Entry:
    """Rows waiting for the last block.

    ``x``: the last block's input, ``[rows, T, d_model]`` when ``keys`` is None and ``derive`` empty
    (the flush computes keys/values for positions ``0..T-2``), else ``[rows, 1, d_model]`` with
    ``keys``/``values`` ``[rows, T-1, ...]`` given or derived by the flush. With ``mask`` the rows are ``n`` stacked copies of the batch, patched
    at the last block's hook: ``mask(shape)`` is the bool site mask ``[n, 1, *shape[1:]]`` for an
    activation of (full-position) ``shape``; the source is ``src`` (a clean activation over all
    positions) or, if None, the clean rows of the same call.
    """

    x: Tensor
    deferred: _Deferred | None
    keys: Tensor | None = None
    values: Tensor | None = None
    n: int = 0
    mask: Callable[[tuple[int, ...]], Tensor] | None = None
    src: Tensor | None = None
    pos_dim: int = 1
    name: str = ""  # the hook the patch acts at
    clean: bool = False  # these rows are the clean run (the in-call patch source)
    corrupted: bool = False  # these rows are the corrupted run
    # how the flush gets the keys/values of a last-block site's rows without computing them (``x`` is
    # then the last position only): "corrupted" (the patch acts after them), "resid" (the patch
    # replaces whole positions of the block input: the clean rows' keys/values there), "k" / "v" (the
    # patch acts on them: patched from the clean rows'); "" computes them
    derive: str = ""
    _masks: dict = field(default_factory=dict)

    def full_mask(self, shape: tuple[int, ...]) -> Tensor:
        """The site mask for an activation of ``shape`` (all positions; cached per shape)."""
        key = tuple(shape[1:])  # the row count does not enter the mask
        if key not in self._masks:
            self._masks[key] = self.mask(tuple(shape))
        return self._masks[key]


def _patch_rows(act: Tensor, segments: list[tuple[int, _Entry]], clean_at: int | None, batch: int,
                n_pos: int, window: tuple[int, int] | None) -> Tensor:
    """``act`` with the rows of each patched entry (at its row offset) patched from its source.

    ``window`` (start, length): the positions of the full sequence (``n_pos`` long) the call computes;
    masks and captured sources are narrowed to it. Rows outside the segments are left as they are.
    """
    parts, at = [], 0
    for offset, e in segments:
        rows = e.n * batch
        full = list(act.shape)
        full[e.pos_dim] = n_pos
        m = e.full_mask(tuple(full))
        if e.src is None:
            src = act[clean_at : clean_at + batch]
        else:
            src = e.src
            if window is not None:
                src = src.narrow(e.pos_dim, *window)
        if window is not None and m.shape[e.pos_dim + 1] == n_pos:  # (1: sites over all positions)
            m = m.narrow(e.pos_dim + 1, *window)
        a = act[offset : offset + rows]
        patched = torch.where(m, src[None].to(act.dtype), a.view(e.n, batch, *a.shape[1:]))
        parts += [act[at:offset], patched.view(a.shape)]
        at = offset + rows
    parts.append(act[at:])
    return torch.cat(parts)


class _LastBlock:
    """The last-query part of a :class:`steer_lens.patching._runner._Runner` (composed into it for the
    ``"last_query"`` strategy; see the module): pending entries and the merged last-block calls."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.model = runner.model
        self.tokens = runner.tokens
        self.hooks = runner.hooks
        self.keys = runner.keys  # shared with the runner: the corrupted run's keys/values per block
        self.values = runner.values
        self.block_inputs = runner.block_inputs
        self._pending: list[_Entry] = []
        self._pending_bytes = 0
        self.flush_bytes = 1 << 28
        self._clean_in: Tensor | None = None  # fused mode: the clean rows' last-block input

    def _last(self) -> int:
        return int(self.model.cfg.n_layers) - 1

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The last block's keys and values of block inputs ``x`` (as ``TransformerBlock.forward`` up to
        the key/value cache: same modules, same hooks)."""
        block = self.model.blocks[self._last()]
        resid = block.hook_resid_pre(x)
        _, k, v = block.attn.calculate_qkv_matrices(block.ln1(resid), block.ln1(resid), block.ln1(resid))
        return k, v

    def _defer(self, entry: _Entry) -> None:
        self._pending.append(entry)
        nbytes = entry.x.numel() + (0 if entry.keys is None else entry.keys.numel() + entry.values.numel())
        if entry.derive:  # the keys/values the flush makes for it
            cfg = self.model.cfg
            kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
            nbytes += 2 * entry.x.shape[0] * (self.tokens.shape[1] - 1) * kv_heads * cfg.d_head
        self._pending_bytes += nbytes * entry.x.element_size()
        if self._pending_bytes > self.flush_bytes:
            self.flush()

    # -- the passes ---------------------------------------------------------------------------------
    def fused_run(
        self,
        layers,
        clean: Tensor,
        clean_names,
        first: tuple[str, int, Callable, int] | None = None,
    ) -> tuple[_Deferred, _Deferred, dict[str, Tensor], _Deferred | None]:
        """The clean and corrupted runs in one pass up to the last block, with the copies of ``first``
        = (hook name, n copies, mask, position dim) — sites of block 0 — patched in the same pass from
        the clean rows. Records the corrupted run's block inputs (and keys/values for suffix caches,
        also the last block's) and the clean activations at ``clean_names`` (before the last block).

        Returns (clean, corrupted, clean activations, first's copies) with deferred final residuals.
        """
        last = self._last()
        b = clean.shape[0]
        n0 = 0 if first is None else first[1]
        clean_acts: dict[str, Tensor] = {}

        def save_clean(act, hook):
            clean_acts[hook.name] = act[:b].detach()

        capture, after = self.runner.run_captures(layers, slice(b, 2 * b), last, keys_values=True)
        after += [(n, save_clean) for n in clean_names if not n.startswith(f"blocks.{last}.")]
        patch = []
        if first is not None:
            name, n0, mask, pos_dim = first
            e = _Entry(x=clean, deferred=None, n=n0, mask=mask, pos_dim=pos_dim, name=name)
            n_pos = self.tokens.shape[1]
            patch = [(name, lambda act, hook: _patch_rows(act, [(2 * b, e)], 0, b, n_pos, None))]
        tokens = torch.cat([clean, self.tokens, _rep(self.tokens, n0)])
        self.runner.attention_mask = self.runner.padding_mask()
        with self.model.hooks(fwd_hooks=capture + list(self.hooks) + patch + after):
            y = self.model(tokens, stop_at_layer=last)  # the last block's input, every row
            corrupted_in = y[b : 2 * b]
        self.block_inputs[last] = corrupted_in
        out = [_Deferred(), _Deferred(), _Deferred() if n0 else None]
        self._defer(_Entry(x=y[:b], deferred=out[0], clean=True))
        self._defer(_Entry(x=corrupted_in, deferred=out[1], corrupted=True))
        if n0:
            self._defer(_Entry(x=y[2 * b :], deferred=out[2]))
        self._clean_in = y[:b]
        return out[0], out[1], clean_acts, out[2]

    def run_to_last(self, layer: int, n_copies: int, hooks: list, p0: int, p1: int | None) -> _Deferred:
        """A pass of sites before the last block: blocks ``layer..last-1`` on positions ``>= p0`` and
        the last block's keys/values; the query waits for :meth:`flush`."""
        last = self._last()
        mask = self.runner.attention_mask
        with self.runner.hooked(hooks):
            if p1 is not None and self.runner.local_ok(layer, p1):  # block `layer` on positions p0..p1 only
                x = self.runner.local_block(layer, n_copies, p0, p1)
                start = layer + 1
            else:
                x = _rep(self.block_inputs[layer][:, p0:], n_copies)
                start = layer
            if start < last:
                x = self.model(
                    x,
                    start_at_layer=start,
                    stop_at_layer=last,
                    attention_mask=None if mask is None else _rep(mask, n_copies),
                    past_kv_cache=self.runner.cache(start, n_copies, p0, stop=last) if p0 > 0 else None,
                )
            keys, values = self._last_keys_values(x, n_copies, p0)
        deferred = _Deferred()
        self._defer(_Entry(x=x[:, -1:], deferred=deferred, keys=keys, values=values))
        return deferred

    def defer_last(
        self,
        name: str,
        n_copies: int,
        mask: Callable,
        src: Tensor | None,
        pos_dim: int,
        p0: int,
        derive: str = "",
    ) -> _Deferred:
        """Sites in the last block (their earliest position ``p0``): ``n_copies`` of the corrupted
        batch, patched inside the flush's calls from ``src`` (None: the clean rows of the call).

        ``derive`` (see :class:`_Entry`): how the flush may get these rows' keys/values from the clean
        and corrupted rows instead of computing them; sites at the last position only change the query.
        """
        corrupted_in = self.block_inputs[self._last()]
        if p0 >= self.tokens.shape[1] - 1:  # only the query is patched: the corrupted keys/values
            derive = "corrupted"
        if derive not in ("", "corrupted") and src is not None:
            derive = ""  # from the clean rows of the call only (fused mode)
        x = corrupted_in[:, -1:] if derive else corrupted_in
        deferred = _Deferred()
        self._defer(
            _Entry(
                x=_rep(x, n_copies),
                deferred=deferred,
                n=n_copies,
                mask=mask,
                src=src,
                pos_dim=pos_dim,
                name=name,
                derive=derive,
            )
        )
        return deferred

    def _derived_keys_values(
        self, e: _Entry, clean_kv: tuple[Tensor, Tensor] | None, corrupted_kv: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Keys/values ``[rows, T-1, kv_heads, d_head]`` of a derived entry's rows (see :class:`_Entry`):
        the corrupted run's, with the patched positions (or heads) taken from the clean run's. Exact
        because ``ln1``, the projections and whatever acts after ``hook_k`` / ``hook_v`` before the
        cache (e.g. a q/k norm) work on each position on its own."""
        k_x, v_x = corrupted_kv
        if e.derive == "corrupted":
            return _rep(k_x, e.n), _rep(v_x, e.n)
        k_c, v_c = clean_kv
        b, t = k_x.shape[0], k_x.shape[1] + 1
        if e.derive == "resid":  # mask [n, 1, T or 1, 1] over the block input -> every key/value element
            m = e.full_mask((b, t, int(self.model.cfg.d_model)))
            m = m[..., None]  # [n, 1, T or 1, 1, 1]
            patch_k = patch_v = True
        else:  # mask over the key (value) activation [b, T, kv_heads, d_head]
            m = e.full_mask((b, t, *k_x.shape[2:]))
            patch_k, patch_v = e.derive == "k", e.derive == "v"
        if m.shape[2] == t:
            m = m[:, :, : t - 1]

        def mix(clean: Tensor, corrupted: Tensor, patched: bool) -> Tensor:
            if not patched:
                return _rep(corrupted, e.n)
            out = torch.where(m, clean[None], corrupted[None])  # [n, b, T-1, kv_heads, d_head]
            return out.reshape(e.n * b, *corrupted.shape[1:])

        return mix(k_c, k_x, patch_k), mix(v_c, v_x, patch_v)

    def _corrupted_keys_values(self) -> None:
        """The corrupted run's keys/values of the last block (the run's hooks only: a pass's patch
        that may be set on the session's dispatcher is put aside meanwhile)."""
        last = self._last()
        saved = None if self.runner.patches is None else dict(self.runner.patches)
        context = self.model.hooks(fwd_hooks=list(self.hooks)) if saved is None else nullcontext()
        if saved is not None:
            self.runner.patches.clear()
        try:
            with context:
                self.keys[last], self.values[last] = self._qkv(self.block_inputs[last][:, :-1])
        finally:
            if saved is not None:
                self.runner.patches.update(saved)

    def _last_keys_values(self, x: Tensor, n_copies: int, p0: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the last block for positions ``0..T-2``: the corrupted run's before
        ``p0``, computed from the block input ``x`` (positions ``p0..T-1``) for ``p0..T-2``."""
        last = self._last()
        if last not in self.keys:  # fused mode: the corrupted run's, computed on first use
            self._corrupted_keys_values()
        prefix_k = _rep(self.keys[last][:, :p0], n_copies)
        prefix_v = _rep(self.values[last][:, :p0], n_copies)
        if x.shape[1] < 2:
            return prefix_k, prefix_v
        k, v = self._qkv(x[:, :-1])
        return torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1)

    def _last_position(self, x: Tensor, keys: Tensor, values: Tensor, n_copies: int) -> Tensor:
        """The last block at the last position only (input ``x`` ``[rows, 1, d_model]``), attending to
        ``keys``/``values`` of positions ``0..T-2``: the final residual ``[rows, 1, d_model]``."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        n_layers = int(self.model.cfg.n_layers)
        mask = self.runner.attention_mask
        if mask is None:
            mask = torch.ones(self.tokens.shape, dtype=torch.long, device=self.tokens.device)
        mask = _rep(mask, n_copies)
        entries = [None] * (n_layers - 1) + [
            TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
        ]
        cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask[:, :-1], frozen=True)
        return self.model(
            x,
            start_at_layer=n_layers - 1,
            stop_at_layer=n_layers,
            attention_mask=None if self.runner.attention_mask is None else mask,
            past_kv_cache=cache,
        )

    def flush(self) -> None:
        """Run the last block for every pending entry: one key/value call for the entries given in
        full, one single-query call for all, with the patches of last-block sites applied to their
        rows. Derived entries (see :class:`_Entry`) take their keys/values from the clean and corrupted
        rows of the key/value call (or the corrupted run's, once known)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        b, n_pos = self.tokens.shape[0], self.tokens.shape[1]
        last = self._last()
        full = [e for e in pending if e.keys is None and not e.derive]
        derived = [e for e in pending if e.derive]
        ready = [e for e in pending if e.keys is not None]
        if any(e.mask is not None and e.src is None for e in pending) and not any(e.clean for e in full):
            full.insert(0, _Entry(x=self._clean_in, deferred=None, clean=True))  # the patch source
        if derived and last not in self.keys and not any(e.corrupted for e in full):
            full.append(_Entry(x=self.block_inputs[last], deferred=None, corrupted=True))
        rows = full + derived + ready
        offsets, at = [], 0
        for e in rows:
            offsets.append(at)
            at += e.x.shape[0]
        clean_at = next((o for o, e in zip(offsets, rows, strict=True) if e.clean), None)
        segments = [(o, e) for o, e in zip(offsets, rows, strict=True) if e.mask is not None]

        def hooks(window, n_rows):  # the patches of the entries among the call's first n_rows rows
            out = []
            for name in dict.fromkeys(e.name for _, e in segments):
                segs = [(o, e) for o, e in segments if o < n_rows and e.name == name]
                if segs:
                    out.append((name, lambda act, hook, s=segs: _patch_rows(act, s, clean_at, b, n_pos, window)))
            return out

        keys, values = [], []
        if full:
            x_full = torch.cat([e.x for e in full])
            with self.runner.hooked(hooks((0, n_pos - 1), x_full.shape[0])):
                k, v = self._qkv(x_full[:, :-1])
            keys.append(k)
            values.append(v)
            corrupted_at = next((o for o, e in zip(offsets, full, strict=False) if e.corrupted), None)
            if corrupted_at is not None and last not in self.keys:  # the corrupted run's, for later use
                self.keys[last] = k[corrupted_at : corrupted_at + b].clone()  # not a view of the whole call
                self.values[last] = v[corrupted_at : corrupted_at + b].clone()
        if derived:
            clean_kv = None if clean_at is None else (k[clean_at : clean_at + b], v[clean_at : clean_at + b])
            for e in derived:
                corrupted_kv = (self.keys[last][:, : n_pos - 1], self.values[last][:, : n_pos - 1])
                e_k, e_v = self._derived_keys_values(e, clean_kv, corrupted_kv)
                keys.append(e_k)
                values.append(e_v)
        keys += [e.keys for e in ready]
        values += [e.values for e in ready]
        x = torch.cat([e.x[:, -1:] for e in full] + [e.x for e in derived + ready])
        with self.runner.hooked(hooks((n_pos - 1, 1), x.shape[0])):
            out = self._last_position(x, torch.cat(keys), torch.cat(values), x.shape[0] // b)
        for o, e in zip(offsets, rows, strict=True):
            if e.deferred is not None:
                e.deferred.value = out[o : o + e.x.shape[0]]


def _resolve(runner, rows: list) -> list[Tensor]:
    """``rows`` with every :class:`_Deferred` / :class:`_Tiled` replaced by its tensor (flushing the
    runner first)."""
    runner.flush()

    def value(r):
        if isinstance(r, _Tiled):
            return value(r.src).repeat(r.k, 1, 1)
        return r.value if isinstance(r, _Deferred) else r

    return [value(r) for r in rows]


def _rep(t: Tensor, n: int) -> Tensor:
    """``n`` copies of ``t`` stacked along the batch dimension."""
    return t.repeat(n, *[1] * (t.ndim - 1))


def _bind(fn: Callable, **kw):
    def wrapped(act, hook):
        return fn(act, hook, **kw)

    return wrapped
