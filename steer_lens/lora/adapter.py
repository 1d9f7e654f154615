"""Reading a peft LoRA adapter and mapping it onto TransformerLens weights.

peft does the LoRA: an adapter folder is loaded with ``peft.PeftModel.from_pretrained`` onto the
Hugging Face model, and for every LoRA layer we read its ``lora_A`` / ``lora_B`` weights and its
``scaling`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) as peft computed them. The weight update
of a module is, in the Hugging Face ``nn.Linear`` layout ``[d_out, d_in]``,

    ΔW = scaling · B · A,      B: [d_out, r],  A: [r, d_in]

(also for GPT-2's ``Conv1D`` layers, whose LoRA factors peft stores as ``nn.Linear`` too). Each module is
then mapped onto TransformerLens's names and layouts:

| Hugging Face module | TransformerLens weight | TL layout |
|---|---|---|
| ``q_proj`` | ``blocks.L.attn.W_Q`` | ``[n_heads, d_model, d_head]`` |
| ``k_proj``, ``v_proj`` | ``W_K``, ``W_V`` (GQA: ``_W_K``, ``_W_V``) | ``[n_kv_heads, d_model, d_head]`` |
| ``o_proj`` (``attn.c_proj``, ``attention.dense``) | ``blocks.L.attn.W_O`` | ``[n_heads, d_head, d_model]`` |
| fused ``c_attn`` / ``query_key_value`` | ``W_Q``, ``W_K``, ``W_V`` (named ``W_QKV``) | as above |
| ``up_proj`` (``c_fc``, ``dense_h_to_4h``) | ``blocks.L.mlp.W_in`` | ``[d_model, d_mlp]`` |
| ``gate_proj`` | ``blocks.L.mlp.W_gate`` | ``[d_model, d_mlp]`` |
| ``down_proj`` (``mlp.c_proj``, ``dense_4h_to_h``) | ``blocks.L.mlp.W_out`` | ``[d_mlp, d_model]`` |

Method: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"); rsLoRA
(Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import (
    ConfigError,
    IncompatibleVectorError,
    NonFiniteError,
    ShapeMismatchError,
)
from steer_lens.lora._common import import_peft
from steer_lens.models import HookedModel, model_info

__all__ = ["ARCHITECTURES", "LoraAdapter", "LoraModule", "load_adapter", "merged_model"]

logger = logging.getLogger(__name__)

# kind -> (site, TL short name, input hook (format with layer), writes the residual stream)
_KINDS: dict[str, tuple[str, str, str, bool]] = {
    "q": ("attn", "W_Q", "blocks.{l}.ln1.hook_normalized", False),
    "k": ("attn", "W_K", "blocks.{l}.ln1.hook_normalized", False),
    "v": ("attn", "W_V", "blocks.{l}.ln1.hook_normalized", False),
    "qkv_gpt2": ("attn", "W_QKV", "blocks.{l}.ln1.hook_normalized", False),
    "qkv_neox": ("attn", "W_QKV", "blocks.{l}.ln1.hook_normalized", False),
    "o": ("attn", "W_O", "blocks.{l}.attn.hook_z", True),
    "in": ("mlp", "W_in", "blocks.{l}.ln2.hook_normalized", False),
    "gate": ("mlp", "W_gate", "blocks.{l}.ln2.hook_normalized", False),
    "out": ("mlp", "W_out", "blocks.{l}.mlp.hook_post", True),
}

_LLAMA_LIKE = (
    (r"layers\.(\d+)\.self_attn\.q_proj$", "q"),
    (r"layers\.(\d+)\.self_attn\.k_proj$", "k"),
    (r"layers\.(\d+)\.self_attn\.v_proj$", "v"),
    (r"layers\.(\d+)\.self_attn\.o_proj$", "o"),
    (r"layers\.(\d+)\.mlp\.gate_proj$", "gate"),
    (r"layers\.(\d+)\.mlp\.up_proj$", "in"),
    (r"layers\.(\d+)\.mlp\.down_proj$", "out"),
)

#: Hugging Face architecture -> ((module-name regex with the layer as group 1, kind), ...).
ARCHITECTURES: dict[str, tuple[tuple[str, str], ...]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "GPT2LMHeadModel": (
        (r"\bh\.(\d+)\.attn\.c_attn$", "qkv_gpt2"),
        (r"\bh\.(\d+)\.attn\.c_proj$", "o"),
        (r"\bh\.(\d+)\.mlp\.c_fc$", "in"),
        (r"\bh\.(\d+)\.mlp\.c_proj$", "out"),
    ),
    "GPTNeoXForCausalLM": (
        (r"layers\.(\d+)\.attention\.query_key_value$", "qkv_neox"),
        (r"layers\.(\d+)\.attention\.dense$", "o"),
        (r"layers\.(\d+)\.mlp\.dense_h_to_4h$", "in"),
        (r"layers\.(\d+)\.mlp\.dense_4h_to_h$", "out"),
    ),
}


@dataclass(frozen=True, kw_only=True)
class LoraModule:
    """One LoRA'd module, mapped onto the TransformerLens model.

    Attributes:
        name: TransformerLens-style name, e.g. ``"blocks.1.mlp.W_out"`` (fused q/k/v: ``"...attn.W_QKV"``).
        hf_name: the module's name in the Hugging Face model, e.g. ``"model.layers.1.mlp.down_proj"``.
        layer: block index.
        kind: ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"qkv_gpt2"``, ``"qkv_neox"``, ``"in"``, ``"gate"``,
            ``"out"``.
        A: ``[rank, d_in]`` LoRA A matrix (fp32, CPU).
        B: ``[d_out, rank]`` LoRA B matrix (fp32, CPU).
        scaling: peft's scaling (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA), unitless.
    """

    name: str
    hf_name: str
    layer: int
    kind: str
    A: Float[Tensor, "rank d_in"]
    B: Float[Tensor, "d_out rank"]
    scaling: float

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return int(self.A.shape[0])

    @property
    def site(self) -> str:
        """``"attn"`` or ``"mlp"``: the sub-layer whose output this module changes."""
        return _KINDS[self.kind][0]

    @property
    def output_hook(self) -> str:
        """Where the sub-layer's output enters the residual stream (``hook_attn_out`` / ``hook_mlp_out``)."""
        return f"blocks.{self.layer}.hook_{self.site}_out"

    @property
    def input_hook(self) -> str:
        """The TransformerLens hook whose activation (flattened per token) is the module's input x."""
        return _KINDS[self.kind][2].format(l=self.layer)

    @property
    def writes_residual(self) -> bool:
        """True when the module's output is added to the residual stream directly (o / down projections)."""
        return _KINDS[self.kind][3]

    def delta_weight(self) -> Float[Tensor, "d_out d_in"]:
        """``ΔW = scaling · B · A`` in the Hugging Face ``nn.Linear`` layout ``[d_out, d_in]``."""
        return self.scaling * (self.B.double() @ self.A.double()).float()

    def _line(self) -> str:
        return (f"{self.name} ({self.hf_name}): rank {self.rank}, A {list(self.A.shape)}, B {list(self.B.shape)}, "
                f"scaling {self.scaling:.4g}, |dW|_F {float(self.delta_weight().norm()):.4g}")

    def __repr__(self) -> str:
        """Names, rank, the A/B shapes, the scaling and ‖ΔW‖_F (never the tensors)."""
        return f"LoraModule({self._line()})"

    def tl_deltas(self, cfg: Any) -> dict[str, Tensor]:
        """ΔW in TransformerLens's parameter names and layouts.

        E.g. ``{"blocks.L.attn.W_Q": [n_heads, d_model, d_head]}``.

        Grouped-query attention: K/V deltas go to ``_W_K`` / ``_W_V``
        (``[n_key_value_heads, d_model, d_head]``).
        """
        d = self.delta_weight()
        h = int(cfg.d_head)
        pre = f"blocks.{self.layer}"
        gqa = getattr(cfg, "n_key_value_heads", None) is not None
        kv = "_" if gqa else ""
        if self.kind == "q":
            return {f"{pre}.attn.W_Q": einops.rearrange(d, "(n h) m -> n m h", h=h)}
        if self.kind in ("k", "v"):
            return {f"{pre}.attn.{kv}W_{self.kind.upper()}": einops.rearrange(d, "(n h) m -> n m h", h=h)}
        if self.kind == "o":
            return {f"{pre}.attn.W_O": einops.rearrange(d, "m (n h) -> n h m", h=h)}
        if self.kind == "qkv_gpt2":
            q, k, v = torch.chunk(d, 3, dim=0)
            return {
                f"{pre}.attn.W_{c}": einops.rearrange(x, "(n h) m -> n m h", h=h)
                for c, x in zip("QKV", (q, k, v), strict=True)
            }
        if self.kind == "qkv_neox":
            qkv = einops.rearrange(d, "(n three h) m -> three n m h", three=3, h=h)
            return {f"{pre}.attn.W_{c}": qkv[i] for i, c in enumerate("QKV")}
        short = {"in": "W_in", "gate": "W_gate", "out": "W_out"}[self.kind]
        return {f"{pre}.mlp.{short}": d.T.contiguous()}

    def module_input(self, model: HookedModel, cache: Any) -> Float[Tensor, "batch pos d_in"]:
        """The module's input x_t from a run's cache (of :attr:`input_hook`).

        ``hook_z`` is flattened over heads (the ``o_proj`` input layout); for q/k/v and gate/up the
        normalised residual is multiplied by the LayerNorm / RMSNorm weight (and bias) as in the forward
        pass, since TransformerLens's ``hook_normalized`` is taken before them.
        """
        act = cache[self.input_hook]
        if self.kind == "o":
            return act.flatten(-2)
        if self.kind == "out":
            return act
        return ln_output(model, self.layer, "ln2" if self.site == "mlp" else "ln1", act)


