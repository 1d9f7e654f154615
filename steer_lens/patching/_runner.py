"""The runner of the patching sweep: forward passes of the stacked corrupted batch that start at a block.

:class:`_Runner` starts each pass at the patched block from the corrupted run's cached block input
and computes only the positions a site can change (and, for last-position metrics, in the last block
only the query). :func:`steer_lens.patching._sweep._sweep` drives it; see
:mod:`steer_lens.patching.activation` for the method and its references.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from steer_lens.patching._last_query import _bind, _Deferred, _LastBlock, _rep
from steer_lens.patching.strategy import Strategy


# ---------------------------------------------------------------------------------------------------
# the runner: forward passes that may start at a block
# ---------------------------------------------------------------------------------------------------
class _Runner:
    """Runs the corrupted batch (repeated) from block ``l`` with hooks, sharing the unchanged prefix.

    * ``prefix``: start at block ``l`` from the corrupted run's input to that block.
    * ``last_only``: the metric reads the last position only: unembed it alone.
    * ``suffix``: a site at position ``p`` cannot change positions ``< p`` (causal attention), so
      blocks ``>= l`` run on positions ``>= p0`` only, attending to the corrupted run's keys and values
      of the earlier positions through a frozen key/value cache; without ``last_only`` the logits of
      positions ``< p0`` are the corrupted run's (:meth:`_with_prefix`).
    * ``p1`` (in :meth:`run`): sites local to their position run block ``l`` on ``p0..p1`` only.
    * ``last`` (the ``"last_query"`` strategy, with ``suffix``): a :class:`_LastBlock`; the last block computes the query, attention
      output and MLP of the last position only; for the earlier positions it computes just the keys
      and values (``hook_resid_pre`` -> ``ln1`` -> ``attn.calculate_qkv_matrices``, TransformerLens's
      own modules and hooks), and the last position attends to them through a key/value cache. Passes
      of sites before the last block go into one such call together (:meth:`flush`).
    """

    def __init__(self, model, tokens: Tensor, hooks: list, *, strategy: Strategy, last_only: bool = False) -> None:
        self.model = model
        self.tokens = tokens
        self.hooks = hooks
        self.prefix = strategy.prefix
        self.last_only = last_only and self.prefix
        self.suffix = self.prefix and strategy.suffix
        self.corrupted_logits: Tensor | None = None  # suffix passes of a whole-logits metric: positions < p0
        self.block_inputs: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.attention_mask: Tensor | None = None
        self.patches: dict[str, Callable] | None = None  # set inside `session`
        # the last block on the last position's query only (composed, not inherited)
        self.last = _LastBlock(self) if self.suffix and self.last_only and strategy.last_query else None

    @property
    def last_query(self) -> bool:
        """Whether the last block runs the last position's query only (the ``"last_query"`` strategy)."""
        return self.last is not None

    def flush(self) -> None:
        """Run the pending last-block calls (``"last_query"``; nothing otherwise)."""
        if self.last is not None:
            self.last.flush()

    def run_captures(self, layers, rows: slice, stop: int, keys_values: bool) -> tuple[list, list]:
        """Hooks that record the corrupted run (``rows`` of the pass) for blocks below ``stop``: the
        input of each block in ``layers`` and of the next ones (to go *first*: the raw input), and with
        ``keys_values`` the keys/values of blocks ``min(layers)..stop-1`` (to go *last*: what attention
        used; keys as attention caches them, after the q/k norm where the model has one: Qwen3, Gemma 3
        and OLMo 2 apply it after ``hook_k``). Returns (first hooks, last hooks)."""

        def save(act, hook, store, layer):
            store[layer] = act[rows].detach()

        def save_keys(act, hook, layer, attn, norm):
            k = act[rows].detach()
            self.keys[layer] = k if norm is None else attn._apply_qk_norm(k, norm)

        wanted = sorted(i for i in set(layers) | {i + 1 for i in layers} if i < stop)
        first = [(f"blocks.{i}.hook_resid_pre", _bind(save, store=self.block_inputs, layer=i)) for i in wanted]
        last = []
        qk_norm = getattr(self.model.cfg, "use_qk_norm", False)
        for i in range(min(layers), stop) if keys_values else ():
            attn = self.model.blocks[i].attn
            norm = getattr(attn, "k_norm", None) if qk_norm else None
            last.append((f"blocks.{i}.attn.hook_k", _bind(save_keys, layer=i, attn=attn, norm=norm)))
            last.append((f"blocks.{i}.attn.hook_v", _bind(save, store=self.values, layer=i)))
        return first, last

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
            n_layers = int(self.model.cfg.n_layers)
            capture, after = self.run_captures(layers, slice(b, None), n_layers, keys_values=self.suffix)
            self.attention_mask = self.padding_mask()

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
        if self.suffix and not self.last_only:
            self.corrupted_logits = out[b:]
        return out[b:], (None if clean is None else out[:b]), clean_acts

    def padding_mask(self) -> Tensor | None:
        """The attention mask TransformerLens builds for the corrupted tokens (None without left
        padding, as ``HookedTransformer.input_to_embed`` decides; that call embeds the tokens too)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or getattr(tokenizer, "padding_side", None) != "left":
            return None
        return self.model.input_to_embed(self.tokens)[3]

    def unembed(self, resid: Tensor, columns: Tensor | None = None) -> Tensor:
        """Logits ``[rows, 1, d_vocab]`` (or ``[rows, 1, n_columns]``) of final residuals, under the hooks."""
        if self.patches is not None:  # inside `session`: the hooks are installed already
            self.patches.clear()
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
            self.patches = patches
            try:
                yield
            finally:
                self.patches = None

    def hooked(self, hooks: list):
        """The hooks of one pass: set on the session's dispatcher, or installed for the call."""
        if self.patches is None:
            return self.model.hooks(fwd_hooks=list(self.hooks) + hooks)
        self.patches.clear()
        self.patches.update(dict(hooks))
        return nullcontext()

    def cache(self, layer: int, n_copies: int, p0: int, stop: int | None = None):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        def rep(t: Tensor) -> Tensor:
            return _rep(t[:, :p0], n_copies)

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
        if self.last is not None:
            return self.last.run_to_last(layer, n_copies, hooks, p0, p1)
        if p1 is not None and self.local_ok(layer, p1):
            return self._run_local(layer, n_copies, hooks, p0, p1)
        with self.hooked(hooks):
            if not self.prefix:
                return self.model(self.tokens.repeat(n_copies, 1))
            x = self.block_inputs[layer]
            mask = self.attention_mask
            cache = None
            if p0 > 0:
                cache = self.cache(layer, n_copies, p0)
                x = x[:, p0:]
            if mask is not None:  # the full mask (with p0 > 0: cached positions and the suffix)
                mask = _rep(mask, n_copies)
            x = _rep(x, n_copies)
            if not self.last_only:
                logits = self.model(x, start_at_layer=layer, attention_mask=mask, past_kv_cache=cache)
                return self._with_prefix(logits, n_copies, p0)
            resid = self.model(
                x, start_at_layer=layer, stop_at_layer=n_layers, attention_mask=mask, past_kv_cache=cache
            )
            return resid[:, -1:]  # final norm and unembedding later, for all passes at once (`unembed`)

    def local_ok(self, layer: int, p1: int) -> bool:
        """Whether :meth:`run` with ``p1`` takes the position-local path."""
        return self.suffix and layer + 1 < int(self.model.cfg.n_layers) and p1 + 1 < self.tokens.shape[1]

    def _run_local(self, layer: int, n_copies: int, hooks: list, p0: int, p1: int) -> Tensor:
        """:meth:`run` for sites local to their position: block ``layer`` on positions ``p0..p1`` only."""

        mask = self.attention_mask
        with self.hooked(hooks):
            x = self.local_block(layer, n_copies, p0, p1)
            out = self.model(
                x,
                start_at_layer=layer + 1,
                stop_at_layer=int(self.model.cfg.n_layers) if self.last_only else None,
                attention_mask=None if mask is None else _rep(mask, n_copies),
                past_kv_cache=self.cache(layer + 1, n_copies, p0) if p0 > 0 else None,
            )
        return out[:, -1:] if self.last_only else self._with_prefix(out, n_copies, p0)

    def _with_prefix(self, logits: Tensor, n_copies: int, p0: int) -> Tensor:
        """Logits of every position: the corrupted run's for positions ``< p0`` (a patch at ``p0`` or
        later cannot reach them), then the pass's ``logits`` ``[n_copies * batch, T - p0, d_vocab]``."""
        if p0 == 0:
            return logits
        return torch.cat([_rep(self.corrupted_logits[:, :p0], n_copies).to(logits.dtype), logits], dim=1)

    def local_block(self, layer: int, n_copies: int, p0: int, p1: int) -> Tensor:
        """Block ``layer`` on positions ``p0..p1`` only (under the current hooks): the input of block
        ``layer + 1`` for positions ``p0..T-1`` (after ``p1``: the corrupted run's)."""

        mask = self.attention_mask
        out = self.model(
            _rep(self.block_inputs[layer][:, p0 : p1 + 1], n_copies),
            start_at_layer=layer,
            stop_at_layer=layer + 1,
            attention_mask=None if mask is None else _rep(mask[:, : p1 + 1], n_copies),
            past_kv_cache=self.cache(layer, n_copies, p0, stop=layer + 1) if p0 > 0 else None,
        )
        # positions after p1 leave block `layer` as in the corrupted run
        return torch.cat([out, _rep(self.block_inputs[layer + 1][:, p1 + 1 :], n_copies)], dim=1)


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


