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
uses it. ``mode="selective"`` keeps the blocks' matrix-product outputs as well and reruns only their
element-wise ops (less memory saved, less work rerun; see :func:`recompute_blocks`).

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
import functools
import inspect
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from steer_lens.errors import ConfigError
from steer_lens.hooks import acting_for, shared_weights

__all__ = ["MODES", "HeldMemory", "first_vector_block", "recompute_blocks", "recompute_context", "valid_recompute"]

MODES = ("full", "selective")
# ``"selective"`` keeps the outputs of these ops (the matrix products: projections, attention scores,
# pattern @ values, the MLP's and the unembedding-free block's every linear map) and recomputes the rest
_SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)

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
def recompute_blocks(steered_or_model, from_block: int | None = None, mode: str = "full") -> Iterator[None]:
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
        mode: ``"full"``: a block keeps only its input residual and reruns its whole forward in the
            backward pass (about one more forward per step). ``"selective"``: selective activation
            checkpointing (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
            Transformer Models", Sec. 4; torch's ``create_selective_checkpoint_contexts``): the outputs
            of the matrix products (``aten.mm``/``addmm``/``bmm``/``baddbmm``, fused attention) are kept
            and only the other ops (norms, rotary, masking, softmax, activation functions, hook points,
            the steering additions) are rerun: most of the memory of a TransformerLens block is those
            element-wise intermediates, and rerunning them costs a fraction of a forward.

    Raises:
        ConfigError: ``from_block`` outside ``[0, n_layers]``, ``mode`` not in :data:`MODES`, a model without ``blocks``, blocks whose
            ``forward`` is already replaced (a nested use), and, inside the context, a block called
            with a key/value cache entry or ``run_with_cache`` on the model.
    """
    steered = steered_or_model if hasattr(steered_or_model, "hook_names") else None
    model = steered.model if steered is not None else steered_or_model
    blocks = _blocks(model)
    start = _start(steered, len(blocks), from_block)
    if mode not in MODES:
        raise ConfigError(f"recompute_blocks: mode must be one of {MODES}, got {mode!r}.")
    todo = list(blocks)[start:]
    if any("forward" in vars(b) for b in todo) or "run_with_cache" in vars(model):
        raise ConfigError("recompute_blocks: the model's blocks already have a replaced forward (a nested "
                          "recompute_blocks, or another patch). Fix: enter recompute_blocks once.")
    try:
        for block in todo:
            block.forward = _checkpointed(block, block.forward, steered, mode)
        model.run_with_cache = _refuse_cache
        yield
    finally:
        for block in todo:
            vars(block).pop("forward", None)
        vars(model).pop("run_with_cache", None)


def valid_recompute(value: Any) -> bool:
    """Whether ``value`` is a valid ``recompute`` setting of a config: ``False``, ``True`` (= ``"full"``),
    ``"full"`` or ``"selective"`` (see :func:`recompute_blocks`)."""
    return isinstance(value, bool) or (isinstance(value, str) and value in MODES)


def recompute_context(steered, recompute: bool | str) -> contextlib.AbstractContextManager:
    """The context a training forward runs in for a config's ``recompute`` setting.

    ``False``: none (``contextlib.nullcontext``); ``True`` or ``"full"``: :func:`recompute_blocks` with
    ``mode="full"``; ``"selective"``: with ``mode="selective"``.

    Raises:
        ConfigError: a setting :func:`valid_recompute` refuses.
    """
    if not valid_recompute(recompute):
        raise ConfigError(f"recompute: expected False, True, 'full' or 'selective', got {recompute!r}.")
    if recompute is False:
        return contextlib.nullcontext()
    return recompute_blocks(steered, mode="full" if recompute is True else recompute)


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


def _save_matmuls(ctx, op, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The ``"selective"`` policy: keep the outputs of the matrix products, rerun everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(block: nn.Module, forward, steered, mode: str = "full"):
    """``block``'s ``forward`` under non-reentrant checkpointing, the recomputation under a snapshot."""
    signature = inspect.signature(forward)
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)} \
        if mode == "selective" else {}

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

        return checkpoint(run, resid_pre, use_reentrant=False, **extra)

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
                                           else contextlib.nullcontext()), \
                    (shared_weights(self.steered.model) if self.grad else contextlib.nullcontext()):
                yield  # the forward's ops again: a training forward of the wrapper copies no weights
        finally:
            for m, h in zip(self.modules, live, strict=True):
                for k, v in h.items():
                    setattr(m, k, v)
            for p, f in flags:
                p.requires_grad_(f)
            if self.steered is not None:
                self.steered.position_context = ctx


class HeldMemory(TorchDispatchMode):
    """Context manager: the bytes of the tensors created inside it that are still alive when it exits.

    Around a training forward (up to the loss, before ``backward``) that is the memory the step holds
    for its backward pass: the activations autograd saved (or, under :func:`recompute_blocks`, what
    the checkpoints keep) plus the outputs still referenced. Storages of ``model``'s parameters and
    buffers (and views of them) are not counted, nor is any storage twice. Deterministic, unlike the
    process's resident memory, and the same on every device; it does not see the transient peak
    inside the backward pass. Method: a ``TorchDispatchMode`` records a weak reference
    (``StorageWeakRef``) to the storage of every op's output; :attr:`bytes` sums those alive.

    Example::

        with HeldMemory(model) as held:
            loss = loss_fn(steered(tokens))
        held_mib = held.bytes / 2**20  # MiB held for the backward

    Args:
        model: the ``nn.Module`` whose parameters and buffers are not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self._refs: list[tuple[StorageWeakRef, int]] = []
        self.bytes: int = 0  # set on exit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._skip:
                    self._refs.append((StorageWeakRef(storage), storage.nbytes()))
        return out

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        alive = {ref.cdata: n for ref, n in self._refs if not ref.expired()}
        self.bytes = sum(alive.values())
        self._refs.clear()
