"""Training checkpoints: the trained weights, the optimiser, the RNG streams and the objective's run state.

One checkpoint is one ``step-NNNNNN/`` folder, written whole (:func:`~steer_lens.vectors.io.atomic_folder`):
the trained tensors, the AdamW state (``optimizer.safetensors`` + its JSON metadata), torch's RNG
states, the per-step history so far and, for objectives that keep state between steps (RL's rollout in
flight, PPO's reference log-probs, REINFORCE's baseline), ``run_state.safetensors`` through the
:class:`RunState` protocol. :func:`~steer_lens.train.loop.run_loop` saves and resumes with these, so an
interrupted run resumed from its last checkpoint equals an uninterrupted one bit for bit on the CPU.
Split out of :mod:`steer_lens.train.loop`, which re-exports :func:`save_checkpoint`,
:func:`load_checkpoint` and :class:`RunState`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from steer_lens.errors import IncompatibleVectorError
from steer_lens.train.trainable import Trainable
from steer_lens.vectors.io import (
    atomic_folder,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json,
)

__all__ = ["RunState", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"state.{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for name, v in meta["scalars"].items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


@runtime_checkable
class RunState(Protocol):
    """What an objective carries from step to step beyond the weights and the optimiser (optional).

    An objective whose steps depend on more than the step index, the seed and the weights (RL: the
    batch of rollouts in flight for ``ppo_epochs > 1``, REINFORCE's moving baseline) passes such an
    object to :func:`run_loop` as ``state``; it is saved with every checkpoint
    (``run_state.safetensors`` and ``state.json["run_state"]``) and loaded on ``resume=True``, so a
    resumed run equals an uninterrupted one bit for bit on the CPU.
    """

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, json_meta)`` describing the state now (tensors are saved with safetensors)."""
        ...

    def load_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        ...


def save_checkpoint(
    folder: Path, step: int, target: Trainable, opt: torch.optim.Optimizer, history: dict[str, list[float]],
    resid_rms: dict[str, float], config: dict[str, Any], state: RunState | None = None,
) -> None:
    """Write ``folder/step-NNNNNN/`` (weights, ``optimizer.safetensors``, ``state.json``), then ``latest.json``.

    Every file is written atomically and the pointer last, so an interrupted save leaves the previous
    checkpoint intact; the newest two checkpoints are kept. With ``state`` (a :class:`RunState`) its
    tensors go to ``run_state.safetensors`` and its metadata to ``state.json["run_state"]``.
    """
    sub = folder / f"step-{step:06d}"
    opt_tensors, opt_meta = _optimizer_to_files(opt)
    run_meta = None
    with atomic_folder(sub, carry_over=False) as tmp:  # a step folder rewritten in place stays whole
        target.save(tmp)
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors or {"_empty": torch.zeros(0)})
        if state is not None:
            run_tensors, run_meta = state.checkpoint_state()
            atomic_save_safetensors(tmp / "run_state.safetensors",
                                    {k: v.contiguous() for k, v in run_tensors.items()} or {"_empty": torch.zeros(0)})
        atomic_write_json(tmp / "state.json", {
            "step": step, "optimizer": opt_meta, "history": history, "resid_rms": resid_rms,
            "config": config, **target.identity(), **({"run_state": run_meta} if state is not None else {}),
        })
    atomic_write_json(folder / "latest.json", {"step": step, "folder": sub.name})
    olds = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name != sub.name)
    for old in olds[:-1]:
        for f in sorted(old.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        old.rmdir()


def load_checkpoint(
    folder: Path, target: Trainable, opt: torch.optim.Optimizer, state: RunState | None = None,
) -> tuple[int, dict, dict] | None:
    """Load the latest checkpoint in ``folder`` into ``target`` and ``opt``: ``(step, history, resid_rms)``.

    With ``state`` (a :class:`RunState`) the run state saved beside the weights is loaded into it.
    Returns ``None`` when ``folder`` holds no checkpoint.

    Raises:
        IncompatibleVectorError: the checkpoint was made for other hooks / parameters, or ``state``
            is given and the checkpoint holds no run state (it was made by an older version or by
            another objective).
    """
    latest = folder / "latest.json"
    if not latest.exists():
        return None
    run_state = state
    sub = folder / read_json(latest)["folder"]
    saved = read_json(sub / "state.json")
    target.load(sub, saved, folder)
    tensors = {k: v for k, v in load_safetensors(sub / "optimizer.safetensors").items() if k != "_empty"}
    if run_state is not None:
        if "run_state" not in saved or not (sub / "run_state.safetensors").exists():
            raise IncompatibleVectorError(
                f"{sub}: this checkpoint holds no run state (rollouts in flight, baselines), so resuming "
                "from it would not continue the same run. Fix: start a fresh run (resume=False) or "
                "point checkpoint_dir at a checkpoint written by this version for this objective."
            )
        run_tensors = {k: v for k, v in load_safetensors(sub / "run_state.safetensors").items() if k != "_empty"}
        run_state.load_checkpoint_state(run_tensors, saved["run_state"])
    _optimizer_from_files(opt, {k: v.to(target.device) if not k.endswith(".step") else v
                                for k, v in tensors.items()}, saved["optimizer"])
    return int(saved["step"]), saved["history"], saved["resid_rms"]


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
