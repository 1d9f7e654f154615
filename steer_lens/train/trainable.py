"""What the shared training loop optimises: a :class:`Trainable` (steering vectors, or a LoRA's A/B).

:func:`~steer_lens.train.loop.run_loop` never touches a model directly: it asks a :class:`Trainable`
for AdamW parameter groups, snapshots and restores its weights (the NaN guard), logs its norms, and
writes / reads its weights in a checkpoint folder. :class:`VectorTrainable` wraps a
:class:`~steer_lens.SteeredTransformer` (the vectors only; the model stays frozen);
:class:`steer_lens.lora.train.PeftTrainable` wraps a peft model's trainable LoRA parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steer_lens.errors import IncompatibleVectorError
from steer_lens.vectors.io import atomic_save_safetensors, load_safetensors

__all__ = ["ParamTrainable", "Trainable", "VectorTrainable", "as_trainable"]


class Trainable:
    """The interface of what :func:`~steer_lens.train.loop.run_loop` trains (subclass and override).

    Attributes:
        device: where the parameters live (optimiser state is moved there on resume).
        kind: what the weights are, for messages (``"vectors"``, ``"LoRA parameters"``).
    """

    device: torch.device
    kind: str = "weights"

    def param_groups(self, lr: float, resid_rms: dict[str, float] | None) -> list[dict[str, Any]]:
        """AdamW parameter groups ``{"params", "lr", "initial_lr"}``; ``resid_rms`` is ``None`` for absolute lrs."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Tensor]:
        """A detached copy of the trainable weights (the NaN guard's last good state)."""
        raise NotImplementedError

    def restore(self, snapshot: dict[str, Tensor]) -> None:
        """Load a :meth:`snapshot` back."""
        raise NotImplementedError

    def norms(self) -> dict[str, float]:
        """Norms logged per step as ``norm/<name>`` (``{}``: none)."""
        return {}

    def clamp_norm_(self, max_norm: float) -> None:
        """Project the weights onto the ball of radius ``max_norm`` (``OptimConfig.max_norm``)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """JSON-ready description saved in a checkpoint's ``state.json``, compared on resume."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write the weights into a checkpoint folder."""
        raise NotImplementedError

    def load(self, folder: Path, state: dict[str, Any], where: Path) -> None:
        """Read the weights of checkpoint folder ``folder`` (``state``: its ``state.json``).

        Raises:
            IncompatibleVectorError: the checkpoint was made for other weights.
        """
        raise NotImplementedError

    def record(self, training_config: dict[str, Any]) -> None:
        """Keep the run's config once training ends (a SteeredTransformer's ``training_config``)."""


class VectorTrainable(Trainable):
    """The vectors of a :class:`~steer_lens.SteeredTransformer` (per-hook relative learning rates).

    Checkpoint weights: ``<step folder>/vectors/`` as written by ``SteeredTransformer.save``.
    """

    kind = "vectors"

    def __init__(self, steered: Any) -> None:
        self.steered = steered
        self.vectors = steered.vectors
        self.device = steered.device

    def param_groups(self, lr: float, resid_rms: dict[str, float] | None) -> list[dict[str, Any]]:
        """One group per vector group of ``vectors.lr_groups``; lr scaled by its residual RMS when relative."""
        groups = []
        for params, rms_scale in self.vectors.lr_groups(resid_rms):
            group_lr = lr * (rms_scale if resid_rms is not None else 1.0)
            groups.append({"params": params, "lr": group_lr, "initial_lr": group_lr})
        return groups

    def snapshot(self) -> dict[str, Tensor]:
        """A detached copy of the vectors' state dict."""
        return {k: v.detach().clone() for k, v in self.vectors.state_dict().items()}

    def restore(self, snapshot: dict[str, Tensor]) -> None:
        """Load a snapshot into the vectors."""
        self.vectors.load_state_dict(snapshot)

    def norms(self) -> dict[str, float]:
        """Each hook's vector norm (residual units)."""
        return self.vectors.norms()

    def clamp_norm_(self, max_norm: float) -> None:
        """Project each vector onto the ball of radius ``max_norm``."""
        self.vectors.clamp_norm_(max_norm)

    def identity(self) -> dict[str, Any]:
        """``{"hook_names": [...]}``."""
        return {"hook_names": list(self.steered.hook_names)}

    def save(self, folder: Path) -> None:
        """``folder/vectors/`` (loadable with ``SteeredTransformer.load``)."""
        self.steered.save(folder / "vectors")

    def load(self, folder: Path, state: dict[str, Any], where: Path) -> None:
        """Read ``folder/vectors/vectors.safetensors``.

        Raises:
            IncompatibleVectorError: the checkpoint steers other hooks.
        """
        if state["hook_names"] != list(self.steered.hook_names):
            raise IncompatibleVectorError(
                f"checkpoint in {str(where)!r} is for hooks {state['hook_names']}; this run steers "
                f"{list(self.steered.hook_names)}. Fix: use another checkpoint_dir or resume=False."
            )
        self.vectors.load_tensors(load_safetensors(folder / "vectors" / "vectors.safetensors"))

    def record(self, training_config: dict[str, Any]) -> None:
        """Set ``steered.training_config`` (saved with the vectors)."""
        self.steered.training_config = training_config


