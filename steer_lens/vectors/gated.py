"""Token-wise gated steering vectors: a vector per hook scaled per token by a learned gate.

:class:`GatedVectors` - *token-wise adaptive scaling*: at hook ``h`` the model adds ``g_t · v_h``
where the scalar gate ``g_t = 2 · sigmoid(w_h · x̂_t + b_h)`` (or ``1 + w_h · x̂_t`` for
``gate="linear"``, a rank-1 read-out) is computed from the unsteered activation ``x_t`` normalised to
unit length (``x̂_t = x_t / ||x_t||``), so the gate's scale does not depend on the hook's residual
norm. ``w = 0, b = 0`` at init: the gate is exactly 1 and the vector acts like a plain one.
Registered as kind ``"gated"``. The gates per token are read by
:func:`steer_lens.analysis.gate_values`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steer_lens.errors import ConfigError
from steer_lens.vectors.base import SteeringVectors, param_key
from steer_lens.vectors.registry import register_kind

__all__ = ["GatedVectors"]


# ---------------------------------------------------------------------------------------------------
@register_kind
class GatedVectors(SteeringVectors):
    """A vector per hook scaled per token by a learned gate read from the activation.

    At hook ``h`` the model adds ``g_t · v_h`` with ``x̂_t = x_t / ||x_t||`` and

    * ``gate="sigmoid"`` (default): ``g_t = 2 · sigmoid(w_h · x̂_t + b_h)`` in ``(0, 2)``;
    * ``gate="linear"``: ``g_t = 1 + w_h · x̂_t + b_h`` (a rank-1 read-out, unbounded).

    ``w_h = 0`` and ``b_h = 0`` at init, so ``g_t = 1``: the module starts as the plain vectors.
    The gate reads the activation *before* the vector is added (the one the base model would have,
    given the earlier hooks' vectors).

    Args:
        hook_names: the hook points.
        d_model: residual width.
        init: initial vectors ``v_h``, as for :class:`~steer_lens.vectors.SteeringVectors`.
        init_norm: norm of a random init.
        seed: seed of a random init.
        gate: ``"sigmoid"`` or ``"linear"``.

    Raises:
        ConfigError: unknown ``gate`` (and as :class:`~steer_lens.vectors.SteeringVectors`).
    """

    kind: ClassVar[str] = "gated"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        gate: Literal["sigmoid", "linear"] = "sigmoid",
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        init_norm: float | None = None,
        seed: int | None = None,
    ) -> None:
        if gate not in ("sigmoid", "linear"):
            raise ConfigError(f"gate: expected 'sigmoid' or 'linear', got {gate!r}.")
        super().__init__(hook_names, d_model, init=init, init_norm=init_norm, seed=seed)
        self.gate = gate
        self.gate_w = nn.ParameterDict({param_key(h): nn.Parameter(torch.zeros(d_model)) for h in self.hook_names})
        self.gate_b = nn.ParameterDict({param_key(h): nn.Parameter(torch.zeros(())) for h in self.hook_names})
        self._record: dict[str, Tensor] | None = None

    def gate_of(
        self, hook_name: str, act: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos"]:
        """The gate ``g_t`` per token for activation ``act`` at ``hook_name`` (fp32, differentiable)."""
        x = act.float()
        u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        z = u @ self.gate_w[param_key(hook_name)] + self.gate_b[param_key(hook_name)]
        return 2.0 * torch.sigmoid(z) if self.gate == "sigmoid" else 1.0 + z

    def delta(
        self, hook_name: str, act: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``g_t · v_h`` per token, ``[batch, pos, d_model]`` in fp32."""
        g = self.gate_of(hook_name, act)
        if self._record is not None:
            self._record[hook_name] = g.detach()
        return g[..., None] * self[hook_name]

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Tensor]]:
        """Context manager: record the gates of the calls inside it, ``{hook: [batch, pos]}`` (last call)."""
        prev = self._record
        self._record = {}
        try:
            yield self._record
        finally:
            self._record = prev

    def lr_groups(self, resid_rms: Mapping[str, float] | None) -> list[tuple[list[nn.Parameter], float]]:
        """``v_h`` at ``rms_h`` as plain vectors; the gate (``w_h``, ``b_h``, unitless) at 1."""
        groups = super().lr_groups(resid_rms)
        gates = [p for h in self.hook_names for p in (self.gate_w[param_key(h)], self.gate_b[param_key(h)])]
        return [*groups, (gates, 1.0)]

    def kind_config(self) -> dict[str, Any]:
        """``{"gate": "sigmoid" | "linear"}``."""
        return {"gate": self.gate}

    def tensors(self) -> dict[str, Tensor]:
        """``<hook>`` (the vector) and ``gate_w.<hook>`` ``[d_model]``; ``gate_b.<hook>`` (scalar)."""
        out = super().tensors()
        for h in self.hook_names:
            out[f"gate_w.{h}"] = self.gate_w[param_key(h)].detach().cpu().contiguous()
            out[f"gate_b.{h}"] = self.gate_b[param_key(h)].detach().cpu().contiguous()
        return out

    def _param_for(self, tensor_name: str) -> Tensor:
        if tensor_name.startswith("gate_w."):
            return self.gate_w[param_key(tensor_name.removeprefix("gate_w."))]
        if tensor_name.startswith("gate_b."):
            return self.gate_b[param_key(tensor_name.removeprefix("gate_b."))]
        return self[tensor_name]
