"""Type checks of config dataclass fields against their annotations, before any range check.

Every settings dataclass (:class:`~steer_lens.train.loop.OptimConfig` and its subclasses,
``OneShotConfig``, ``LoraStateSAEConfig``, ``SAETrainConfig``) calls :func:`check_field_types` first in
its ``__post_init__``, so a value of the wrong *type* (``lr="0.1"``, ``steps=True``, ``seed=1.5``,
``betas=None``, ``resume=0``, a NaN learning rate) is a :class:`~steer_lens.errors.ConfigError` naming
the field, the expected type and what was given, instead of a raw ``TypeError`` from a comparison or a
silently accepted value (issue 15 item 5). Range checks (``steps >= 1`` ...) stay in each class.

What each annotation accepts:

* ``int``: an integer that is not a ``bool`` (numpy integers too);
* ``float``: a finite real number that is not a ``bool`` (ints too);
* ``bool``: ``True`` or ``False`` only (not 0 / 1 / ``None``);
* ``str``: a string; a path field (``*_dir``, ``*_path``) also an ``os.PathLike``;
* ``Literal[...]``: one of the listed values;
* ``tuple[X, Y]`` / ``tuple[X, ...]``: a tuple or list of that length whose items pass ``X``;
* ``Sequence[...]``: a sized iterable such as a list, a tuple or a tensor (a bare string or a dict is
  refused: a string would be split into characters);
* ``A | None``: ``None`` or what ``A`` accepts. Other annotations are not checked here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from steer_lens.errors import ConfigError

__all__ = ["check_field_types"]

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached per class)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _describe(tp: Any) -> str:
    """A short, user-facing name of an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        inner = ", ".join(_describe(a) for a in args if a is not Ellipsis)
        return f"a tuple of {inner}" + (", ..." if Ellipsis in args else "")
    if origin is not None and isinstance(origin, type) and issubclass(origin, Sequence):
        return "a list or tuple"
    return {int: "an int", float: "a finite float", bool: "True or False", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _accepts(tp: Any, value: Any, path_like: bool) -> bool | None:
    """Whether ``value`` fits ``tp``; ``None`` when the annotation is not one this module checks."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(float(value)))
    if tp is str:
        return isinstance(value, str) or (path_like and isinstance(value, os.PathLike))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        results = [_accepts(a, value, path_like) for a in args]
        return None if all(r is None for r in results) else any(r for r in results)
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], v, False) is not False for v in value)
        return len(value) == len(args) and all(_accepts(a, v, False) is not False
                                                for a, v in zip(args, value, strict=True))
    if origin is not None and isinstance(origin, type) and issubclass(origin, Sequence):
        return (hasattr(value, "__len__") and hasattr(value, "__iter__")
                and not isinstance(value, str | bytes | Mapping))
    return None


def _names_strings(tp: Any) -> bool:
    """Whether ``tp`` (or a member of its union) is a ``Literal`` of strings."""
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_names_strings(a) for a in typing.get_args(tp))
    return False


def check_field_types(config: Any) -> None:
    """Check every field of the dataclass instance ``config`` against its annotation.

    Args:
        config: a dataclass instance (called from its ``__post_init__``).

    Raises:
        ConfigError: a field whose value does not fit its annotation (see the module docstring); the
            message names the class, the field, the expected type and the value given.
    """
    cls = type(config)
    hints = _hints(cls)
    for f in dataclasses.fields(config):
        tp = hints.get(f.name)
        value = getattr(config, f.name)
        path_like = f.name.endswith(("_dir", "_path"))
        if tp is None or _accepts(tp, value, path_like) is not False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        hint = f" Fix: pass {_describe(tp)}, e.g. {f.name}={default!r} (the default)."
        if isinstance(value, str) and _accepts(tp, [value], path_like):
            hint = f" A bare string would be split into characters. Fix: pass a list, e.g. {f.name}=[{value!r}]."
        elif isinstance(value, str) and _names_strings(tp):
            hint = f" Fix: pass {_describe(tp)}, e.g. {f.name}={default!r} (the default); check the spelling."
        elif isinstance(value, str):
            hint = f" Fix: pass the value itself, not a string of it (e.g. {f.name}={default!r}, the default)."
        raise ConfigError(f"{cls.__name__}.{f.name}: expected {_describe(tp)}, got {value!r} "
                          f"({type(value).__name__}).{hint}")
