"""Apply a control vector to a running llama.cpp model from Python (``llama-cpp-python``).

llama.cpp's command line loads control vectors with ``--control-vector FILE`` /
``--control-vector-scaled FILE S`` / ``--control-vector-layer-range A B``; that loader
(``common/common.cpp``, ``llama_control_vector_load``) is C++ and not bound by ``llama-cpp-python``,
whose only route is the low-level ``llama_cpp.llama_set_adapter_cvec(ctx, data, len, n_embd,
il_start, il_end)`` (``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``). This module is the
glue: it reads a control-vector file (or takes the directions of a wrapper) and hands the engine the
buffer it expects.

The buffer layout is the engine's: ``n_embd`` floats per block **starting from block 1**
(``off = n_embd * (il - 1)``), and ``apply`` only writes the blocks the buffer covers, so a shorter
buffer leaves an earlier vector in the blocks it does not reach. :func:`control_vector_buffer`
therefore always returns a full ``n_layer × n_embd`` buffer, zero where nothing is steered (the last
``n_embd`` floats are padding: the engine reads blocks 1 … n_layer − 1).

``llama-cpp-python`` is an optional dependency (it builds llama.cpp from source:
``pip install llama-cpp-python``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError, IncompatibleVectorError, MissingDependencyError, ShapeMismatchError

__all__ = ["clear_control_vector", "control_vector_buffer", "set_control_vector"]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependencyError(
            "llama-cpp-python is needed to steer a llama.cpp model from Python: pip install llama-cpp-python "
            "(it compiles llama.cpp; about 20 minutes on two cores)."
        ) from e
    return llama_cpp


def _directions(vector: Any) -> dict[int, Tensor]:
    """``{block: direction}`` of a control-vector file, a wrapper, or a ready mapping."""
    from steer_lens.export.control_vector import control_vector_directions, read_control_vector
    from steer_lens.steering import SteeredTransformer

    if isinstance(vector, (str, Path)):
        return read_control_vector(vector)[1]
    if isinstance(vector, SteeredTransformer):
        return control_vector_directions(vector)
    if isinstance(vector, dict):
        return {int(b): torch.as_tensor(v, dtype=torch.float32).reshape(-1) for b, v in vector.items()}
    raise ConfigError(
        f"vector: expected a control-vector file path, a SteeredTransformer or a {{block: tensor}} dict, "
        f"got {type(vector).__name__}."
    )


def control_vector_buffer(
    vector: Any, n_layer: int, n_embd: int, *, scale: float = 1.0
) -> Float[np.ndarray, " n_layer_times_n_embd"]:
    """The float32 buffer ``llama_set_adapter_cvec`` reads: ``direction.N`` at ``[(N-1)*n_embd, N*n_embd)``.

    Args:
        vector: a control-vector ``.gguf`` file, a :class:`~steer_lens.SteeredTransformer` whose vectors
            llama.cpp can express (see :func:`~steer_lens.export.control_vector_directions`), or a
            ``{block: Float[Tensor, "n_embd"]}`` mapping.
        n_layer: the model's number of blocks.
        n_embd: the model's residual width.
        scale: multiplies every direction (``--control-vector-scaled``).

    Returns:
        ``n_layer * n_embd`` float32 values (C-contiguous), zero for blocks without a direction.

    Raises:
        IncompatibleVectorError: a direction for block 0 or past ``n_layer - 1`` (llama.cpp cannot add it).
        ShapeMismatchError: a direction whose length is not ``n_embd``.
        ConfigError: ``vector`` of another type.
    """
    directions = _directions(vector)
    buf = np.zeros(n_layer * n_embd, dtype=np.float32)
    for block, v in sorted(directions.items()):
        if not 1 <= block <= n_layer - 1:
            raise IncompatibleVectorError(
                f"direction.{block}: llama.cpp steers the outputs of blocks 1..{n_layer - 1} of this model only."
            )
        if v.numel() != n_embd:
            raise ShapeMismatchError(f"direction.{block} has {v.numel()} values; the model's n_embd is {n_embd}.")
        buf[(block - 1) * n_embd : block * n_embd] = scale * v.detach().to("cpu", torch.float32).numpy()
    return buf


def set_control_vector(
    llm: Any, vector: Any, *, scale: float = 1.0, layer_range: tuple[int, int] | None = None
) -> None:
    """Steer a ``llama_cpp.Llama`` with a control vector, as ``--control-vector-scaled`` would.

    Call it before evaluating tokens; tokens already in the KV cache keep the keys and values they were
    computed with (``llm.reset()`` to recompute them).

    Args:
        llm: a ``llama_cpp.Llama``.
        vector: a control-vector file, a wrapper or a ``{block: direction}`` mapping
            (:func:`control_vector_buffer`).
        scale: multiplies the directions.
        layer_range: ``(first, last)`` blocks to steer, both inclusive
            (``--control-vector-layer-range``); ``None``: all, ``(1, n_layer)`` as llama.cpp's default.

    Raises:
        MissingDependencyError: ``llama-cpp-python`` is not installed.
        IncompatibleVectorError / ShapeMismatchError: see :func:`control_vector_buffer`.
        ConfigError: the engine refused the vector (width mismatch), or a bad ``layer_range``.
    """
    llama_cpp = _llama_cpp()
    n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
    n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
    start, end = layer_range if layer_range is not None else (1, n_layer)
    if not 1 <= start <= end:
        raise ConfigError(f"layer_range: expected 1 <= first <= last, got {layer_range!r}.")
    buf = control_vector_buffer(vector, n_layer, n_embd, scale=scale)
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, n_embd, start, end) != 0:
        raise ConfigError("llama.cpp refused the control vector (llama_set_adapter_cvec returned an error).")


def clear_control_vector(llm: Any) -> None:
    """Switch a ``llama_cpp.Llama``'s control vector off (the engine keeps its buffers for a later one).

    Raises:
        MissingDependencyError: ``llama-cpp-python`` is not installed.
    """
    llama_cpp = _llama_cpp()
    llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, int(llama_cpp.llama_model_n_embd(llm.model)), -1, -1)
