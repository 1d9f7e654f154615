"""How :class:`~steer_lens.SteeredTransformer` checks and shows its settings (split out of ``steering.py``).

The checks of the arguments of its constructor and setters (hook names, given vectors, ``scale``,
``positions``) and its summaries (``repr`` and the Jupyter view), kept apart from the hooks and the
calls in :mod:`steer_lens.steering`. Private: every public name stays on ``SteeredTransformer``, whose
``__init__``, setters, ``__repr__`` and ``_repr_html_`` call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from steer_lens.errors import ConfigError, NonFiniteError, ShapeMismatchError
from steer_lens.hooks import PositionSpec
from steer_lens.vectors import SteeringVectors

__all__ = ["check_hooks", "check_positions", "check_scale", "checked_vectors", "summary_html", "summary_repr"]


# -- validation ---------------------------------------------------------------------------------
def check_hooks(hooks: Any) -> list[str]:
    """``hooks`` as a non-empty list of names (one name is a list of one)."""
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, Sequence) or not all(isinstance(h, str) for h in hooks):
        raise ConfigError(f"hooks: expected a hook name or a list of hook names, got {hooks!r}. "
                          "Fix: e.g. hooks=['blocks.1.hook_resid_pre'].")
    hooks = list(hooks)
    if not hooks:
        raise ConfigError("hooks: expected at least one hook name, got an empty list.")
    return hooks


def checked_vectors(
    vectors: SteeringVectors | None, hooks: list[str], d_model: int, shapes: dict[str, tuple[int, ...]], *,
    init: str | Tensor | Mapping[str, Tensor], init_norm: float | None, seed: int | None,
) -> SteeringVectors:
    """New vectors from ``init`` when ``vectors`` is ``None``, else ``vectors`` checked against the hooks."""
    if vectors is None:
        return SteeringVectors(
            hooks, d_model, init=init, init_norm=init_norm, seed=seed,
            shapes={h: s for h, s in shapes.items() if s != (d_model,)},
        )
    if list(vectors.hook_names) != hooks or vectors.d_model != d_model or dict(vectors.shapes) != shapes:
        raise ShapeMismatchError(
            f"vectors: given vectors are at {list(vectors.hook_names)} with d_model "
            f"{vectors.d_model} and shapes {dict(vectors.shapes)}; expected hooks {hooks}, d_model "
            f"{d_model} and shapes {shapes}."
        )
    return vectors


def check_scale(scale: float) -> None:
    """Raise :class:`NonFiniteError` unless ``scale`` is a finite int or float (not a bool)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise NonFiniteError(f"scale: expected a finite number, got {scale!r}.")


def check_positions(positions: PositionSpec) -> PositionSpec:
    """``positions`` checked (:class:`ConfigError` if bad); a mask is copied, detached."""
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or positions.ndim not in (1, 2):
            raise ConfigError(
                "positions: an explicit mask must be a bool tensor [pos] or [batch, pos], got "
                f"dtype {positions.dtype} and shape {list(positions.shape)}."
            )
        return positions.detach().clone()
    if positions not in ("all", "prompt", "generated"):
        raise ConfigError(
            f"positions: expected 'all', 'prompt', 'generated' or a bool mask, got {positions!r}."
        )
    return positions


# -- summaries ----------------------------------------------------------------------------------
def _vector_rows(steered) -> list[tuple[str, str, float]]:
    """``(hook, shape, norm)`` per vector, for the reprs."""
    with torch.no_grad():
        norms = steered.vectors.norms()
        return [(h, "[" + ", ".join(str(d) for d in steered.vectors.direction(h).shape) + "]", float(norms[h]))
                for h in steered.hook_names]


def _positions_label(steered) -> str:
    positions = steered.positions
    return repr(positions) if isinstance(positions, str) else f"mask{list(positions.shape)}"


def summary_repr(steered) -> str:
    """A short summary: model, kind, scale, positions, and per hook the vector's shape and norm."""
    head = (f"SteeredTransformer(model={steered.info.name!r}, {type(steered.vectors).__name__} "
            f"({steered.vectors.kind}), scale={steered.scale:g}, positions={_positions_label(steered)}"
            + ("" if steered.enabled else ", disabled"))
    rows = [f"  {h}: {shape}, norm {n:.4g}" for h, shape, n in _vector_rows(steered)]
    return head + (":\n" + "\n".join(rows) + "\n)" if rows else ")")


def summary_html(steered) -> str:
    """Jupyter view: the summary line and a table of hooks, vector shapes and norms."""
    import html

    body = "".join(f"<tr><td><code>{html.escape(h)}</code></td><td>{shape}</td><td>{n:.4g}</td></tr>"
                   for h, shape, n in _vector_rows(steered))
    return (f"<b>SteeredTransformer</b> on <code>{html.escape(steered.info.name)}</code>: "
            f"{type(steered.vectors).__name__}, scale {steered.scale:g}, positions "
            f"{html.escape(_positions_label(steered))}<table><tr><th>hook</th><th>shape</th>"
            f"<th>norm</th></tr>{body}</table>")