def ln_output(model: HookedModel, layer: int, which: str, normalized: Tensor) -> Tensor:
    """``normalized * w + b`` of ``blocks.{layer}.{which}`` (what the sub-layer reads)."""
    ln = getattr(model.blocks[layer], which)
    w = getattr(ln, "w", None)
    b = getattr(ln, "b", None)
    out = normalized if w is None else normalized * w
    return out if b is None else out + b


def _expected_dims(kind: str, cfg) -> tuple[int, int]:
    """(d_out, d_in) of a module of this kind in the TL model."""
    dm, nh, dh = int(cfg.d_model), int(cfg.n_heads), int(cfg.d_head)
    nkv = int(getattr(cfg, "n_key_value_heads", None) or nh)
    dmlp = int(cfg.d_mlp or 0)
    return {
        "q": (nh * dh, dm),
        "k": (nkv * dh, dm),
        "v": (nkv * dh, dm),
        "qkv_gpt2": (3 * nh * dh, dm),
        "qkv_neox": (3 * nh * dh, dm),
        "o": (dm, nh * dh),
        "in": (dmlp, dm),
        "gate": (dmlp, dm),
        "out": (dm, dmlp),
    }[kind]


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter read from peft and mapped onto a TransformerLens model.

    Attributes:
        modules: the LoRA'd modules, in model order.
        base_model_name: ``base_model_name_or_path`` from the peft config (``None`` when unset).
        architecture: the Hugging Face architecture the adapter was made for, e.g. ``"LlamaForCausalLM"``.
        adapter_name: the peft adapter name that was read.
        peft_config: the adapter's peft ``LoraConfig`` as a JSON-ready dict.
    """

    modules: tuple[LoraModule, ...]
    base_model_name: str | None
    architecture: str
    adapter_name: str = "default"
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """TransformerLens-style module names, e.g. ``["blocks.1.mlp.W_out"]``."""
        return [m.name for m in self.modules]

    def __getitem__(self, name: str) -> LoraModule:
        for m in self.modules:
            if m.name == name or m.hf_name == name:
                return m
        raise KeyError(f"no LoRA module {name!r}; the adapter has {self.names}")

    def __len__(self) -> int:
        return len(self.modules)

    def sites(self) -> dict[str, list[LoraModule]]:
        """Modules grouped by the hook where their sub-layer writes the residual stream, in layer order."""
        out: dict[str, list[LoraModule]] = {}
        for m in sorted(self.modules, key=lambda m: (m.layer, m.site != "attn")):
            out.setdefault(m.output_hook, []).append(m)
        return out

    def to_pandas(self):
        """One row per module: name, Hugging Face name, layer, kind, rank, scaling, ‖ΔW‖_F."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "module": m.name,
                    "hf_module": m.hf_name,
                    "layer": m.layer,
                    "kind": m.kind,
                    "rank": m.rank,
                    "scaling": m.scaling,
                    "delta_w_fro": float(m.delta_weight().norm()),
                }
                for m in self.modules
            ]
        )

    def plot(self):
        """Bar chart of ‖ΔW‖_F per module (plotly figure)."""
        from steer_lens.plotting import bar

        norms = torch.tensor([float(m.delta_weight().norm()) for m in self.modules])
        return bar(norms, self.names, title="LoRA update size per module", y_title="‖ΔW‖_F")

    def __repr__(self) -> str:
        """Base model, architecture, the LoRA settings and one line per module (shapes, scaling,
        ‖ΔW‖_F); never the A/B tensors or the whole peft config."""
        c = self.peft_config
        targets = c.get("target_modules")
        settings = ", ".join(
            f"{k}={v!r}" for k, v in (("r", c.get("r")), ("lora_alpha", c.get("lora_alpha")),
                                      ("use_rslora", c.get("use_rslora")), ("target_modules", targets))
            if v is not None
        )
        rows = "".join(f"\n  {m._line()}" for m in self.modules)
        return (f"LoraAdapter(base={self.base_model_name!r}, {self.architecture}, adapter={self.adapter_name!r}, "
                f"{len(self.modules)} module(s){', ' + settings if settings else ''}){rows}")

    def _repr_html_(self) -> str:
        return (
            f"<b>LoraAdapter</b> for {self.base_model_name or self.architecture}: "
            f"{len(self.modules)} modules" + self.to_pandas().to_html(index=False)
        )


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def _check_target(
    model: HookedModel, architecture: str, base_name: str | None, allow_other_model: bool
) -> None:
    info = model_info(model)
    tl_arch = getattr(model.cfg, "original_architecture", None)
    if tl_arch and architecture and tl_arch != architecture:
        raise IncompatibleVectorError(
            f"the adapter was made for a {architecture} model ({base_name or 'unnamed'}); the given "
            f"TransformerLens model {info.name!r} is a {tl_arch}. Fix: load the adapter onto the base "
            "model it was trained on."
        )
    if base_name and not allow_other_model and not _same_name(base_name, info.name):
        raise IncompatibleVectorError(
            f"the adapter was made for base model {base_name!r}; the given model is {info.name!r}. "
            "Fix: load the adapter onto its base model, or pass allow_other_model=True (same shapes)."
        )


