"""Leave the notebook: steering vectors exported to the engines people serve models with.

* :func:`export_control_vector` / :func:`import_control_vector`: llama.cpp control vectors (GGUF,
  ``--control-vector``; the format repeng and EasySteer write), :mod:`steer_lens.export.control_vector`.
* :func:`export_hf`: a Hugging Face checkpoint of the base model with the vectors folded into biases
  ("Steering LLM Reasoning Through Bias-Only Adaptation"), servable by ``transformers``, vLLM and any
  engine with no hooks, :mod:`steer_lens.export.hf`.
* :func:`export`: one entry point, ``format="gguf"`` or ``"hf"`` (also ``SteeredTransformer.export``
  and ``steer-lens export``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steer_lens.errors import ConfigError
from steer_lens.export.control_vector import (
    control_vector_directions,
    export_control_vector,
    import_control_vector,
)

__all__ = [
    "FORMATS",
    "control_vector_directions",
    "export",
    "export_control_vector",
    "export_hf",
    "import_control_vector",
]

FORMATS = ("gguf", "hf")
"""The export formats: ``"gguf"`` (llama.cpp control vector file), ``"hf"`` (a checkpoint with biases)."""


def export_hf(steered: Any, path: str | Path, **kwargs: Any) -> Path:
    """A Hugging Face checkpoint with the vectors folded into biases: see :func:`steer_lens.export.hf.export_hf`."""
    from steer_lens.export.hf import export_hf as _export_hf

    return _export_hf(steered, path, **kwargs)


def export(steered: Any, path: str | Path, format: str = "gguf", **kwargs: Any) -> Path:
    """Export ``steered``'s vectors to ``path`` in ``format``.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        path: the file (``"gguf"``) or folder (``"hf"``) to write.
        format: ``"gguf"`` (:func:`export_control_vector`) or ``"hf"`` (:func:`export_hf`).
        **kwargs: passed to the format's exporter.

    Returns:
        The path written.

    Raises:
        ConfigError: unknown format; and whatever the format's exporter raises (vectors it cannot express).
    """
    if format == "gguf":
        return export_control_vector(steered, path, **kwargs)
    if format == "hf":
        return export_hf(steered, path, **kwargs)
    raise ConfigError(f"format: expected one of {list(FORMATS)}, got {format!r}.")
