"""Hook plumbing of the steered model: which positions a forward pass covers, and probing hook shapes.

:func:`hook_shapes` runs a two-token probe to read the activation shape at each hook (used to check that
a hook carries ``d_model``). ``_CallContext`` tells the steering hooks the absolute positions of the
current forward pass (offset while decoding, where the prompt ends) and builds the position mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from steer_lens.models import check_hook_names

__all__ = ["PositionSpec", "hook_shapes"]

PositionSpec = str | Tensor  # "all", "prompt", "generated" or a bool mask (checked at run time)


def hook_shapes(model, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the activations at ``hook_names`` for a 2-token input (batch 1, pos 2).

    Used to check that a hook carries ``d_model`` in its last dimension before steering it.

    Raises:
        HookNameError: a name is not a hook point of the model.
    """
    check_hook_names(model, list(hook_names))
    shapes: dict[str, tuple[int, ...]] = {}

    def record(act, hook):
        shapes[hook.name] = tuple(act.shape)

    device = _model_device(model)
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(h, record) for h in hook_names], return_type=None)
    return shapes


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device(model.cfg.device)


def _model_dtype(model) -> torch.dtype:
    return getattr(model.cfg, "dtype", torch.float32)


@dataclass
class _CallContext:
    offset: int = 0  # absolute position of the first input token of this forward pass
    prompt_end: Tensor | None = None  # [batch] absolute index where the prompt ends
    _mask_cache: dict = field(default_factory=dict)

    def mask(self, positions: PositionSpec, batch: int, pos: int, device) -> Tensor | None:
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
            if out.shape[0] not in (1, batch) and batch % out.shape[0] == 0:
                # stacked copies of the batch (batched patching: copy k holds rows k*b .. k*b+b-1)
                out = out.repeat(batch // out.shape[0], 1)
            out = out.expand(batch, pos)
        else:
            end = self.prompt_end
            if end is None:
                end = torch.full((batch,), 1 << 30, device=device)
            end = end.to(device)
            in_prompt = abs_pos[None, :] < end[:, None]
            out = in_prompt if positions == "prompt" else ~in_prompt
        out = out.to(torch.float32)[..., None]
        self._mask_cache[key] = out
        return out