def _same_name(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.split("/")[-1] == b.split("/")[-1]


def load_adapter(
    model: HookedModel,
    adapter: str | Path | Any,
    *,
    adapter_name: str | None = None,
    base_model: Any = None,
    allow_other_model: bool = False,
) -> LoraAdapter:
    """Read a peft LoRA adapter and map each LoRA'd module onto the TransformerLens model's weights.

    peft loads the adapter (``PeftModel.from_pretrained`` on the Hugging Face base model); A, B and
    the scaling are read from peft's LoRA layers, so ``alpha/r`` vs rsLoRA's ``alpha/sqrt(r)`` is
    whatever peft used. Nothing is changed in ``model``.

    Args:
        model: the TransformerLens ``HookedTransformer`` the adapter is compared against (unprocessed
            weights, as :func:`steer_lens.load_model` gives).
        adapter: a peft adapter folder (``adapter_config.json`` + weights), a ``peft.PeftModel``, or
            the result of :func:`~steer_lens.lora.train_adapter`.
        adapter_name: which adapter of a multi-adapter ``PeftModel`` (default: the active one).
        base_model: the Hugging Face base model to load a folder onto (default: loaded by the name in
            the adapter config with ``AutoModelForCausalLM``; it is copied, never modified).
        allow_other_model: accept an adapter whose recorded base model name differs from the
            model's (shapes must still fit).

    Returns:
        A :class:`LoraAdapter` with fp32 CPU copies of every module's A and B.

    Raises:
        IncompatibleVectorError: the adapter was made for another base model or architecture (both named).
        ConfigError: LoRA'd modules that do not map onto TransformerLens weights (all listed), DoRA,
            LoRA biases or ``modules_to_save`` (not a low-rank update), no LoRA layer at all, or a model
            whose weights TransformerLens processed (fold_ln, centring).
        ShapeMismatchError: a module's A/B shapes do not fit the model's dimensions.
        NonFiniteError: NaN or inf in A, B or the scaling.
        MissingDependencyError: peft is not installed.
        FileNotFoundError: the folder has no ``adapter_config.json``.
    """
    peft = import_peft()
    peft_model = _as_peft_model(peft, model, adapter, base_model, allow_other_model)
    name = adapter_name or peft_model.active_adapter
    if isinstance(name, list | tuple):
        name = name[0]
    if name not in peft_model.peft_config:
        raise ConfigError(
            f"adapter_name: {name!r} is not in the PeftModel (has {list(peft_model.peft_config)})."
        )
    pcfg = peft_model.peft_config[name]
    architecture = type(peft_model.get_base_model()).__name__
    base_name = pcfg.base_model_name_or_path or None
    _check_target(model, architecture, base_name, allow_other_model)
    if getattr(pcfg, "modules_to_save", None):
        raise ConfigError(
            f"the adapter fully trains modules_to_save={list(pcfg.modules_to_save)}; that is not a low-rank "
            "update and cannot be compared as one. Fix: train the adapter without modules_to_save."
        )
    modules = _read_modules(peft_model, name, architecture)
    adapter_obj = LoraAdapter(
        modules=tuple(modules),
        base_model_name=base_name,
        architecture=architecture,
        adapter_name=name,
        peft_config=_jsonable(pcfg.to_dict()),
    )
    validate(model, adapter_obj)
    return adapter_obj


def _as_peft_model(peft: Any, model: HookedModel, adapter: Any, base_model: Any, allow_other_model: bool) -> Any:
    """The ``PeftModel`` of a folder (loaded onto a copy of the base), a PeftModel or a train_adapter result."""
    if hasattr(adapter, "peft_model") and not isinstance(adapter, peft.PeftModel):
        adapter = adapter.peft_model
    if isinstance(adapter, peft.PeftModel):
        return adapter
    if not isinstance(adapter, str | Path):
        raise ConfigError(
            f"adapter: expected a peft adapter folder, a peft.PeftModel or a train_adapter result, got "
            f"{type(adapter).__name__}."
        )
    folder = Path(adapter)
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"no adapter_config.json in {str(folder)!r}; expected a folder written by "
            "PeftModel.save_pretrained."
        )
    base_name = peft.PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if base_model is None:
        _check_target(model, "", base_name, allow_other_model)
        from transformers import AutoModelForCausalLM

        if not base_name:
            raise ConfigError(
                f"the adapter in {str(folder)!r} records no base model; pass base_model=<the Hugging "
                "Face model it was trained on>."
            )
        base_model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32, **_gguf_kwargs(model, base_name))
        if hasattr(base_model.config, "quantization_config"):
            del base_model.config.quantization_config  # GGUF weights are dequantised on load: plain tensors
    else:
        base_model = copy.deepcopy(base_model)
    with torch.random.fork_rng(devices=[]):  # peft initialises A and B before loading them: keep the user's RNG
        return peft.PeftModel.from_pretrained(base_model, str(folder))


