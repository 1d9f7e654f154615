"""A Hugging Face checkpoint of the base model with the steering vectors folded into biases.

A constant vector added at every position to a sub-layer's output is the same as a bias on that
sub-layer's output projection: Sinii et al. 2025, "Steering LLM Reasoning Through Bias-Only
Adaptation", train exactly such biases on ``mlp.down_proj``. The checkpoint written here is the base
model with those biases, so ``AutoModelForCausalLM.from_pretrained`` (and vLLM, TGI, llama.cpp's HF
converter, any engine with no hooks) runs the steered model. Where the architecture's linear layers
have no bias, the config flag that adds one is switched on (Llama: ``mlp_bias`` adds biases to
``gate_proj``/``up_proj``/``down_proj``, ``attention_bias`` to ``q/k/v/o_proj``) and every bias
other than the steered one is zero.

Checked against the paper's code as read in ``robertnward/steering-reasoning`` @ ``caf560b`` (a fork
of ``corl-team/steering-reasoning``): ``steering_reasoning/helpers/insert_vector.py`` lines 20-29
zero every ``model.model.layers[i].mlp.down_proj.bias``, set one layer's to ``steer_multiply × 8.57 ×
vector`` and ``save_pretrained``; ``bin/helpers/modify_bias_transformers.sh`` lines 3-6 give
``down_proj`` its bias by editing transformers' ``modeling_llama.py`` / ``modeling_qwen2.py``
(``bias=True``). Here the config flag does that instead, so the checkpoint loads with an unmodified
transformers (and vLLM); the cost is zero ``gate_proj``/``up_proj`` biases beside the steered one.

Mapping (TransformerLens hook → bias; vectors mapping to one bias are summed):

* ``blocks.L.hook_mlp_out`` → layer L's MLP output projection (Llama ``mlp.down_proj``, GPT-2
  ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``);
* ``blocks.L.hook_attn_out`` → layer L's attention output projection (Llama ``self_attn.o_proj``,
  GPT-2 ``attn.c_proj``, GPT-NeoX ``attention.dense``);
* ``blocks.L.hook_resid_post`` → as ``mlp_out`` of layer L (a block's output is its input plus the
  attention and MLP writes);
* ``blocks.L.hook_resid_mid`` → as ``attn_out`` of layer L (sequential blocks only);
* ``blocks.L.hook_resid_pre`` (L ≥ 1) → as ``mlp_out`` of layer L − 1.

Refused (ConfigError, before anything is written): positions other than ``"all"``, token-dependent
kinds (gated, ablate-then-add), processed weights (``fold_ln``, centring), per-head / neuron /
embedding hooks, ``resid_pre`` of layer 0, post-sub-layer norms (Gemma-2/3: the bias would be
normalised), architectures without a bias flag for the module needed, and architectures not in
:data:`SUPPORTED`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError, ShapeMismatchError
from steer_lens.export.control_vector import check_constant_vectors
from steer_lens.hook_sites import HookSite
from steer_lens.models import model_info, resolve_dtype
from steer_lens.vectors.io import atomic_folder

__all__ = ["SUPPORTED", "bias_vectors", "export_hf", "load_hf_model"]

MANIFEST = "steer_lens_export.json"


@dataclass(frozen=True)
class _Layout:
    """Where an architecture's per-layer output projections live, and the config flags adding biases."""

    layers: str  # attribute path from the CausalLM to the layer list
    mlp_out: str  # the MLP output projection, from a layer
    attn_out: str  # the attention output projection, from a layer
    mlp_flag: str | None  # config flag that gives the MLP's linears biases (None: always biased)
    attn_flag: str | None
    mlp_siblings: tuple[str, ...] = ()  # other linears the flag gives a bias (set to zero)
    attn_siblings: tuple[str, ...] = ()


