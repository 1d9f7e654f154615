"""Helpers private to :mod:`steer_lens.lora`: importing peft lazily and checking hook points."""

from __future__ import annotations

from typing import Any

from steer_lens.errors import ConfigError, MissingDependencyError

__all__ = ["check_hooks", "import_peft"]


def import_peft() -> Any:
    """The ``peft`` module.

    Raises:
        MissingDependencyError: peft is not installed (names the ``lora`` extra).
    """
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is installed in dev
        raise MissingDependencyError(
            "steer_lens.lora needs peft. Fix: pip install 'steer-lens[lora]'."
        ) from e
    return peft


def check_hooks(model: Any, hooks: list[str]) -> None:
    """Check that ``model`` has every hook point the LoRA analyses read.

    Raises:
        ConfigError: missing hook points (all listed).
    """
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise ConfigError(
            f"this model has no hook points {missing}, which the LoRA analysis reads (models without "
            "ln1/ln2 normalisation are not supported for q/k/v/gate/up LoRAs)."
        )