def _gguf_kwargs(model: HookedModel, base_name: str) -> dict[str, Any]:
    """``{"gguf_file": ...}`` when ``model`` was loaded from a GGUF file of the repository ``base_name``
    (peft records only the repository name, not the file inside it)."""
    from steer_lens.models import model_info

    info = model_info(model)
    return {"gguf_file": info.gguf_file} if info.gguf_file and info.name == base_name else {}


def _read_modules(peft_model: Any, name: str, architecture: str) -> list[LoraModule]:
    """Every LoRA layer of adapter ``name`` as a :class:`LoraModule`, mapped by ``ARCHITECTURES``.

    Raises:
        ConfigError: DoRA or a LoRA bias; an unmapped architecture or module (all listed); no LoRA layer.
    """
    from peft.tuners.lora import LoraLayer

    table = ARCHITECTURES.get(architecture)
    modules: list[LoraModule] = []
    unmapped: list[str] = []
    for full, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        hf_name = re.sub(r"^base_model\.model\.", "", full)
        if name not in mod.lora_A:
            if name in getattr(mod, "lora_embedding_A", {}):
                unmapped.append(hf_name)
            continue
        module = _read_module(mod, name, hf_name, table)
        if module is None:
            unmapped.append(hf_name)
        else:
            modules.append(module)
    if table is None:
        raise ConfigError(
            f"LoRA on {architecture} models is not mapped onto TransformerLens weights yet (known: "
            f"{sorted(ARCHITECTURES)}). Add its module names to steer_lens.lora.ARCHITECTURES."
        )
    if unmapped:
        raise ConfigError(
            f"these LoRA'd modules do not map onto TransformerLens weights of a {architecture}: {unmapped}. "
            "Mappable modules are q/k/v/o and gate/up/down projections (and fused qkv where the "
            "architecture has it). Fix: train the adapter with target_modules among those."
        )
    if not modules:
        raise ConfigError(f"the adapter {name!r} has no LoRA layers.")
    return modules


