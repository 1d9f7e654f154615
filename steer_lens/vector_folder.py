"""The folder a :class:`~steer_lens.SteeredTransformer` is saved to: ``vectors.safetensors`` + ``config.json``.

:func:`write_folder` writes both as a whole (:func:`~steer_lens.vectors.io.atomic_folder`); :func:`read_folder`
checks the folder against the model it is loaded into and returns what the wrapper needs. Every way a
folder can be unreadable (not JSON, not an object, keys missing, a corrupt or truncated tensor file,
NaN/inf values) is an :class:`~steer_lens.errors.IncompatibleVectorError` or
:class:`~steer_lens.errors.NonFiniteError` naming the file, never a raw parser error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steer_lens._utils import dtype_of
from steer_lens.errors import IncompatibleVectorError, NonFiniteError
from steer_lens.models import model_info
from steer_lens.vectors import SteeringVectors, vector_kinds
from steer_lens.vectors.io import (
    atomic_folder,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json,
    readable_folder,
)

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "TENSOR_FILE", "SavedVectors", "read_folder", "write_folder"]

logger = logging.getLogger(__name__)

FORMAT = "steer_lens.vectors"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSOR_FILE = "vectors.safetensors"
_MASK = "__positions_mask__"
_REQUIRED = ("kind", "kind_config", "hook_names", "d_model", "positions", "scale")


def folder_config(steered) -> dict[str, Any]:
    """The JSON config of a wrapper (what :func:`write_folder` records)."""
    from steer_lens import __version__

    info = steered.info
    pos = steered.positions
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "kind": steered.vectors.kind,
        "kind_config": steered.vectors.kind_config(),
        "hook_names": list(steered.hook_names),
        "d_model": int(steered.cfg.d_model),
        "model": {**info.to_dict(), "dtype": str(dtype_of(steered.model)).replace("torch.", "")},
        "weight_processing": info.processing(),
        "positions": pos if isinstance(pos, str) else "mask",
        "scale": steered.scale,
        "training": steered.training_config,
    }


def write_folder(steered, path: str | Path) -> Path:
    """Write a wrapper's vectors and config to ``path`` as a whole (old folder or new, never a mix)."""
    path = Path(path)
    tensors = steered.vectors.tensors()
    if isinstance(steered.positions, Tensor):
        tensors = {**tensors, _MASK: steered.positions.to(torch.uint8)}
    config = folder_config(steered)
    with atomic_folder(path) as tmp:
        atomic_save_safetensors(tmp / TENSOR_FILE, tensors, metadata={"format": FORMAT})
        atomic_write_json(tmp / CONFIG_FILE, config)
    return path


@dataclass(frozen=True)
class SavedVectors:
    """What a folder holds, checked: the vectors module and the wrapper's settings."""

    vectors: SteeringVectors
    hook_names: list[str]
    positions: Any
    scale: float
    training: dict[str, Any] | None


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {str(path)!r}; is it a folder written by save()?")
    try:
        cfg = read_json(cfg_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleVectorError(f"{str(cfg_path)!r} is not valid JSON ({e}); the folder is damaged.") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise IncompatibleVectorError(f"{str(cfg_path)!r} is not a steer_lens vector config.")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise IncompatibleVectorError(f"{str(cfg_path)!r} lacks the keys {missing}; the folder is damaged.")
    return cfg


def _check_model(cfg: dict[str, Any], model, allow_other_model: bool) -> None:
    info = model_info(model)
    saved_model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if int(cfg["d_model"]) != int(model.cfg.d_model):
        raise IncompatibleVectorError(
            f"saved vectors have d_model={cfg['d_model']} (model {saved_model.get('name')!r}); the "
            f"given model {info.name!r} has d_model={model.cfg.d_model}."
        )
    if cfg.get("weight_processing") != info.processing():
        raise IncompatibleVectorError(
            f"saved vectors were made on weights processed as {cfg.get('weight_processing')}; the "
            f"given model {info.name!r} is processed as {info.processing()}. Fix: load the model "
            "with the same processing flags (load_model(..., fold_ln=...))."
        )
    if saved_model.get("name") != info.name:
        if not allow_other_model:
            raise IncompatibleVectorError(
                f"saved vectors were made on model {saved_model.get('name')!r}; the given model is "
                f"{info.name!r}. Pass allow_other_model=True to load them anyway (same d_model)."
            )
        logger.warning("loading vectors made on %s into %s", saved_model.get("name"), info.name)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    file = path / TENSOR_FILE
    if not file.exists():
        raise FileNotFoundError(f"no {TENSOR_FILE} in {str(path)!r}; is it a folder written by save()?")
    try:
        tensors = load_safetensors(file)
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on damage
        raise IncompatibleVectorError(f"{str(file)!r} cannot be read as safetensors ({e}); the file is damaged.") from e
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"{str(file)!r} holds NaN or inf in {bad}; these vectors would make every logit NaN.")
    return tensors


def read_folder(path: str | Path, model, *, allow_other_model: bool = False) -> SavedVectors:
    """Read and check a folder written by :func:`write_folder` for ``model``.

    Raises:
        FileNotFoundError: the folder or one of its files does not exist.
        IncompatibleVectorError: not a steer_lens folder, damaged (bad JSON, missing keys, corrupt
            tensors), or made on another d_model / weight processing / model name (both sides named).
        NonFiniteError: the saved tensors hold NaN or inf.
    """
    path = readable_folder(path)
    cfg = _read_config(path)
    _check_model(cfg, model, allow_other_model)
    kinds = vector_kinds()
    if cfg["kind"] not in kinds:
        raise IncompatibleVectorError(
            f"saved vectors are of kind {cfg['kind']!r}, which this version does not know (known: {sorted(kinds)})."
        )
    tensors = _read_tensors(path)
    try:
        vectors = kinds[cfg["kind"]].from_config(cfg["hook_names"], int(cfg["d_model"]), cfg["kind_config"])
    except (TypeError, ValueError) as e:
        raise IncompatibleVectorError(f"the config in {str(path)!r} does not describe valid vectors ({e}).") from e
    vectors.load_tensors(tensors)
    positions = cfg["positions"]
    if positions == "mask":
        if _MASK not in tensors:
            raise IncompatibleVectorError(f"{str(path)!r} says positions='mask' but holds no mask tensor.")
        positions = tensors[_MASK].bool()
    return SavedVectors(vectors, list(cfg["hook_names"]), positions, cfg["scale"], cfg.get("training"))
