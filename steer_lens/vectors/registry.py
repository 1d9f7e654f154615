"""The registry of steering-vector parameterisations, by ``kind`` name (as sae-lens' ``registry.py``).

A saved folder records its ``kind``; :meth:`steer_lens.SteeredTransformer.load` looks the class up
here. The built-in kinds (``vectors``, ``lowrank``, ``gated``) register themselves when
:mod:`steer_lens.vectors` is imported; a user's own subclass registers with :func:`register_kind`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_kind", "vector_kinds"]

_KINDS: dict[str, type[Any]] = {}


def register_kind(cls: type[Any]) -> type[Any]:
    """Class decorator: make a :class:`~steer_lens.vectors.SteeringVectors` subclass loadable by ``cls.kind``.

    Raises:
        ValueError: another class is already registered under the same ``kind``.
    """
    prev = _KINDS.get(cls.kind)
    if prev is not None and prev.__qualname__ != cls.__qualname__:
        raise ValueError(f"kind {cls.kind!r} is already registered by {prev.__qualname__}; pick another kind name.")
    _KINDS[cls.kind] = cls
    return cls


def vector_kinds() -> dict[str, type[Any]]:
    """The registered parameterisations, ``{kind: class}``."""
    return dict(_KINDS)
