"""Steering vectors as parameters: one fp32 vector per hook point, and their files.

A :class:`SteeringVectors` module holds one trainable ``nn.Parameter`` of shape ``[d_model]`` per hook
point. Its :meth:`~SteeringVectors.delta` says what is added to the activation at a hook; subclasses
(registered with :func:`register_kind`) change the parameterisation, e.g. a low-rank set shared
across layers or a token-wise gate, while the wrapper, training loops and analyses stay the same.

Files are safetensors plus a JSON config (never pickle), written atomically: each file goes to a
temporary name in the same folder and is moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from steer_lens.errors import ConfigError, IncompatibleVectorError, NonFiniteError, ShapeMismatchError

__all__ = [
    "SteeringVectors",
    "register_kind",
    "vector_kinds",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "read_json",
]

_KINDS: dict[str, type[SteeringVectors]] = {}


def register_kind(cls: type[SteeringVectors]) -> type[SteeringVectors]:
    """Class decorator: make a :class:`SteeringVectors` subclass loadable by its ``kind`` name."""
    _KINDS[cls.kind] = cls
    return cls


def vector_kinds() -> dict[str, type[SteeringVectors]]:
    """The registered parameterisations, by ``kind`` name (built-in extra kinds are imported first)."""
    import importlib

    try:
        importlib.import_module("steer_lens.parameterisations")
    except ModuleNotFoundError as e:  # pragma: no cover - only while the module does not exist
        if e.name != "steer_lens.parameterisations":
            raise
    return dict(_KINDS)


def _key(hook_name: str) -> str:
    # nn.ParameterDict keys may not contain "."
    return hook_name.replace(".", "__")


@register_kind
class SteeringVectors(nn.Module):
    """One fp32 steering vector per hook point: ``act[..., :] += scale * v[hook]``.

    Args:
        hook_names: the hook points, e.g. ``["blocks.1.hook_resid_pre"]``.
        d_model: width of the residual stream.
        init: ``"zeros"`` (default), ``"random"`` (Gaussian direction with norm ``init_norm``), a
            tensor ``[d_model]`` used for every hook, or a mapping hook name -> tensor ``[d_model]``.
        init_norm: norm of a random init (required with ``init="random"``), in residual units.
        seed: seed of a random init.

    Raises:
        ConfigError: empty or duplicated ``hook_names``, unknown ``init``, bad ``init_norm``.
        ShapeMismatchError: an init tensor is not ``[d_model]``.
        NonFiniteError: an init tensor holds NaN/inf.
    """

    kind: ClassVar[str] = "vectors"

    def __init__(
        self,
        hook_names: list[str] | tuple[str, ...],
        d_model: int,
        *,
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        init_norm: float | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        hook_names = tuple(hook_names)
        if not hook_names:
            raise ConfigError("hook_names: expected at least one hook point, got none.")
        if len(set(hook_names)) != len(hook_names):
            raise ConfigError(f"hook_names: each hook may appear once, got {list(hook_names)}.")
        self.hook_names = hook_names
        self.d_model = int(d_model)
        values = self._initial_values(init, init_norm, seed)
        self.params = nn.ParameterDict({_key(h): nn.Parameter(values[h]) for h in hook_names})

    # -- construction -------------------------------------------------------------------------
    def _initial_values(self, init, init_norm, seed) -> dict[str, Tensor]:
        d = self.d_model
        if isinstance(init, str):
            if init == "zeros":
                return {h: torch.zeros(d) for h in self.hook_names}
            if init == "random":
                if init_norm is None or not math.isfinite(init_norm) or init_norm <= 0:
                    raise ConfigError(
                        f"init_norm: init='random' needs a positive finite norm, got {init_norm!r}. "
                        "Fix: pass e.g. init_norm=1.0 (residual-stream units)."
                    )
                gen = torch.Generator().manual_seed(0 if seed is None else seed)
                out = {}
                for h in self.hook_names:
                    v = torch.randn(d, generator=gen)
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
        if value.shape != (self.d_model,):
            raise ShapeMismatchError(
                f"vector for {hook!r}: expected shape [d_model]=[{self.d_model}], got {list(value.shape)}."
            )
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"vector for {hook!r} holds NaN or inf; give finite values.")
        return value.to(torch.float32).clone()

    # -- access -------------------------------------------------------------------------------
    def __getitem__(self, hook_name: str) -> nn.Parameter:
        try:
            return self.params[_key(hook_name)]
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

    def direction(self, hook_name: str) -> Float[Tensor, " d_model"]:
        """The vector written at ``hook_name`` (for gated kinds: before the per-token gate)."""
        return self[hook_name]

    def as_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of every hook's vector, ``{hook_name: [d_model]}``."""
        return {h: self.direction(h).detach().cpu().clone() for h in self.hook_names}

    def norms(self) -> dict[str, float]:
        """L2 norm of each hook's vector (residual-stream units)."""
        return {h: float(self.direction(h).detach().norm()) for h in self.hook_names}

    def delta(
        self, hook_name: str, act: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "*batch_pos d_model"]:
        """What is added at ``hook_name`` for activation ``act``, in fp32, broadcastable to ``act``.

        The plain kind ignores ``act`` and returns the vector ``[d_model]``; gated kinds return
        ``[batch, pos, d_model]``.
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
        """Constructor arguments beyond hook names and d_model (saved in the JSON config)."""
        return {}

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
        """Build an (uninitialised-values) instance from saved config fields."""
        return cls(hook_names, d_model, **dict(kind_config))


# -- atomic file writes ---------------------------------------------------------------------------
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a safetensors file onto the CPU."""
    return load_file(str(path), device="cpu")
