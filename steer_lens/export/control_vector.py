"""llama.cpp control vectors (GGUF): export a wrapper's vectors, import vectors made elsewhere.

The file format is the one llama.cpp's ``--control-vector`` loader reads and repeng / EasySteer
write (repeng: ``vgel/repeng``, ``repeng/extract.py``, ``ControlVector.export_gguf`` /
``import_gguf``; llama.cpp: ``common/common.cpp``, ``llama_control_vector_load_one``, and
``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``): ``general.architecture =
"controlvector"``, ``controlvector.model_hint`` (the Hugging Face ``model_type``, e.g. ``"llama"``),
``controlvector.layer_count`` (the number of tensors), and one F32 tensor ``direction.N`` of length
``n_embd`` per steered layer. llama.cpp adds ``direction.N`` to the **output of 0-based block N at
every position**, for ``N = 1 … n_layer − 1`` (it rejects ``direction.0``; nothing is added to the
embeddings). In TransformerLens terms:

* ``blocks.L.hook_resid_post`` → ``direction.L`` (``L >= 1``);
* ``blocks.L.hook_resid_pre`` → ``direction.(L − 1)`` (``L >= 2``: the same tensor as block
  ``L − 1``'s output);
* ``blocks.L.hook_mlp_out`` → ``direction.L`` (``L >= 1``; the block's output is its input plus
  the attention and MLP writes, so adding to the MLP write adds to the output, up to float rounding).

Vectors at several hooks that map to one block are summed. What cannot be expressed is refused with
a named error: other hooks (``attn_out``, ``resid_mid``, per-head hooks), block 0's output, positions
other than ``"all"``, token-dependent kinds (gated, ablate-then-add), and models loaded with weight
processing (``fold_ln``, centring: the vector lives in the processed basis).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError, IncompatibleVectorError, MissingDependencyError, ShapeMismatchError
from steer_lens.hook_sites import HookSite
from steer_lens.models import model_info
from steer_lens.steering import SteeredTransformer

__all__ = ["CONSTANT_KINDS", "check_constant_vectors", "control_vector_directions", "export_control_vector", "import_control_vector",
           "read_control_vector"]

ARCH = "controlvector"
CONSTANT_KINDS = ("vectors", "lowrank")
"""Vector kinds whose added value does not depend on the activation (exportable as constants)."""
_SHIFT = {"resid_post": 0, "mlp_out": 0, "resid_pre": -1}  # hook kind -> llama.cpp block offset


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise MissingDependencyError("the gguf package is needed for control vectors: pip install gguf") from e
    return gguf


def check_constant_vectors(
    steered: Any, target: str = "a llama.cpp control vector", *, residual_width: bool = True
) -> None:
    """Raise unless ``steered``'s vectors are one constant vector per hook in the checkpoint's basis,
    what every export format here can express (``target`` names the format in the messages;
    ``residual_width``: also require ``[d_model]`` vectors, for formats that map hooks themselves pass False).

    Raises:
        ConfigError: not a SteeredTransformer; positions other than ``"all"``; a token-dependent kind
            (gated, ablate-then-add); a model loaded with weight processing.
        ShapeMismatchError: a vector that is not ``[d_model]`` (per-head or neuron hooks).
    """
    if not isinstance(steered, SteeredTransformer):
        raise ConfigError(
            f"expected a SteeredTransformer, got {type(steered).__name__}. Fix: wrap the model, e.g. "
            "sl.SteeredTransformer(model, hooks=[...], init=vector)."
        )
    if not (isinstance(steered.positions, str) and steered.positions == "all"):
        raise ConfigError(
            f"positions={steered.positions!r}: {target} is added at every position. Fix: "
            "export vectors trained with positions='all' (no export format here expresses position masks)."
        )
    kind = type(steered.vectors).kind
    if kind not in CONSTANT_KINDS:
        raise ConfigError(
            f"{type(steered.vectors).__name__} (kind {kind!r}) adds a token-dependent value; {target} "
            f"adds one constant vector. Fix: export plain or low-rank vectors ({list(CONSTANT_KINDS)})."
        )
    info = model_info(steered.model)
    processed = [k for k, v in info.processing().items() if v]
    if processed:
        raise ConfigError(
            f"the model was loaded with weight processing {processed}: the vectors live in the processed "
            "basis, not the checkpoint's. Fix: load the model with sl.load_model(name) (no processing) and "
            "train or transfer the vectors there."
        )
    if residual_width:
        steered.vectors.require_residual_width("export")


def control_vector_directions(steered: Any) -> dict[int, Float[Tensor, " d_model"]]:
    """The llama.cpp control-vector directions of ``steered``: ``{block N: vector}`` (see the module).

    Each vector is ``scale × direction`` in residual-stream units (fp32, CPU); hooks that map to the
    same block are summed.

    Raises:
        ConfigError: not a SteeredTransformer; positions other than ``"all"``; a token-dependent kind;
            a model with processed weights; a hook llama.cpp cannot steer (the message names the
            hooks that can, and says that ``format="hf"`` also covers attention outputs).
        ShapeMismatchError: a vector that is not ``[d_model]`` (per-head or neuron hooks).
    """
    check_constant_vectors(steered)
    n_layers = int(steered.model.cfg.n_layers)
    out: dict[int, Tensor] = {}
    for hook in steered.hook_names:
        site = HookSite.parse(hook)
        block = None if site.layer is None or site.kind not in _SHIFT else site.layer + _SHIFT[site.kind]
        if block is None or not 1 <= block <= n_layers - 1:
            raise ConfigError(
                f"{hook}: llama.cpp adds control vectors to the output of blocks 1..{n_layers - 1} only "
                f"(blocks.L.hook_resid_post for L >= 1, hook_resid_pre for L >= 2, hook_mlp_out for L >= 1). "
                "Fix: train the vector at one of those hooks, or export with format='hf' (biases)."
            )
        v = steered.vectors.direction(hook).detach().float().cpu() * float(steered.scale)
        out[block] = out[block] + v if block in out else v
    return dict(sorted(out.items()))


def _model_hint(model: Any) -> str:
    """The Hugging Face ``model_type`` of ``model`` (from its architecture name when not recorded)."""
    info = model_info(model)
    if info.model_type:
        return str(info.model_type)
    arch = str(info.architecture or "")
    return arch.removesuffix("ForCausalLM").lower() or "unknown"


def export_control_vector(steered: Any, path: str | Path, *, model_hint: str | None = None) -> Path:
    """Write ``steered``'s vectors as a llama.cpp control vector (GGUF), atomically.

    The bytes equal repeng's ``ControlVector.export_gguf`` for the same directions (``gguf``'s
    ``GGUFWriter``: architecture, ``model_hint``, ``layer_count``, then ``direction.N`` in block order).
    Use it with ``llama-cli -m model.gguf --control-vector path`` (or ``--control-vector-scaled path s``).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` (see :func:`control_vector_directions`).
        path: the ``.gguf`` file to write (replaced atomically if it exists).
        model_hint: the ``controlvector.model_hint`` (default: the model's Hugging Face ``model_type``).

    Returns:
        The path written.

    Raises:
        As :func:`control_vector_directions`; MissingDependencyError without ``gguf``.
    """
    from steer_lens.vectors.io import atomic_write_bytes

    directions = control_vector_directions(steered)
    gguf = _gguf()
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = os.path.join(tmp, "cvec.gguf")
        writer = gguf.GGUFWriter(tmp_file, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint or _model_hint(steered.model))
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for block, v in directions.items():
            writer.add_tensor(f"direction.{block}", v.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(path, Path(tmp_file).read_bytes())
    return path


def read_control_vector(path: str | Path) -> tuple[str | None, dict[int, Float[Tensor, " n_embd"]]]:
    """The model hint and ``{block: direction}`` of a control-vector file, as llama.cpp reads it.

    Args:
        path: a ``.gguf`` control-vector file (llama.cpp / repeng / EasySteer).

    Returns:
        ``(controlvector.model_hint or None, {N: direction.N as float32})``, unchecked against any model
        (:func:`import_control_vector` checks them).

    Raises:
        IncompatibleVectorError: not a readable GGUF file, not a control vector, a bad tensor name.
    """
    path = Path(path)
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # any parse failure of a damaged file
        raise IncompatibleVectorError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from e

    def field(name: str) -> str | None:
        f = reader.get_field(name)
        return None if f is None or not len(f.parts) else bytes(f.parts[-1]).decode("utf-8", errors="replace")

    arch = field("general.architecture")
    if arch != ARCH:
        raise IncompatibleVectorError(
            f"{path}: general.architecture is {arch!r}, not {ARCH!r}: this is not a control vector file "
            "(a model file?)."
        )
    directions = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            block = int(t.name.split(".", 1)[1])
        except ValueError as e:
            raise IncompatibleVectorError(f"{path}: bad tensor name {t.name!r} (expected direction.N).") from e
        directions[block] = torch.tensor(t.data, dtype=torch.float32).reshape(-1)
    return field(f"{ARCH}.model_hint"), directions


def import_control_vector(
    path: str | Path, model: Any, *, allow_other_model: bool = False
) -> Any:
    """Read a llama.cpp / repeng / EasySteer control vector onto ``model`` as a wrapper.

    ``direction.N`` becomes a vector at ``blocks.N.hook_resid_post`` (where llama.cpp adds it), so the
    returned wrapper steers ``model`` as llama.cpp would steer the same weights.

    Args:
        path: the ``.gguf`` control-vector file.
        model: the ``HookedTransformer`` to steer (loaded without weight processing).
        allow_other_model: accept a file whose ``model_hint`` differs from the model's ``model_type``.

    Returns:
        A :class:`~steer_lens.SteeredTransformer` with ``positions="all"``; its ``training_config``
        records the source file and model hint.

    Raises:
        IncompatibleVectorError: not a control-vector file, no directions, ``direction.0`` or a block
            past the model's last, or another model's hint (without ``allow_other_model``).
        ShapeMismatchError: a direction whose length is not the model's ``d_model``.
    """
    path = Path(path)
    hint, directions = read_control_vector(path)
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    if not directions:
        raise IncompatibleVectorError(f"{path}: holds no direction.N tensors.")
    bad = [b for b in directions if not 1 <= b <= n_layers - 1]
    if bad:
        raise IncompatibleVectorError(
            f"{path}: directions for blocks {bad}; llama.cpp (and this model of {n_layers} blocks) steers "
            f"blocks 1..{n_layers - 1} only."
        )
    for b, v in directions.items():
        if v.numel() != d_model:
            raise ShapeMismatchError(f"{path}: direction.{b} has {v.numel()} values; the model's d_model is {d_model}.")
    mine = _model_hint(model)
    if hint and mine != "unknown" and hint != mine and not allow_other_model:
        raise IncompatibleVectorError(
            f"{path}: made for model_type {hint!r}, the model is {mine!r}. Fix: pass allow_other_model=True "
            "if the widths and layers really correspond."
        )
    init = {f"blocks.{b}.hook_resid_post": v for b, v in sorted(directions.items())}
    steered = SteeredTransformer(model, hooks=list(init), init=init)
    steered.training_config = {"source": "llama.cpp control vector", "file": str(path), "model_hint": hint}
    return steered
