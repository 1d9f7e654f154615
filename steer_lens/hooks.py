"""Hook plumbing of the steered model: which positions a forward pass covers, and probing hook shapes.

:func:`hook_shapes` runs a two-token probe to read the activation shape at each hook (used to size
each vector by the hook's trailing shape). :class:`PositionContext` tells the steering hooks the
absolute positions of the current forward pass (offset while decoding, where the prompt ends) and
builds the position mask.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from torch.overrides import TorchFunctionMode

from steer_lens._utils import device_of
from steer_lens.errors import HookNameError
from steer_lens.hook_sites import HookSite
from steer_lens.models import check_hook_names

__all__ = ["PositionContext", "PositionSpec", "acting_for", "acting_thread", "frozen_parameters", "hook_shapes", "shared_weights",
           "vector_shapes"]

PositionSpec = str | Tensor  # "all", "prompt", "generated" or a bool mask (checked at run time)


def hook_shapes(model, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the activations at ``hook_names`` for a 2-token input (batch 1, pos 2).

    Used to size a steering vector by its hook's trailing shape (``[d_model]``, ``[n_heads, d_head]``)
    before steering it.

    Raises:
        HookNameError: a name is not a hook point of the model.
    """
    check_hook_names(model, list(hook_names))
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(act, hook):
            shapes[name] = tuple(act.shape)  # keyed by the name asked for (a bridge's alias too)

        return record

    device = device_of(model)
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(h, recorder(h)) for h in hook_names], return_type=None)
    return shapes


_ACTING = threading.local()


@contextlib.contextmanager
def acting_for(thread_id: int) -> Iterator[None]:
    """Context manager: in the calling thread, hooks confined to thread ``thread_id`` act as they do there.

    The steering hooks act only in the thread that installed them; the backward recomputation of
    :mod:`steer_lens.train.recompute` may run on torch's autograd device thread (CUDA), not the
    forward's, and replays the forward's hooks inside this context.
    """
    prev = getattr(_ACTING, "owner", None)
    _ACTING.owner = thread_id
    try:
        yield
    finally:
        _ACTING.owner = prev


def acting_thread() -> int:
    """The thread the calling one acts for: ``threading.get_ident()``, or ``thread_id`` inside :func:`acting_for`."""
    owner = getattr(_ACTING, "owner", None)
    return threading.get_ident() if owner is None else owner


