"""Activation recomputation (gradient checkpointing) over the blocks of a TransformerLens model.

Training a steering vector keeps, for the backward pass, every activation of every block after the
first vector (attention probabilities, MLP hidden states, norms ...): with the model's weights
frozen nothing *before* the first vector is kept, but from there on the saved activations are as
many as a full fine-tune's. :func:`recompute_blocks` runs each block from the first one holding a
vector to the last under :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``): a
block keeps only its input residual ``[batch, pos, d_model]``, and its internal activations are
recomputed, one block at a time, during the backward pass. That costs about one more forward per
step (~1.3x the step time) and brings the activation memory from ``O(n_blocks * block)`` to
``O(n_blocks * d_model + one block)``. Method: Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"; the non-reentrant variant is torch's (``torch/utils/checkpoint.py``,
``_checkpoint_without_reentrant_generator``), as transformers' ``gradient_checkpointing_enable``
uses it.

The recomputation must see the block exactly as the forward did. A steering hook reads the
wrapper's state (the position context, whether gradients are recorded) when it runs, and
TransformerLens removes its hooks when the forward returns, before the backward, and torch may run
the backward on its own device thread (CUDA), where steering hooks do not act. So at forward time
each block snapshots the forward hooks of its modules, the ``requires_grad`` flags of its parameters,
the thread and, with a :class:`~steer_lens.SteeredTransformer`, its position context and gradient
mode, and the recomputation runs under that snapshot (:func:`steer_lens.hooks.acting_for`). Deterministic hooks (ours, a user's patching hook) therefore
give the same values in the recomputation; a hook with side effects runs twice (once in the
forward, once in the backward): caching through ``run_with_cache`` is refused (:class:`ConfigError`);
do not use recording hooks of your own inside the context. Dropout's random state is replayed by torch.
Training only: a block called with a key/value cache entry (generation) raises :class:`ConfigError`;
calls without gradient (``torch.no_grad()``) run the blocks as they are.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from steer_lens.errors import ConfigError
from steer_lens.hooks import acting_for

__all__ = ["first_vector_block", "recompute_blocks"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def first_vector_block(hook_names, n_layers: int) -> int:
    """The index of the first block whose output a vector at one of ``hook_names`` changes.

    ``blocks.{l}.*`` gives ``l``; a hook before the blocks (``hook_embed``, ``hook_pos_embed``) gives 0;
    one after them (``ln_final.*``) gives ``n_layers`` (no block needs a graph).
    """
    layers = []
    for h in hook_names:
        m = _BLOCK_RE.match(h)
        layers.append(int(m.group(1)) if m else (0 if h.startswith("hook_") else n_layers))
    return min(layers, default=n_layers)


@contextlib.contextmanager
def recompute_blocks(steered_or_model, from_block: int | None = None) -> Iterator[None]:
    """Context manager: blocks ``from_block`` .. last recompute their activations in the backward pass.

    Inside it, each of those blocks' ``forward`` (an instance attribute, removed on exit, also on an
    exception) runs the original ``forward`` under ``checkpoint(..., use_reentrant=False)`` with
    every argument passed through. Blocks before ``from_block`` run as they are: with frozen weights
    and an input that needs no gradient they keep no graph anyway. Gradients are those of the plain
    forward (to float rounding: the same ops run again). See the module docstring for hooks.

    Args:
        steered_or_model: a :class:`~steer_lens.SteeredTransformer` (its hook state is replayed in
            the recomputation) or a ``HookedTransformer``.
        from_block: the first block to recompute; ``None``: the first block holding a vector
            (:func:`first_vector_block` of the wrapper's hook names), 0 for a bare model.

    Raises:
        ConfigError: ``from_block`` outside ``[0, n_layers]``, a model without ``blocks``, blocks whose
            ``forward`` is already replaced (a nested use), and, inside the context, a block called
            with a key/value cache entry or ``run_with_cache`` on the model.
    """
    steered = steered_or_model if hasattr(steered_or_model, "hook_names") else None
    model = steered.model if steered is not None else steered_or_model
    blocks = _blocks(model)
    start = _start(steered, len(blocks), from_block)
    todo = list(blocks)[start:]
    if any("forward" in vars(b) for b in todo) or "run_with_cache" in vars(model):
        raise ConfigError("recompute_blocks: the model's blocks already have a replaced forward (a nested "
                          "recompute_blocks, or another patch). Fix: enter recompute_blocks once.")
    try:
        for block in todo:
            block.forward = _checkpointed(block, block.forward, steered)
        model.run_with_cache = _refuse_cache
        yield
    finally:
        for block in todo:
            vars(block).pop("forward", None)
        vars(model).pop("run_with_cache", None)


def _blocks(model) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"recompute_blocks: expected a TransformerLens model with .blocks, got "
                          f"{type(model).__name__}. Fix: pass a HookedTransformer or a SteeredTransformer.")
    return blocks


def _start(steered, n_layers: int, from_block: int | None) -> int:
    if from_block is None:
        return first_vector_block(steered.hook_names, n_layers) if steered is not None else 0
    if isinstance(from_block, bool) or not isinstance(from_block, int) or not 0 <= from_block <= n_layers:
        raise ConfigError(f"from_block: expected an int in [0, {n_layers}], got {from_block!r}.")
    return from_block


def _refuse_cache(*args: Any, **kwargs: Any) -> Any:
    raise ConfigError("run_with_cache inside recompute_blocks: its caching hooks would run again in the "
                      "backward recomputation. Fix: call run_with_cache outside recompute_blocks "
                      "(or with SFTConfig/RLConfig recompute=False).")


def _checkpointed(block: nn.Module, forward, steered):
    """``block``'s ``forward`` under non-reentrant checkpointing, the recomputation under a snapshot."""
    signature = inspect.signature(forward)

    def wrapped(resid_pre: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = signature.bind(resid_pre, *args, **kwargs).arguments
        if bound.get("past_kv_cache_entry") is not None:
            raise ConfigError("recompute_blocks: a block was called with a key/value cache (generation). "
                              "Recomputation is for training forwards only. Fix: generate outside "
                              "recompute_blocks.")
        if not torch.is_grad_enabled():
            return forward(resid_pre, *args, **kwargs)
        snapshot = _Snapshot(block, steered)
        calls = [0]

        def run(x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:  # the forward itself: the state is the live one
                return forward(x, *args, **kwargs)
            with snapshot.restored():  # the recomputation in the backward pass
                return forward(x, *args, **kwargs)

        return checkpoint(run, resid_pre, use_reentrant=False)

    return wrapped


class _Snapshot:
    """The state a block's forward depends on beyond its arguments, taken at forward time."""

    def __init__(self, block: nn.Module, steered) -> None:
        self.modules = list(block.modules())
        self.hooks = [{k: OrderedDict(getattr(m, k)) for k in _HOOK_DICTS if hasattr(m, k)} for m in self.modules]
        self.flags = [(p, p.requires_grad) for p in block.parameters()]
        self.steered = steered
        # the steering hooks read the wrapper's position context when they run (positions, token kinds)
        self.ctx = steered.position_context if steered is not None else None
        self.grad = steered.records_gradients if steered is not None else False
        self.thread = threading.get_ident()  # the backward may run on torch's device thread (CUDA)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        live = [{k: getattr(m, k) for k in h} for m, h in zip(self.modules, self.hooks, strict=True)]
        flags = [(p, p.requires_grad) for p, _ in self.flags]
        ctx = self.steered.position_context if self.steered is not None else None
        try:
            for m, h in zip(self.modules, self.hooks, strict=True):
                for k, v in h.items():
                    setattr(m, k, OrderedDict(v))
            for p, f in self.flags:
                p.requires_grad_(f)
            if self.steered is not None:
                self.steered.position_context = self.ctx
            with acting_for(self.thread), (self.steered.gradients(self.grad) if self.steered is not None
                                           else contextlib.nullcontext()):
                yield
        finally:
            for m, h in zip(self.modules, live, strict=True):
                for k, v in h.items():
                    setattr(m, k, v)
            for p, f in flags:
                p.requires_grad_(f)
            if self.steered is not None:
                self.steered.position_context = ctx