def _read_module(mod: Any, name: str, hf_name: str, table: Any) -> LoraModule | None:
    """One peft LoRA layer as a :class:`LoraModule` (``None`` when ``table`` does not map it)."""
    if mod.use_dora.get(name, False):
        raise ConfigError(f"module {hf_name!r} uses DoRA; only plain LoRA (and rsLoRA) is supported.")
    if getattr(mod, "lora_bias", {}).get(name, False):
        raise ConfigError(
            f"module {hf_name!r} has a LoRA bias (lora_bias=True); only bias-free LoRA is supported."
        )
    for pattern, kind in table or ():
        mt = re.search(pattern, hf_name)
        if mt:
            layer = int(mt.group(1))
            site, tl_short = _KINDS[kind][0], _KINDS[kind][1]
            return LoraModule(
                name=f"blocks.{layer}.{'attn' if site == 'attn' else 'mlp'}.{tl_short}", hf_name=hf_name,
                layer=layer, kind=kind, A=mod.lora_A[name].weight.detach().float().cpu().clone(),
                B=mod.lora_B[name].weight.detach().float().cpu().clone(), scaling=float(mod.scaling[name]),
            )
    return None


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, set):
            v = sorted(v)
        if isinstance(v, str | int | float | bool | list | tuple | dict) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