_FROZEN_LOCK = threading.Lock()
_FROZEN: dict[int, tuple[int, list]] = {}  # id(model) -> (depth, parameters that had requires_grad=True)


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Context manager: the model's parameters have ``requires_grad=False`` inside it, restored after.

    Gradients then reach only what is not the model's (steering vectors), and the user's model keeps
    the flags it had: parameters that required gradients before do so again on exit, also on an
    exception or an interrupt. Nested and concurrent uses on one model share one freeze (the last
    to leave restores).
    """
    key = id(model)
    with _FROZEN_LOCK:
        depth, thawed = _FROZEN.get(key, (0, []))
        if depth == 0:
            thawed = [p for p in model.parameters() if p.requires_grad]
            for p in thawed:
                p.requires_grad_(False)
        _FROZEN[key] = (depth + 1, thawed)
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            depth, thawed = _FROZEN[key]
            if depth == 1:
                del _FROZEN[key]
                for p in thawed:
                    p.requires_grad_(True)
            else:
                _FROZEN[key] = (depth - 1, thawed)


class _SharedWeights(TorchFunctionMode):
    """``Tensor.contiguous`` on the plain transpose of a 2-D parameter of a model returns that transpose."""

    def __init__(self, model) -> None:
        super().__init__()
        self._storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.ndim == 2}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is Tensor.contiguous and not kwargs and len(args) == 1 and self._is_transpose(args[0]):
            return args[0]
        return func(*args, **(kwargs or {}))

    def _is_transpose(self, t: Tensor) -> bool:
        base = t._base
        return (base is not None and t.ndim == 2 and base.ndim == 2 and t.shape == base.shape[::-1]
                and t.stride() == base.stride()[::-1] and t.data_ptr() == base.data_ptr()
                and base.untyped_storage().data_ptr() in self._storages)


@contextlib.contextmanager
def shared_weights(model) -> Iterator[None]:
    """Context manager: TransformerLens's linear maps use the model's weights without copying them.

    TransformerLens 3.x's gated MLP and unembedding compute ``F.linear(x, W.T.contiguous())``
    (``transformer_lens/components/mlps/gated_mlp.py`` L58-76, ``components/unembed.py`` L39; the copy
    matches Hugging Face's bf16 accumulation order). Every forward thus copies ``W_gate``, ``W_in``,
    ``W_out`` and ``W_U``, and in a training forward autograd keeps each copy for the backward (the
    activation gradient needs the weight): on SmolLM2-135M that is 402 MiB held per step whatever the
    batch, more than the activations of a small batch. Inside this context (a
    ``torch.overrides.TorchFunctionMode``), ``.contiguous()`` on the plain transpose of one of
    ``model``'s 2-D parameters returns the transpose itself: ``F.linear`` takes it as it is, nothing
    is copied, and autograd keeps a view of the parameter. Values are unchanged up to the matmul's
    accumulation order (bit-identical in fp32 on CPU, measured); any other ``contiguous`` call, and
    every other function, runs as usual. The steered training forwards run under it
    (:meth:`~steer_lens.SteeredTransformer.forward` while gradients are recorded). Figures:
    ``docs/benchmarks/lora.md`` (P4). Inference loops (generation, patching sweeps) use
    :func:`steer_lens.models.matmul_layout` instead, which also avoids the attention weights'
    rearranging copies but holds a second copy of the weights while it is active (this context holds
    none; the attention's copies, about a fifth of the total on SmolLM2-135M, remain in training).
    """
    with _SharedWeights(model):
        yield


@dataclass
class PositionContext:
    """The absolute positions a forward pass covers, for the steering hooks' position masks.

    Attributes:
        offset: absolute position of the pass's first input token (``> 0`` while decoding with a
            key/value cache).
        prompt_end: ``[batch]`` absolute index where each sequence's prompt ends (``None``: all prompt).
        tokens: ``[batch, pos]`` the token ids of this pass when the caller knows them (``None``
            otherwise), for vector kinds that select by token (:class:`~steer_lens.vectors.SelectedVectors`).
    """

    offset: int = 0
    prompt_end: Tensor | None = None
    tokens: Tensor | None = None
    _mask_cache: dict = field(default_factory=dict)

    def mask(self, positions: PositionSpec, batch: int, pos: int, device) -> Float[Tensor, "batch pos"] | None:
        """The 0/1 mask ``[batch, pos]`` of the steered positions of this pass (``None``: all of them).

        An explicit mask given for ``b`` sequences is repeated when the pass's batch holds several
        copies of those sequences (``batch = k * b``, copy ``k`` in rows ``k*b .. k*b+b-1``), as
        ``Tensor.repeat`` would; it broadcasts like any tensor otherwise.
        """
        if isinstance(positions, str) and positions == "all":
            return None
        key = (batch, pos, self.offset)
        if key in self._mask_cache:
            return self._mask_cache[key]
        abs_pos = torch.arange(self.offset, self.offset + pos, device=device)
        if isinstance(positions, Tensor):
            m = positions.to(device)
            if m.ndim == 1:
                m = m[None]
            full = torch.zeros(m.shape[0], self.offset + pos, dtype=torch.bool, device=device)
            n = min(m.shape[1], self.offset + pos)
            full[:, :n] = m[:, :n]
            out = full[:, self.offset :]
            if out.shape[0] not in (1, batch):
                if batch % out.shape[0] != 0:
                    from steer_lens.errors import ConfigError

                    raise ConfigError(
                        f"positions: the explicit mask has {out.shape[0]} rows but this call runs {batch} "
                        "sequences. Fix: give one row per sequence, one row for all ([pos] or [1, pos]), or "
                        "a number of rows that divides the batch (repeated copies of the same sequences)."
                    )
                out = out.repeat(batch // out.shape[0], 1)
            out = out.expand(batch, pos)
        else:
            end = self.prompt_end
            if end is None:
                end = torch.full((batch,), 1 << 30, device=device)
            end = end.to(device)
            in_prompt = abs_pos[None, :] < end[:, None]
            out = in_prompt if positions == "prompt" else ~in_prompt
        out = out.to(torch.float32)
        self._mask_cache[key] = out
        return out


def vector_shapes(model, hooks: list[str]) -> dict[str, tuple[int, ...]]:
    """Each hook's vector shape: the activation's trailing shape after ``[batch, pos]``.

    Known hook kinds (:class:`~steer_lens.hook_sites.HookSite`) are checked against the probe's shape;
    a name outside the grammar must carry ``[batch, pos, d_model]``.

    Raises:
        HookNameError: not a hook of the model, an attention-pattern hook (no per-position vector),
            or a shape the hook's kind does not explain.
    """
    probed = hook_shapes(model, hooks)
    silent = [h for h in hooks if h not in probed]
    if silent:
        raise HookNameError(
            f"hooks {silent} exist but never fire for this model (e.g. hook_attn_in / hook_q_input need "
            "cfg.use_attn_in / use_split_qkv_input, hook_mlp_in needs cfg.use_hook_mlp_in): a vector there "
            "would do nothing. Fix: enable them with model.set_use_attn_in(True) / "
            "set_use_split_qkv_input(True) / set_use_hook_mlp_in(True), or use hook_resid_pre / hook_resid_mid."
        )
    d_model = int(model.cfg.d_model)
    out: dict[str, tuple[int, ...]] = {}
    for h, shp in probed.items():
        try:
            site = HookSite.parse(h)
            expected = site.trailing_shape(model.cfg) if site.kind not in ("pattern", "attn_scores") else None
        except HookNameError:
            expected = (d_model,)
        if expected is None or len(shp) < 3 or tuple(shp[:2]) != (1, 2) or tuple(shp[2:]) != expected:
            raise HookNameError(
                f"hook {h!r} has activations of shape {list(shp)} (for batch 1, pos 2); a steering vector "
                "needs [batch, pos, *shape] with the hook's own shape: [d_model] on the residual stream "
                "(hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out), [n_heads, d_head] at "
                "attn.hook_z / hook_q, [d_mlp] at mlp.hook_post. Attention patterns cannot be steered."
            )
        out[h] = tuple(shp[2:])
    return out