class ParamTrainable(Trainable):
    """Named parameters of any module (absolute learning rate, one AdamW group), e.g. a LoRA's A and B.

    Checkpoint weights: ``<step folder>/parameters.safetensors``, keyed by parameter name.

    Args:
        named_parameters: ``(name, parameter)`` pairs to train.
        kind: what they are, for messages (``"LoRA parameters"``).
    """

    def __init__(self, named_parameters: list[tuple[str, torch.nn.Parameter]], kind: str = "parameters") -> None:
        self.named = list(named_parameters)
        self.kind = kind
        self.device = self.named[0][1].device if self.named else torch.device("cpu")

    def param_groups(self, lr: float, resid_rms: dict[str, float] | None) -> list[dict[str, Any]]:
        """One group with every parameter at ``lr`` (``resid_rms`` is ignored)."""
        return [{"params": [p for _, p in self.named], "lr": lr, "initial_lr": lr}]

    def snapshot(self) -> dict[str, Tensor]:
        """Detached copies of the parameters."""
        return {n: p.detach().clone() for n, p in self.named}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, Tensor]) -> None:
        """Copy a snapshot back into the parameters."""
        for n, p in self.named:
            p.copy_(snapshot[n])

    def clamp_norm_(self, max_norm: float) -> None:
        """Not defined for arbitrary parameters.

        Raises:
            NotImplementedError: always (configs reject ``max_norm`` for these).
        """
        raise NotImplementedError(f"max_norm is not defined for {self.kind}")

    def identity(self) -> dict[str, Any]:
        """``{"parameters": [names]}``."""
        return {"parameters": [n for n, _ in self.named]}

    def save(self, folder: Path) -> None:
        """``folder/parameters.safetensors``."""
        atomic_save_safetensors(folder / "parameters.safetensors",
                                {n: p.detach().contiguous() for n, p in self.named})

    def load(self, folder: Path, state: dict[str, Any], where: Path) -> None:
        """Read ``folder/parameters.safetensors``.

        Raises:
            IncompatibleVectorError: the checkpoint holds other parameters.
        """
        names = [n for n, _ in self.named]
        if state.get("parameters") != names:
            raise IncompatibleVectorError(
                f"checkpoint in {str(where)!r} is for {self.kind} {state.get('parameters')}; this run "
                f"trains {names}. Fix: use another checkpoint_dir or resume=False."
            )
        self.restore(load_safetensors(folder / "parameters.safetensors"))


def as_trainable(obj: Any) -> Trainable:
    """``obj`` if it is a :class:`Trainable`, else a :class:`VectorTrainable` of the SteeredTransformer ``obj``."""
    return obj if isinstance(obj, Trainable) else VectorTrainable(obj)
