"""Steering vectors as parameters: one fp32 tensor per hook point.

A :class:`SteeringVectors` module holds one trainable ``nn.Parameter`` per hook point, shaped like the
hook's activation after ``[batch, pos]``: ``[d_model]`` on the residual stream, ``[n_heads, d_head]``
at ``attn.hook_z`` (a per-head vector), ``[d_mlp]`` at ``mlp.hook_post`` (see
:meth:`steer_lens.hook_sites.HookSite.trailing_shape`). Its :meth:`~SteeringVectors.delta` says what
is added to the activation at a hook; subclasses (registered with
:func:`~steer_lens.vectors.registry.register_kind`) change the parameterisation, e.g. a low-rank set
shared across layers or a token-wise gate, while the wrapper, training loops and analyses stay the
same. Files: :mod:`steer_lens.vectors.io`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steer_lens.errors import ConfigError, IncompatibleVectorError, NonFiniteError, ShapeMismatchError
from steer_lens.vectors.registry import register_kind

__all__ = ["SteeringVectors", "param_key"]


def param_key(hook_name: str) -> str:
    """The ``nn.ParameterDict`` key of a hook's parameter (keys may not contain ``"."``)."""
    return hook_name.replace(".", "__")


@register_kind
class SteeringVectors(nn.Module):
    """One fp32 steering vector per hook point: ``act[b, t] += scale * v[hook]``.

    Args:
        hook_names: the hook points, e.g. ``["blocks.1.hook_resid_pre"]``.
        d_model: width of the residual stream (the shape of every vector unless ``shapes`` says
            otherwise).
        init: ``"zeros"`` (default), ``"random"`` (Gaussian direction with norm ``init_norm``), a
            tensor used for every hook, or a mapping hook name -> tensor; each of the hook's shape.
        init_norm: norm of a random init (required with ``init="random"``), in activation units.
        seed: seed of a random init.
        shapes: per hook, the vector's shape when it is not ``[d_model]``: the hook's trailing shape
            (``HookSite.trailing_shape``), e.g. ``{"blocks.0.attn.hook_z": (n_heads, d_head)}`` for a
            per-head vector. Hooks not in it are ``[d_model]``.

    Raises:
        ConfigError: empty or duplicated ``hook_names``, unknown ``init``, bad ``init_norm``,
            ``shapes`` naming a hook not in ``hook_names``.
        ShapeMismatchError: an init tensor does not have the hook's shape.
        NonFiniteError: an init tensor holds NaN/inf.
    """

    kind: ClassVar[str] = "vectors"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        init_norm: float | None = None,
        seed: int | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        hook_names = tuple(hook_names)
        if not hook_names:
            raise ConfigError("hook_names: expected at least one hook point, got none.")
        if len(set(hook_names)) != len(hook_names):
            raise ConfigError(f"hook_names: each hook may appear once, got {list(hook_names)}.")
        extra = sorted(set(shapes or {}) - set(hook_names))
        if extra:
            raise ConfigError(f"shapes: names hooks {extra} that are not in hook_names {list(hook_names)}.")
        self.hook_names = hook_names
        self.d_model = int(d_model)
        self.shapes: dict[str, tuple[int, ...]] = {
            h: tuple(int(n) for n in (shapes or {}).get(h, (self.d_model,))) for h in hook_names
        }
        values = self._initial_values(init, init_norm, seed)
        self.params = nn.ParameterDict({param_key(h): nn.Parameter(values[h]) for h in hook_names})

    # -- construction -------------------------------------------------------------------------
    def _initial_values(self, init, init_norm, seed) -> dict[str, Tensor]:
        if isinstance(init, str):
            if init == "zeros":
                return {h: torch.zeros(self.shapes[h]) for h in self.hook_names}
            if init == "random":
                if init_norm is None or not math.isfinite(init_norm) or init_norm <= 0:
                    raise ConfigError(
                        f"init_norm: init='random' needs a positive finite norm, got {init_norm!r}. "
                        "Fix: pass e.g. init_norm=1.0 (residual-stream units)."
                    )
                gen = torch.Generator().manual_seed(0 if seed is None else seed)
                out = {}
                for h in self.hook_names:
                    v = torch.randn(self.shapes[h], generator=gen)
                    out[h] = v / v.norm() * init_norm
                return out
            raise ConfigError(
                f"init: expected 'zeros', 'random', a tensor [d_model] or a dict of them, got {init!r}."
            )
        if isinstance(init, Tensor):
            return {h: self._checked(h, init) for h in self.hook_names}
        if isinstance(init, Mapping):
            missing = [h for h in self.hook_names if h not in init]
            extra = [h for h in init if h not in self.hook_names]
            if missing or extra:
                raise ConfigError(
                    f"init: the dict's keys must be the hook names; missing {missing}, unexpected {extra}."
                )
            return {h: self._checked(h, init[h]) for h in self.hook_names}
        raise ConfigError(f"init: expected str, Tensor or dict, got {type(init).__name__}.")

    def _checked(self, hook: str, value: Tensor) -> Tensor:
        value = torch.as_tensor(value).detach()
        shape = self.shapes[hook]
        if tuple(value.shape) != shape:
            what = f"[d_model]=[{self.d_model}]" if shape == (self.d_model,) else f"{list(shape)}"
            raise ShapeMismatchError(
                f"vector for {hook!r}: expected shape {what}, got {list(value.shape)}."
            )
        if value.is_complex() or value.dtype == torch.bool or value.is_meta:
            what = "on the meta device" if value.is_meta else f"of dtype {value.dtype}"
            raise ConfigError(
                f"vector for {hook!r}: expected a real floating-point tensor, got one {what}. Fix: pass "
                "real values on a real device (e.g. tensor.real.float() if the imaginary part is meant to be 0)."
            )
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"vector for {hook!r} holds NaN or inf; give finite values.")
        return value.to(torch.float32).clone()

    @property
    def is_residual_width(self) -> bool:
        """Whether every vector is ``[d_model]`` (what the residual-stream analyses need)."""
        return all(s == (self.d_model,) for s in self.shapes.values())

    def require_residual_width(self, what: str) -> None:
        """Raise unless every vector is ``[d_model]``.

        Raises:
            ShapeMismatchError: some vector has another shape (e.g. a per-head vector); ``what``
                names the analysis that needs ``[d_model]``.
        """
        other = {h: list(s) for h, s in self.shapes.items() if s != (self.d_model,)}
        if other:
            raise ShapeMismatchError(
                f"{what} needs vectors of shape [d_model]={self.d_model}; these hooks hold other shapes: "
                f"{other}. Fix: use residual-stream hooks (hook_resid_pre/mid/post, attn_out, mlp_out)."
            )

    # -- access -------------------------------------------------------------------------------
    def __getitem__(self, hook_name: str) -> nn.Parameter:
        try:
            return self.params[param_key(hook_name)]
        except KeyError:
            raise KeyError(f"no vector at {hook_name!r}; vectors are at {list(self.hook_names)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.hook_names)

    def __len__(self) -> int:
        return len(self.hook_names)

    def __contains__(self, hook_name: object) -> bool:
        return hook_name in self.hook_names

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """``(hook_name, vector)`` pairs; the vector is what :meth:`direction` returns."""
        for h in self.hook_names:
            yield h, self.direction(h)

    def direction(self, hook_name: str) -> Float[Tensor, "*vector_shape"]:
        """The vector written at ``hook_name`` (for gated kinds: before the per-token gate)."""
        return self[hook_name]

    def as_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of every hook's vector, ``{hook_name: [*shape]}`` (``[d_model]`` on the stream)."""
        return {h: self.direction(h).detach().cpu().clone() for h in self.hook_names}

    def norms(self) -> dict[str, float]:
        """L2 norm of each hook's vector (residual-stream units)."""
        return {h: float(self.direction(h).detach().norm()) for h in self.hook_names}

    def delta(
        self, hook_name: str, act: Float[Tensor, "batch pos *vector_shape"]
    ) -> Float[Tensor, "..."]:
        """What is added at ``hook_name`` for activation ``act``, in fp32, broadcastable to ``act``.

        The plain kind ignores ``act`` and returns the vector (``[d_model]``, or the hook's trailing
        shape, e.g. ``[n_heads, d_head]``); gated kinds return ``[batch, pos, d_model]``.
        """
        return self[hook_name]

    def set_(self, hook_name: str, value: Tensor) -> None:
        """Overwrite one vector in place (no autograd), checking shape and finiteness."""
        checked = self._checked(hook_name, value)
        with torch.no_grad():
            self[hook_name].copy_(checked.to(self[hook_name].device))

    def clamp_norm_(self, max_norm: float) -> None:
        """Project each vector onto the ball of radius ``max_norm`` (in place, no autograd)."""
        with torch.no_grad():
            for h in self.hook_names:
                p = self[h]
                n = p.norm()
                p.mul_(torch.clamp(max_norm / (n + 1e-12), max=1.0))

    def lr_groups(self, resid_rms: Mapping[str, float] | None) -> list[tuple[list[nn.Parameter], float]]:
        """Parameter groups and their learning-rate scale for the training loop.

        With ``resid_rms`` (relative learning rates) each hook's vector is scaled by that hook's
        typical residual RMS; with ``None`` every scale is 1. Subclasses with other parameters
        override this.
        """
        return [([self[h]], 1.0 if resid_rms is None else float(resid_rms[h])) for h in self.hook_names]

    # -- persistence --------------------------------------------------------------------------
    def kind_config(self) -> dict[str, Any]:
        """Constructor arguments beyond hook names and d_model (saved in the JSON config).

        The plain kind records ``shapes`` only when some vector is not ``[d_model]``.
        """
        if self.is_residual_width:
            return {}
        return {"shapes": {h: list(s) for h, s in self.shapes.items() if s != (self.d_model,)}}

    def tensors(self) -> dict[str, Tensor]:
        """The tensors to save, by stable names (hook names for the plain kind)."""
        return {h: self[h].detach().cpu().contiguous() for h in self.hook_names}

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`tensors`: copy saved values in (shapes checked).

        Raises:
            IncompatibleVectorError: a tensor is missing or has the wrong shape.
        """
        own = self.tensors()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise IncompatibleVectorError(f"saved vectors lack tensors {missing}.")
        with torch.no_grad():
            for name, cur in own.items():
                val = tensors[name]
                if val.shape != cur.shape:
                    raise IncompatibleVectorError(
                        f"saved tensor {name!r} has shape {list(val.shape)}, expected {list(cur.shape)}."
                    )
                self._param_for(name).copy_(val.to(torch.float32))

    def _param_for(self, tensor_name: str) -> Tensor:
        return self[tensor_name]

    @classmethod
    def from_config(cls, hook_names: list[str], d_model: int, kind_config: Mapping[str, Any]):
        """Build an (uninitialised-values) instance from saved config fields (``kind_config()``)."""
        return cls(hook_names, d_model, **dict(kind_config))
