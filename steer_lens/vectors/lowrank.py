"""Low-rank steering vectors: the vectors of all hooks share a rank-``r`` basis.

:class:`LowRankVectors` - ``V = A · B`` with ``A [n_hooks, r]`` per-hook coefficients and
``B [r, d_model]`` a shared basis (unit-norm rows at init), as in the low-rank variant of "Steering
LLM Reasoning Through Bias-Only Adaptation" (Sinii et al. 2025). ``A`` starts at zero and ``B``
random, as LoRA starts ``B = 0``, so the initial vectors are zero and both factors get gradients
after the first step. Registered as kind ``"lowrank"``; plugs into
:class:`~steer_lens.SteeredTransformer` (``vectors=...``), SFT, RL, the analyses and save / load.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steer_lens.errors import ConfigError
from steer_lens.vectors.base import SteeringVectors, param_key
from steer_lens.vectors.registry import register_kind

__all__ = ["LowRankVectors"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
@register_kind
class LowRankVectors(SteeringVectors):
    """Vectors of all hooks in one rank-``r`` subspace: ``v_h = A[h] · B`` (Bias-Only adaptation, low rank).

    Args:
        hook_names: the hook points.
        d_model: residual width.
        rank: number of shared basis vectors ``r`` (``1 <= r <= d_model``).
        init: ``"zeros"`` (default: ``A = 0``, ``B`` random orthonormal rows), or a mapping
            hook -> vector ``[d_model]`` / a tensor ``[d_model]``: then ``B`` is the top-``r`` right
            singular vectors of the stacked vectors and ``A`` their coordinates (exact when
            ``rank >= n_hooks``; otherwise the best rank-``r`` approximation).
        seed: seed of the random basis.

    Raises:
        ConfigError: bad ``rank`` or ``init`` (and as :class:`~steer_lens.vectors.SteeringVectors`).
        ShapeMismatchError, NonFiniteError: a bad init tensor.
    """

    kind: ClassVar[str] = "lowrank"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        rank: int = 4,
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        seed: int | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= int(d_model):
            raise ConfigError(f"rank: expected an int in [1, d_model={d_model}], got {rank!r}.")
        if isinstance(init, str) and init != "zeros":
            raise ConfigError(
                f"init: LowRankVectors takes 'zeros', a tensor [d_model] or a dict of them, got {init!r}."
            )
        super().__init__(hook_names, d_model, init=init if not isinstance(init, str) else "zeros")
        values = torch.stack([self.params[param_key(h)].detach() for h in self.hook_names])  # [n, d]
        del self.params
        self.rank = rank
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        q, _ = torch.linalg.qr(torch.randn(d_model, rank, generator=gen))
        basis = q.T.contiguous()  # [r, d], orthonormal rows
        coef = torch.zeros(len(self.hook_names), rank)
        if bool(values.abs().sum() > 0):
            _, _, vh = torch.linalg.svd(values, full_matrices=False)
            k = min(rank, vh.shape[0])
            basis[:k] = vh[:k]
            coef = values @ basis.T
        self.basis = nn.Parameter(basis)
        self.coef = nn.ParameterDict(
            {param_key(h): nn.Parameter(coef[i].clone()) for i, h in enumerate(self.hook_names)}
        )

    def __getitem__(self, hook_name: str) -> Tensor:
        return self.direction(hook_name)

    def direction(self, hook_name: str) -> Float[Tensor, " d_model"]:
        """``A[h] · B``: the vector at ``hook_name`` (differentiable in both factors)."""
        try:
            a = self.coef[param_key(hook_name)]
        except KeyError:
            raise KeyError(f"no vector at {hook_name!r}; vectors are at {list(self.hook_names)}") from None
        return a @ self.basis

    def delta(self, hook_name: str, act: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, " d_model"]:
        """The vector ``A[h] · B`` (independent of the activation)."""
        return self.direction(hook_name)

    def set_(self, hook_name: str, value: Tensor) -> None:
        """Set ``A[h]`` to the coordinates of ``value`` in the basis (its projection onto the span of ``B``).

        A warning is logged when ``value`` is not in the span (more than 0.1% of its norm is lost).
        """
        value = self._checked(hook_name, value).to(self.basis.device)
        with torch.no_grad():
            pinv = torch.linalg.pinv(self.basis)  # [d, r]
            a = value @ pinv
            lost = (value - a @ self.basis).norm() / (value.norm() + 1e-12)
            if lost > 1e-3:
                logger.warning("set_(%s): %.1f%% of the vector's norm lies outside the rank-%d basis",
                               hook_name, 100 * float(lost), self.rank)
            self.coef[param_key(hook_name)].copy_(a)

    def clamp_norm_(self, max_norm: float) -> None:
        """Scale each ``A[h]`` so that ``||A[h] · B|| <= max_norm`` (in place, no autograd)."""
        with torch.no_grad():
            for h in self.hook_names:
                n = self.direction(h).norm()
                self.coef[param_key(h)].mul_(torch.clamp(max_norm / (n + 1e-12), max=1.0))

    def lr_groups(self, resid_rms: Mapping[str, float] | None) -> list[tuple[list[nn.Parameter], float]]:
        """``A[h]`` at ``rms_h · sqrt(d_model / rank)`` (one coordinate step moves ``v_h`` by about the
        same norm as a plain vector's step), ``B`` at ``1 / sqrt(d_model)`` (its unit-norm rows have
        coordinates of that size). All 1 with ``resid_rms=None``.
        """
        if resid_rms is None:
            return [([self.coef[param_key(h)]], 1.0) for h in self.hook_names] + [([self.basis], 1.0)]
        d, r = self.d_model, self.rank
        groups = [([self.coef[param_key(h)]], float(resid_rms[h]) * math.sqrt(d / r)) for h in self.hook_names]
        return [*groups, ([self.basis], 1.0 / math.sqrt(d))]

    def kind_config(self) -> dict[str, Any]:
        """``{"rank": r}``."""
        return {"rank": self.rank}

    def tensors(self) -> dict[str, Tensor]:
        """``lowrank.basis`` ``[r, d_model]`` and ``lowrank.coef.<hook>`` ``[r]``."""
        out = {"lowrank.basis": self.basis.detach().cpu().contiguous()}
        for h in self.hook_names:
            out[f"lowrank.coef.{h}"] = self.coef[param_key(h)].detach().cpu().contiguous()
        return out

    def _param_for(self, tensor_name: str) -> Tensor:
        if tensor_name == "lowrank.basis":
            return self.basis
        return self.coef[param_key(tensor_name.removeprefix("lowrank.coef."))]

    def vectors_matrix(self) -> Float[Tensor, "n_hooks d_model"]:
        """All vectors stacked, ``A · B`` (detached, CPU)."""
        return torch.stack([self.direction(h).detach().cpu() for h in self.hook_names])
