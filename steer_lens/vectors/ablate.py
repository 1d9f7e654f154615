"""Ablate-then-add steering vectors: remove the activation's component along ``v``, then add ``clamp · v``.

At hook ``h`` the activation becomes

    x  ←  x − (x · v̂) v̂ + clamp · v,        v̂ = v / ||v||

so every steered token carries exactly ``clamp · ||v||`` along the direction, whatever it carried
before. This is the inference-time intervention of "One-shot Optimized Steering Vectors Mediate
Safety-relevant Behaviors in LLMs" (Dunefsky & Cohan 2025): ``steering_opt.py`` builds the hook from
``make_steering_hook_tflens(vector_clamp * vector, matrix=make_abl_mat(vector))`` with
``make_abl_mat(x) = -outer(x, x) / ||x||²``, i.e. ``x + clamp·v + M x``. Registered as kind
``"ablate_add"``; plugs into :class:`~steer_lens.SteeredTransformer` (``vectors=...``), the training
loops and save / load. The wrapper's ``scale`` multiplies the whole change (ablation included) and
the position mask selects where it happens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError
from steer_lens.vectors.base import SteeringVectors
from steer_lens.vectors.registry import register_kind

__all__ = ["AblateAddVectors"]


@register_kind
class AblateAddVectors(SteeringVectors):
    """Per hook, ablate the direction ``v̂`` from the activation and add ``clamp · v`` (Dunefsky & Cohan 2025).

    Args:
        hook_names: the hook points (residual-stream width).
        d_model: residual width.
        clamp: the multiple of ``v`` every steered token ends with along ``v̂`` (the paper's
            ``vector_clamp``); ``clamp=0`` is directional ablation alone.
        init, init_norm, seed: as :class:`~steer_lens.vectors.SteeringVectors`.

    Raises:
        ConfigError: ``clamp`` is not a finite number (and as :class:`~steer_lens.vectors.SteeringVectors`).
    """

    kind: ClassVar[str] = "ablate_add"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        clamp: float = 1.0,
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        init_norm: float | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(clamp, bool) or not isinstance(clamp, int | float) or not math.isfinite(clamp):
            raise ConfigError(f"clamp: expected a finite number, got {clamp!r}.")
        super().__init__(hook_names, d_model, init=init, init_norm=init_norm, seed=seed)
        self.clamp = float(clamp)

    def delta(
        self, hook_name: str, act: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``clamp · v − (x · v) v / ||v||²`` per token, fp32 (zero where ``v = 0``)."""
        v = self[hook_name]
        x = act.float()
        coef = (x @ v) / (v @ v).clamp_min(1e-12)  # [batch, pos]
        return self.clamp * v - coef[..., None] * v

    def kind_config(self) -> dict[str, Any]:
        """``{"clamp": c}``."""
        return {"clamp": self.clamp}