def validate(model: HookedModel, lora: LoraAdapter) -> None:
    """Check every module against the model's dimensions and for NaN/inf.

    Raises:
        ConfigError: the model's weights were processed (``fold_ln``, centring): ΔW would not apply.
        ShapeMismatchError: a layer index out of range or A/B shapes that do not fit (expected vs got).
        NonFiniteError: NaN or inf in A, B or a scaling.
    """
    processing = model_info(model).processing()
    if any(processing.values()):
        raise ConfigError(
            f"the model's weights were processed by TransformerLens ({processing}); a LoRA's ΔW is defined "
            "on the Hugging Face weights, which folding LayerNorm or centring changes. Fix: load the model "
            "with unprocessed weights (steer_lens.load_model's default)."
        )
    n_layers = int(model.cfg.n_layers)
    for m in lora.modules:
        if not 0 <= m.layer < n_layers:
            raise ShapeMismatchError(
                f"module {m.hf_name!r} is in layer {m.layer}; the model has layers 0..{n_layers - 1}."
            )
        d_out, d_in = _expected_dims(m.kind, model.cfg)
        r = m.A.shape[0]
        if tuple(m.A.shape) != (r, d_in) or tuple(m.B.shape) != (d_out, r):
            raise ShapeMismatchError(
                f"module {m.hf_name!r}: expected A [r, {d_in}] and B [{d_out}, r] for this model, got A "
                f"{list(m.A.shape)} and B {list(m.B.shape)}. The adapter was made for another model size."
            )
        if not (torch.isfinite(m.A).all() and torch.isfinite(m.B).all() and math.isfinite(m.scaling)):
            raise NonFiniteError(
                f"module {m.hf_name!r}: the LoRA weights or scaling hold NaN or inf; "
                "retrain or fix the adapter."
            )


@torch.no_grad()
def merged_model(model: HookedModel, lora: LoraAdapter) -> HookedModel:
    """A new HookedTransformer with every module's ΔW = scaling·B·A added to its weights.

    The input model is not modified (the new model is a deep copy). With unprocessed weights the
    merged model reproduces the peft model's logits (tested to 1e-4 in fp32 on the real model).

    Args:
        model: the base ``HookedTransformer``.
        lora: the adapter from :func:`load_adapter`.

    Returns:
        A ``HookedTransformer`` in eval mode (same config, tokenizer and recorded model info).

    Raises:
        ShapeMismatchError, NonFiniteError: as :func:`validate`.
        ConfigError: a TransformerLens parameter the mapping needs does not exist in this model.
    """
    validate(model, lora)
    params = dict(model.named_parameters())
    deltas: dict[str, Tensor] = {}
    for m in lora.modules:
        for pname, d in m.tl_deltas(model.cfg).items():
            if pname not in params:
                raise ConfigError(f"module {m.hf_name!r} maps to {pname!r}, which this model does not have.")
            if tuple(params[pname].shape) != tuple(d.shape):
                raise ShapeMismatchError(
                    f"{pname}: expected a delta of shape {list(params[pname].shape)}, got {list(d.shape)}."
                )
            deltas[pname] = deltas.get(pname, 0) + d
    new = copy.deepcopy(model)
    new_params = dict(new.named_parameters())
    for pname, d in deltas.items():
        p = new_params[pname]
        p.add_(d.to(device=p.device, dtype=p.dtype))
    new.eval()
    return new