SUPPORTED: dict[str, _Layout] = {
    "LlamaForCausalLM": _Layout(
        "model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp_bias", "attention_bias",
        ("mlp.gate_proj", "mlp.up_proj"), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    # Llama's layout, but their configs have no mlp_bias / o_proj flag: refused with the flag named
    "MistralForCausalLM": _Layout("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp_bias", "attention_bias"),
    "Qwen2ForCausalLM": _Layout("model.layers", "mlp.down_proj", "self_attn.o_proj", "mlp_bias", "attention_bias"),
    # GPT-2's Conv1D c_proj always has a bias (length nf = d_model, like nn.Linear's)
    "GPT2LMHeadModel": _Layout("transformer.h", "mlp.c_proj", "attn.c_proj", None, None),
    "GPTNeoXForCausalLM": _Layout(
        "gpt_neox.layers", "mlp.dense_4h_to_h", "attention.dense", None, "attention_bias",
        (), ("attention.query_key_value",),
    ),
}
"""Hugging Face architectures with a known layout (Mistral and Qwen2 are refused: no bias flag)."""

_TARGET = {"mlp_out": ("mlp", 0), "resid_post": ("mlp", 0), "resid_pre": ("mlp", -1),
           "attn_out": ("attn", 0), "resid_mid": ("attn", 0)}  # hook kind -> (sub-layer, layer offset)


def _check_steered(steered: Any) -> None:
    check_constant_vectors(steered, "a bias", residual_width=False)  # hooks are refused by name below
    if getattr(steered.model.cfg, "use_normalization_before_and_after", False):
        raise ConfigError(
            "the model normalises each sub-layer's output (Gemma-2/3 post-attention/post-MLP norms): a "
            "down_proj / o_proj bias would be normalised, not added to the residual stream. Fix: export "
            "with format='gguf' (llama.cpp adds control vectors after the block) or steer another model."
        )


def bias_vectors(
    steered: Any, *, hooks: Sequence[str] | None = None, embedding: bool = False
) -> dict[tuple[str, int], Float[Tensor, " d_model"]]:
    """The biases ``steered``'s vectors fold into: ``{("mlp" | "attn", layer): scale × direction}``.

    Each value is in residual-stream units (fp32, CPU); hooks mapping to one bias are summed (see the
    module for the mapping). ``hooks``: only these of ``steered``'s hooks (default: all);
    ``embedding=True``: ``blocks.0.hook_resid_pre`` maps to ``("embed", 0)``, the embedding's output
    (no bias carries it; :mod:`steer_lens.hf_generation` adds it with a hook).

    Raises:
        ConfigError: not a SteeredTransformer; positions other than ``"all"``; a token-dependent kind;
            processed weights; post-sub-layer norms; a hook no bias expresses (per-head, neuron,
            embedding hooks, ``resid_pre`` of layer 0, ``resid_mid`` of a parallel block).
    """
    _check_steered(steered)
    n_layers = int(steered.model.cfg.n_layers)
    parallel = bool(getattr(steered.model.cfg, "parallel_attn_mlp", False))
    out: dict[tuple[str, int], Tensor] = {}
    for hook in steered.hook_names if hooks is None else hooks:
        site = HookSite.parse(hook)
        target = _TARGET.get(site.kind) if site.layer is not None else None
        if embedding and site.kind == "resid_pre" and site.layer == 0:
            target = ("embed", 0)
        layer = None if target is None else site.layer + target[1]
        if target is None or not 0 <= layer < n_layers or (site.kind == "resid_mid" and parallel):
            raise ConfigError(
                f"{hook}: no bias adds this vector. A bias can carry vectors at blocks.L.hook_mlp_out, "
                "hook_attn_out, hook_resid_post, hook_resid_mid (sequential blocks) and hook_resid_pre for "
                "L >= 1 (not per-head, neuron or embedding hooks). Fix: train the vector at one of those."
            )
        v = steered.vectors.direction(hook).detach().float().cpu().reshape(-1) * float(steered.scale)
        if v.numel() != int(steered.model.cfg.d_model):
            raise ShapeMismatchError(f"{hook}: vector of {v.numel()} values, d_model is {steered.model.cfg.d_model}.")
        key = (target[0], layer)
        out[key] = out[key] + v if key in out else v
    return out


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _layout(hf_model: Any, biases: dict[tuple[str, int], Tensor]) -> _Layout:
    arch = type(hf_model).__name__
    if arch not in SUPPORTED:
        raise ConfigError(
            f"{arch}: exporting biases is not supported for this architecture (supported: "
            f"{[a for a in SUPPORTED if a not in ('MistralForCausalLM', 'Qwen2ForCausalLM')]}). "
            "Fix: export with format='gguf', or steer a Llama-family, GPT-2 or GPT-NeoX model."
        )
    lay = SUPPORTED[arch]
    for sub in sorted({s for s, _ in biases}):
        flag = lay.mlp_flag if sub == "mlp" else lay.attn_flag
        module = lay.mlp_out if sub == "mlp" else lay.attn_out
        has_bias = _get(_get(hf_model, lay.layers)[0], module).bias is not None
        if flag is not None and not has_bias and not hasattr(hf_model.config, flag):
            raise ConfigError(
                f"{type(hf_model.config).__name__} has no {flag!r} flag, so {module} cannot have a bias in a "
                f"checkpoint {arch} loads. Fix: steer at a hook the architecture can carry as a bias, or "
                "export with format='gguf'."
            )
    return lay


def _add_biases(hf_model: Any, lay: _Layout, biases: dict[tuple[str, int], Tensor]) -> None:
    """Switch on the bias flags needed (new biases zero) and add the vectors to the output biases."""
    layers = _get(hf_model, lay.layers)
    for sub in sorted({s for s, _ in biases}):
        flag, module, siblings = (
            (lay.mlp_flag, lay.mlp_out, lay.mlp_siblings) if sub == "mlp"
            else (lay.attn_flag, lay.attn_out, lay.attn_siblings)
        )
        if flag is None or _get(layers[0], module).bias is not None:
            continue
        setattr(hf_model.config, flag, True)
        for layer in layers:
            for name in (module, *siblings):
                lin = _get(layer, name)
                if lin.bias is None:
                    w = lin.weight
                    lin.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    with torch.no_grad():
        for (sub, layer), v in biases.items():
            bias = _get(layers[layer], lay.mlp_out if sub == "mlp" else lay.attn_out).bias
            if bias.shape != v.shape:
                raise ShapeMismatchError(f"{sub} bias of layer {layer} has shape {tuple(bias.shape)}, vector {tuple(v.shape)}.")
            bias.add_(v.to(bias.device, bias.dtype))


def _load_hf(steered: Any, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    info = model_info(steered.model)
    kw: dict[str, Any] = {"gguf_file": info.gguf_file} if info.gguf_file else {}
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(info.name, dtype=dtype, **kw)
    except OSError as e:
        raise ConfigError(
            f"could not load the Hugging Face model {info.name!r} the vectors were made on ({e}). Fix: pass "
            "hf_model= (the transformers model whose weights the TransformerLens model holds)."
        ) from e
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config  # GGUF weights are dequantised on load: plain tensors
    if getattr(hf_model, "hf_quantizer", None) is not None:
        hf_model.hf_quantizer = None  # its GGUF quantizer would refuse save_pretrained
    hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model


def load_hf_model(steered: Any, dtype: str | torch.dtype | None = None) -> Any:
    """The transformers model of ``steered``'s base model, loaded by ``model_info(steered.model).name``
    (with its ``gguf_file`` when it came from GGUF, dequantised), in ``dtype`` (default float32), on the CPU.

    Raises:
        ConfigError: the model cannot be loaded by that name (pass the transformers model yourself).
    """
    return _load_hf(steered, resolve_dtype(dtype))


def _tokenizer(steered: Any) -> Any:
    from transformers import AutoTokenizer

    info = model_info(steered.model)
    try:
        kw = {"gguf_file": info.gguf_file} if info.gguf_file else {}
        return AutoTokenizer.from_pretrained(info.name, **kw)
    except (OSError, ValueError, TypeError):  # no tokenizer under that name (random or local models)
        return None


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{str(path)!r} exists and is not a folder. Fix: export to a folder path.")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise ConfigError(
            f"{str(path)!r} is a non-empty folder that is not a steer_lens export (no {MANIFEST}); it would "
            "be replaced whole. Fix: export to a new or empty folder, or delete this one first."
        )


def export_hf(
    steered: Any, path: str | Path, *, hf_model: Any = None, dtype: str | torch.dtype | None = None
) -> Path:
    """Write the base model with ``steered``'s vectors folded into biases as a transformers checkpoint.

    Implements the bias-only steering of Sinii et al. 2025 ("Steering LLM Reasoning Through
    Bias-Only Adaptation": a trained vector added to ``mlp.down_proj``'s output is a bias on it) for
    vectors trained here: the folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` and
    serves with ``vllm serve path``, with no hooks. Written with ``save_pretrained`` (safetensors),
    the tokenizer when one can be loaded by the model's name, and ``steer_lens_export.json`` (hooks,
    scale, biases written, source model). The folder is written beside ``path`` and swapped in whole
    when complete; an existing export there is replaced whole.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` (see :func:`bias_vectors`).
        path: the folder to write.
        hf_model: the transformers model whose weights ``steered.model`` holds (default: loaded by
            ``model_info(steered.model).name``, with its ``gguf_file`` when it came from GGUF).
            Changed in place (biases added) when given.
        dtype: the checkpoint's dtype (default float32); the vectors are added in that dtype.

    Returns:
        The folder written.

    Raises:
        ConfigError: what :func:`bias_vectors` refuses; an architecture not in :data:`SUPPORTED` or
            whose config has no bias flag for the projection needed (the flag is named); a ``path``
            that is a file, or a non-empty folder that is not an earlier export; a model that cannot
            be loaded by its name (pass ``hf_model``).
        ShapeMismatchError: the Hugging Face model's width or depth differs from the steered model's.
    """
    biases = bias_vectors(steered)
    path = Path(path)
    _check_target(path)
    dt = resolve_dtype(dtype)
    own = hf_model is None
    hf_model = _load_hf(steered, dt) if own else hf_model
    cfg = steered.model.cfg
    lay = _layout(hf_model, biases)
    layers = _get(hf_model, lay.layers)
    width = int(hf_model.get_input_embeddings().weight.shape[1])
    if len(layers) != int(cfg.n_layers) or width != int(cfg.d_model):
        raise ShapeMismatchError(
            f"the Hugging Face model has {len(layers)} layers of width {width}; the steered model "
            f"{cfg.n_layers} of width {cfg.d_model}. Fix: pass the hf_model the TransformerLens model was made from."
        )
    if dtype is not None or own:
        hf_model = hf_model.to(dt)
    _add_biases(hf_model, lay, biases)
    info = model_info(steered.model)
    manifest = {
        "format": "hf-biases",
        "hooks": list(steered.hook_names),
        "scale": float(steered.scale),
        "biases": {f"{lay.layers}.{layer}.{lay.mlp_out if sub == 'mlp' else lay.attn_out}.bias": [sub, layer]
                   for sub, layer in sorted(biases)},
        "source": {"model": info.to_dict(), "architecture": type(hf_model).__name__},
        "training_config": getattr(steered, "training_config", None),
    }
    tokenizer = _tokenizer(steered) if own else getattr(steered.model, "tokenizer", None)
    with atomic_folder(path, carry_over=False) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path
