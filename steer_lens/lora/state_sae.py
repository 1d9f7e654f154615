"""A BatchTopK SAE over the concatenated rank-1 LoRA activation state (Ward et al. 2025).

A rank-1 LoRA on every q/k/v/o and gate/up/down projection of an ``n_layers`` model has ``7 · n_layers``
scalar "neurons" ``a_m(x_t) = A_m · x_t`` (one per module, the input of module ``m`` at token ``t``).
Ward, Riechers and Shai, "Rank-1 LoRAs Encode Interpretable Reasoning Signals" (2025), concatenate
them per token into one vector, the *LoRA activation state*, and train a BatchTopK sparse autoencoder
on those vectors to find features that span several adapters:

* :func:`lora_activation_state`: the state ``[n_tokens, n_modules]`` of an adapter over texts, its
  columns ordered per layer as in the paper (gate, up, down, q, k, v, o);
* :func:`train_lora_state_sae`: sae-lens's ``BatchTopKTrainingSAE`` trained by sae-lens's
  ``SAETrainer`` on those vectors with the paper's settings (:class:`LoraStateSAEConfig`);
* :func:`top_activating_examples`: the tokens where a latent fires most, with their context, ranked
  by activation × ‖W_dec‖ (the BatchTopK value score).

BatchTopK (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders") keeps, over a whole batch of
``B`` tokens, the ``k · B`` largest value scores ``pre_i · ‖W_dec,i‖`` and zeroes the rest, so ``k`` is
the *mean* L0. After training, sae-lens saves it as a JumpReLU SAE whose threshold is the running
minimum kept value score, which encodes each token on its own.

Public code: jnward/reasoning-lora-interp at 9b103c4 -- state layout
``2_lora_activation_interp/2.0_extract_lora_activations.py:98-175`` (``A · x`` per module, stored
``[n_tokens, n_layers, 7]``) flattened in ``3_lora_sae/3.0_train_sae.py:164-197``; the SAE in
``3_lora_sae/batch_topk_sae.py:37-65``; training in ``3_lora_sae/3.0_train_sae.py:239-271, 385-419``;
top examples in ``3_lora_sae/3.1_collect_sae_features.py:61-114``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import token_pieces
from steer_lens.config_types import check_field_types
from steer_lens.errors import ConfigError, EmptyInputError, NonFiniteError, ShapeMismatchError
from steer_lens.lora._common import check_hooks
from steer_lens.lora.adapter import LoraAdapter, LoraModule, merged_model, validate
from steer_lens.lora.comparison import Texts, prepare_texts
from steer_lens.models import HookedModel
from steer_lens.results import Result
from steer_lens.sae._core import sae_lens

__all__ = [
    "LoraActivationState",
    "LoraStateSAE",
    "LoraStateSAEConfig",
    "lora_activation_state",
    "train_lora_state_sae",
]

logger = logging.getLogger(__name__)

_INFO_FILE = "lora_state_sae.json"

# Column order within a layer, as the paper stores it: gate, up, down, q, k, v, o
# (2.0_extract_lora_activations.py:170-175 with adapter_types from 3.0_train_sae.py:248).
# A fused qkv module takes q's place.
_PAPER_ORDER = {"gate": 0, "in": 1, "out": 2, "q": 3, "qkv_gpt2": 3, "qkv_neox": 3, "k": 4, "v": 5, "o": 6}


# ---------------------------------------------------------------------------------------------------
# the activation state
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LoraActivationState(Result):
    """Per-token LoRA activation state: the scalars ``A · x_t`` of every module, concatenated (CPU).

    Attributes:
        states: ``[n_tokens, n_modules]`` activations ``A · x_t`` (unscaled: the LoRA's write is
            ``scaling · B`` times them), fp32; one row per kept token, texts concatenated.
        modules: the column names, e.g. ``"blocks.0.mlp.W_gate"`` (a rank-r module gives r columns
            ``"name[c]"``), per layer in the paper's order gate, up (``W_in``), down (``W_out``), q, k, v, o.
        text: ``[n_tokens]`` index of each row's text.
        position: ``[n_tokens]`` position of each row in its text (0 = the first token, BOS for strings).
        str_tokens: per text, all its tokens as strings (ids as strings without a tokenizer).
    """

    states: Float[Tensor, "n_tokens n_modules"]
    modules: tuple[str, ...]
    text: Int[Tensor, " n_tokens"]
    position: Int[Tensor, " n_tokens"]
    str_tokens: tuple[tuple[str, ...], ...] = field(repr=False)

    @property
    def n_tokens(self) -> int:
        """Rows of :attr:`states`."""
        return int(self.states.shape[0])

    def to_pandas(self):
        """One row per module: mean, standard deviation and max |A·x| over the tokens."""
        import pandas as pd

        s = self.states
        return pd.DataFrame({"module": list(self.modules), "mean": s.mean(0).tolist(),
                             "std": s.std(0, unbiased=False).tolist(), "max_abs": s.abs().amax(0).tolist()})

    def plot(self):
        """Bar chart of each module's standard deviation over tokens (plotly Figure)."""
        from steer_lens.plotting import bar

        return bar(self.states.std(0, unbiased=False), list(self.modules), title="LoRA activation state",
                   y_title="std of A·x over tokens")

    def _summary(self) -> str:
        return f"<b>LoraActivationState</b>: {self.n_tokens} tokens × {len(self.modules)} modules"


def _paper_order(lora: LoraAdapter) -> list[LoraModule]:
    return sorted(lora.modules, key=lambda m: (m.layer, _PAPER_ORDER[m.kind]))


def _column_names(modules: list[LoraModule]) -> tuple[str, ...]:
    return tuple(m.name if m.rank == 1 else f"{m.name}[{c}]" for m in modules for c in range(m.rank))


@torch.no_grad()
def lora_activation_state(
    model: HookedModel,
    lora: LoraAdapter,
    texts: Texts,
    *,
    batch_size: int = 16,
    keep_bos: bool = False,
    tuned: HookedModel | None = None,
) -> LoraActivationState:
    """The LoRA activation state: per token, every module's ``A · x_t`` concatenated into one vector.

    Runs the LoRA model (``merged_model``; peft's forward gives the same inputs) once per batch with
    TransformerLens hooks, reads each module's input ``x_t`` (as :func:`adapter_activations`: the
    normalised residual times the norm's weight for q/k/v/gate/up, ``hook_z`` flattened for o,
    ``mlp.hook_post`` for down) and projects it on the module's A. Columns are ordered per layer
    gate, up, down, q, k, v, o as the paper stores them
    (``2_lora_activation_interp/2.0_extract_lora_activations.py:98-175``: forward hooks, ``A · x`` per
    module into a ``[n_tokens, n_layers, 7]`` array; ``3_lora_sae/3.0_train_sae.py:164-197`` flattens it
    to ``n_layers · 7``).

    Args:
        model: the base ``HookedTransformer`` (unprocessed weights).
        lora: the adapter (:func:`~steer_lens.lora.load_adapter`); rank 1 in the paper, rank r gives r
            columns per module.
        texts: strings (BOS prepended) or token ids, as :func:`~steer_lens.lora.compare`.
        batch_size: texts per forward pass.
        keep_bos: keep the rows of a leading BOS token (dropped by default: the paper's Qwen prompts have
            no BOS, and BOS activations are outliers that would dominate an SAE's MSE). Without a
            tokenizer nothing is dropped.
        tuned: the merged model if you already have it.

    Returns:
        A :class:`LoraActivationState` (``states`` is ``[n_tokens, n_modules]``, fp32, CPU).

    Raises:
        EmptyInputError: no texts, or no token left after dropping BOS.
        SequenceTooLongError: a text longer than ``n_ctx``.
        ConfigError: ``batch_size`` < 1; processed weights; hook points the model lacks.
        ShapeMismatchError, NonFiniteError: the adapter does not fit the model (:func:`validate`).
    """
    validate(model, lora)
    batches = prepare_texts(model, texts, batch_size)
    modules = _paper_order(lora)
    hooks = sorted({m.input_hook for m in modules})
    check_hooks(model, hooks)
    tuned = merged_model(model, lora) if tuned is None else tuned
    tok = getattr(model, "tokenizer", None)
    bos = None if tok is None or keep_bos else tok.bos_token_id
    rows, text_idx, pos_idx, str_tokens = [], [], [], []
    t0 = 0
    for toks, real in batches:
        _, cache = tuned.run_with_cache(toks, names_filter=hooks, return_type=None)
        xs = [m.module_input(model, cache) for m in modules]
        state = torch.cat([x @ m.A.to(x.device, x.dtype).T for x, m in zip(xs, modules, strict=True)], dim=-1)
        keep = real.clone()
        if bos is not None:
            keep[:, 0] &= toks[:, 0] != bos
        b, p = keep.shape
        rows.append(state[keep].float().cpu())
        text_idx.append((torch.arange(b, device=keep.device)[:, None] + t0).expand(b, p)[keep].cpu())
        pos_idx.append(torch.arange(p, device=keep.device).expand(b, p)[keep].cpu())
        for i, n in enumerate(real.sum(1).tolist()):
            ids = toks[i, :n].tolist()
            str_tokens.append(tuple(token_pieces(tok, ids)) if tok is not None else tuple(map(str, ids)))
        t0 += b
    states = torch.cat(rows)
    if states.shape[0] == 0:
        raise EmptyInputError("texts: no token besides BOS. Fix: pass longer texts, or keep_bos=True.")
    return LoraActivationState(states=states, modules=_column_names(modules), text=torch.cat(text_idx),
                               position=torch.cat(pos_idx), str_tokens=tuple(str_tokens))


# ---------------------------------------------------------------------------------------------------
# the SAE
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LoraStateSAEConfig:
    """Settings of :func:`train_lora_state_sae`; the defaults are the paper's (validated on construction).

    Attributes:
        expansion: latents per input dimension, ``d_sae = expansion · n_modules``
            (``3_lora_sae/3.0_train_sae.py:242, 313``: 8).
        k: mean active latents per token, BatchTopK over the batch (``3.0_train_sae.py:239``: 16).
        aux_k_coefficient: weight α of the AuxK dead-latent loss (``3.0_train_sae.py:243``: 1/32), passed
            to sae-lens as ``aux_loss_coefficient``.
        dead_tokens: tokens without firing after which a latent is dead and AuxK trains it
            (``3.0_train_sae.py:271``: 1e6); sae-lens counts steps, so ``dead_tokens // batch_size``.
        lr: Adam learning rate (``3.0_train_sae.py:240``: 5e-4; default betas, ``:354``).
        warmup_steps: linear learning-rate warm-up steps, then constant (``3.0_train_sae.py:269, 128-149``:
            100, no decay).
        batch_size: tokens per optimiser step (``3.0_train_sae.py:241``: 512).
        epochs: passes over the states, reshuffled each pass (``3.0_train_sae.py:366``: 1, shuffled
            once, ``:223-226``).
        seed: seed of initialisation and shuffling (``3.0_train_sae.py:244``: 42).
    """

    expansion: int = 8
    k: int = 16
    aux_k_coefficient: float = 1 / 32
    dead_tokens: int = 1_000_000
    lr: float = 5e-4
    warmup_steps: int = 100
    batch_size: int = 512
    epochs: int = 1
    seed: int = 42

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("expansion", "k", "dead_tokens", "batch_size", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}. Fix: pass e.g. "
                                  f"{name}={getattr(LoraStateSAEConfig, name)}.")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: expected a non-negative integer, got {v!r}.")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: expected a positive finite number, got {self.lr!r}. Fix: lr=5e-4.")
        a = self.aux_k_coefficient
        if isinstance(a, bool) or not (isinstance(a, int | float) and math.isfinite(a) and a >= 0):
            raise ConfigError(f"aux_k_coefficient: expected a finite number >= 0, got {a!r}. Fix: 1/32.")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class LoraStateSAE(Result):
    """A BatchTopK SAE trained on LoRA activation states (:func:`train_lora_state_sae`).

    Attributes:
        sae: sae-lens's inference SAE (a ``JumpReLUSAE``, as sae-lens saves a BatchTopK SAE: decoder
            rows unit-norm, so its activations are the value scores activation × ‖W_dec‖; threshold =
            sae-lens's running minimum kept score). ``cfg.metadata.lora_state_modules`` holds the columns.
        modules: the input columns (module names), ``d_in`` of them.
        config: the :class:`LoraStateSAEConfig` used.
        decoder_norms: ``[d_sae]`` ‖W_dec,i‖ of the trained decoder before sae-lens folded it; the
            paper's raw latent activation is ``encode(x) / decoder_norms``.
        mse: mean over tokens of ‖x − x̂‖² on the training states (``encode``'s default batch mode).
        fvu: fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − mean x‖²`` (as ``3.0_train_sae.py:394-398``).
        l0: mean active latents per token (batch mode: ``k`` unless fewer scores are positive).
        dead_latents: latents that never fire on the training states.
        seconds: wall-clock time of the sae-lens training loop, seconds.
        n_training_tokens: vectors the optimiser saw.
    """

    sae: Any
    modules: tuple[str, ...]
    config: LoraStateSAEConfig
    decoder_norms: Float[Tensor, " d_sae"]
    mse: float
    fvu: float
    l0: float
    dead_latents: int
    seconds: float
    n_training_tokens: int

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.sae.cfg.d_sae)

    @torch.no_grad()
    def encode(
        self, states: LoraActivationState | Tensor, *, mode: str = "batch", batch_size: int = 2048,
    ) -> Float[Tensor, "n_tokens d_sae"]:
        """Latent activations (activation × ‖W_dec‖) ``[n_tokens, d_sae]`` of states ``[n_tokens, n_modules]``, fp32 CPU.

        ``mode="batch"`` (default): BatchTopK over consecutive chunks of ``batch_size`` tokens, as the
        paper encodes for its top examples (``3_lora_sae/3.1_collect_sae_features.py:159, 190-196``:
        chunks of 2048), so L0 is ``k`` on average. ``mode="threshold"``: sae-lens's JumpReLU inference,
        each token on its own; its threshold is an EMA (rate 0.01, from 0) of the smallest kept score,
        biased low after a short training (L0 above ``k``).

        Raises:
            ConfigError: unknown ``mode`` or ``batch_size`` < 1. ShapeMismatchError: wrong width.
        """
        if mode not in ("threshold", "batch"):
            raise ConfigError(f"mode: expected 'threshold' or 'batch', got {mode!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}.")
        x = _as_matrix(states, self.modules)
        from sae_lens.saes.batchtopk_sae import BatchTopK

        dev = self.sae.W_dec.device
        out = []
        for chunk in x.split(batch_size):
            c = chunk.to(dev, self.sae.dtype)
            if mode == "threshold":
                out.append(self.sae.encode(c).float().cpu())
            else:
                pre = self.sae.process_sae_in(c) @ self.sae.W_enc + self.sae.b_enc
                out.append(BatchTopK(self.config.k)(pre).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(
        self, states: LoraActivationState | Tensor, *, mode: str = "batch"
    ) -> Float[Tensor, "n_tokens n_modules"]:
        """``x̂ = decode(encode(x, mode=mode))`` ``[n_tokens, n_modules]``, fp32 CPU.

        Raises:
            ConfigError: unknown ``mode``. ShapeMismatchError: states of another width.
            NonFiniteError: NaN or inf.
        """
        acts = self.encode(states, mode=mode)
        return self.sae.decode(acts.to(self.sae.W_dec.device, self.sae.dtype)).float().cpu()

    def save(self, folder: str | os.PathLike) -> Path:
        """Save to ``folder``: sae-lens's files (``cfg.json`` + ``sae_weights.safetensors``, loadable with
        ``SAE.load_from_disk``) plus ``lora_state_sae.json`` (columns, config, decoder norms, statistics).
        Written as a whole (:func:`~steer_lens.vectors.io.atomic_folder`). Returns the folder."""
        from steer_lens.vectors.io import atomic_folder, atomic_write_json

        info = {"modules": list(self.modules), "config": self.config.to_dict(),
                "decoder_norms": self.decoder_norms.tolist(), "mse": self.mse, "fvu": self.fvu, "l0": self.l0,
                "dead_latents": self.dead_latents, "seconds": self.seconds,
                "n_training_tokens": self.n_training_tokens}
        with atomic_folder(folder) as tmp:
            self.sae.save_model(tmp)
            atomic_write_json(tmp / _INFO_FILE, info)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, device: str = "cpu") -> LoraStateSAE:
        """Load what :meth:`save` wrote.

        Raises:
            FileNotFoundError: ``folder`` lacks ``lora_state_sae.json`` or sae-lens's files.
            ShapeMismatchError: the SAE's ``d_in`` differs from the saved columns.
        """
        folder = Path(folder)
        if not (folder / _INFO_FILE).exists() or not (folder / "cfg.json").exists():
            raise FileNotFoundError(f"{str(folder)!r} has no {_INFO_FILE} and cfg.json; expected a folder "
                                    "written by LoraStateSAE.save.")
        info = json.loads((folder / _INFO_FILE).read_text())
        sae = sae_lens().SAE.load_from_disk(str(folder), device=device)
        sae.eval()
        for p in sae.parameters():
            p.requires_grad_(False)
        if int(sae.cfg.d_in) != len(info["modules"]):
            raise ShapeMismatchError(f"{str(folder)!r}: the SAE reads {sae.cfg.d_in} inputs but "
                                     f"{len(info['modules'])} columns were saved; the folder is inconsistent.")
        return cls(sae=sae, modules=tuple(info["modules"]), config=LoraStateSAEConfig(**info["config"]),
                   decoder_norms=torch.tensor(info["decoder_norms"], dtype=torch.float32), mse=info["mse"],
                   fvu=info["fvu"], l0=info["l0"], dead_latents=info["dead_latents"], seconds=info["seconds"],
                   n_training_tokens=info["n_training_tokens"])

    def to_pandas(self):
        """One row: d_in, d_sae, k, tokens, MSE, FVU, L0, dead latents, seconds."""
        import pandas as pd

        return pd.DataFrame([{"d_in": len(self.modules), "d_sae": self.d_sae, "k": self.config.k,
                              "training_tokens": self.n_training_tokens, "mse": self.mse, "fvu": self.fvu,
                              "l0": self.l0, "dead_latents": self.dead_latents, "seconds": self.seconds}])

    def plot(self):
        """Each latent's input-side weights: heatmap of the unit decoder rows ``[d_sae, n_modules]``."""
        import plotly.graph_objects as go

        W = self.sae.W_dec.detach().float().cpu()
        return go.Figure(go.Heatmap(z=W.tolist(), x=list(self.modules), colorscale="RdBu", zmid=0)).update_layout(
            title="LoRA-state SAE decoder directions", xaxis_title="module", yaxis_title="latent")

    def _summary(self) -> str:
        return (f"<b>LoraStateSAE</b>: {len(self.modules)} → {self.d_sae} latents, FVU {self.fvu:.3f}, "
                f"L0 {self.l0:.1f}")


def _as_matrix(states: Any, modules: tuple[str, ...] | None = None) -> Tensor:
    """``states`` (a :class:`LoraActivationState` or a 2-D tensor) as a finite fp32 ``[n, d]`` tensor.

    Raises:
        ConfigError: not a state or tensor. ShapeMismatchError: not 2-D, or a width/columns other than
        ``modules``. EmptyInputError: no rows. NonFiniteError: NaN or inf.
    """
    if isinstance(states, LoraActivationState):
        if modules is not None and tuple(states.modules) != tuple(modules):
            raise ShapeMismatchError(
                f"states: the columns {list(states.modules)[:4]}... differ from the SAE's "
                f"{list(modules)[:4]}... ({len(states.modules)} vs {len(modules)}). Fix: compute the state "
                "with the adapter the SAE was trained on.")
        x = states.states
    elif isinstance(states, Tensor):
        x = states
    else:
        raise ConfigError(f"states: expected a LoraActivationState or a 2-D tensor, got {type(states).__name__}.")
    if x.ndim != 2:
        raise ShapeMismatchError(f"states: expected [n_tokens, n_modules], got shape {list(x.shape)}.")
    if modules is not None and x.shape[1] != len(modules):
        raise ShapeMismatchError(f"states: expected {len(modules)} columns (the SAE's d_in), got {x.shape[1]}.")
    if x.shape[0] == 0:
        raise EmptyInputError("states: no rows. Fix: compute the state over at least one token.")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise NonFiniteError("states: NaN or inf values. Fix: check the adapter and texts that produced them.")
    return x


def train_lora_state_sae(
    states: LoraActivationState | Tensor,
    *,
    config: LoraStateSAEConfig | None = None,
    device: str | None = None,
    **overrides: Any,
) -> LoraStateSAE:
    """Train a BatchTopK SAE on LoRA activation states with sae-lens (the paper's settings by default).

    The glue only: the states are shuffled (seeded) and fed batch by batch to sae-lens's ``SAETrainer``
    training a ``BatchTopKTrainingSAE``: ``d_sae = expansion · d_in``, BatchTopK with mean L0 ``k``
    selecting by pre-activation × ‖W_dec‖ (``3_lora_sae/batch_topk_sae.py:42-55``), MSE plus α·AuxK
    (``3.0_train_sae.py:385-413``), Adam, 100 warm-up steps, one epoch, no input normalisation and no
    ``b_dec`` subtracted from the input (``batch_topk_sae.py:35``). Weights start as the paper's
    (``batch_topk_sae.py:23-29``: ``W_enc`` Kaiming-uniform for ReLU, ``W_dec = W_enc.T``).

    Where sae-lens differs from the paper's hand-written loop (left as sae-lens does it): its BatchTopK
    applies ReLU before selecting (the paper can keep negative scores when fewer than ``k·B`` are
    positive); its AuxK picks ``d_in // 2`` dead latents per token from the input's pre-activations,
    scaled by ``min(n_dead / k_aux, 1)`` (the paper: ``k`` dead latents from the residual's,
    ``3.0_train_sae.py:70-125``); it clips the gradient norm to 1; it drops a last partial batch.

    Args:
        states: a :class:`LoraActivationState` or any ``Float[Tensor, "n_tokens d_in"]`` of vectors (the shape
            is checked here, with a named error, rather than by the annotation).
        config: a :class:`LoraStateSAEConfig` (default: the paper's settings).
        device: where to train (default: the states' device).
        **overrides: any :class:`LoraStateSAEConfig` field, e.g. ``k=8``.

    Returns:
        A :class:`LoraStateSAE` (sae-lens's inference SAE plus MSE / FVU / L0 on the states).

    Raises:
        ConfigError: an unknown or invalid setting; fewer tokens than ``batch_size``.
        ShapeMismatchError: states not 2-D. EmptyInputError: no rows. NonFiniteError: NaN or inf.
        MissingDependencyError: sae-lens is not installed.
    """
    unknown = set(overrides) - set(LoraStateSAEConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}; known: "
                          f"{sorted(LoraStateSAEConfig.__dataclass_fields__)}.")
    cfg = LoraStateSAEConfig(**{**(config.to_dict() if config is not None else {}), **overrides})
    x = _as_matrix(states)
    n, d_in = x.shape
    if n < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {n} tokens of states. Fix: collect "
                          f"more tokens or pass batch_size<={n}.")
    modules = states.modules if isinstance(states, LoraActivationState) else tuple(f"dim{i}" for i in range(d_in))
    sl_ = sae_lens()
    dev = torch.device(device) if device is not None else x.device
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):  # the user's RNG state is left as it was
        torch.manual_seed(cfg.seed)
        return _fit(sl_, x, modules, cfg, str(dev))


def _paper_init(tsae: Any) -> None:
    """``W_enc`` Kaiming-uniform (ReLU gain, fan-in ``d_sae``) and ``W_dec = W_enc.T``, biases 0
    (``batch_topk_sae.py:13-29``)."""
    with torch.no_grad():
        w = torch.empty(tsae.cfg.d_in, tsae.cfg.d_sae, dtype=tsae.W_enc.dtype)
        torch.nn.init.kaiming_uniform_(w, nonlinearity="relu")
        tsae.W_enc.copy_(w)
        tsae.W_dec.copy_(w.T)
        tsae.b_enc.zero_()
        tsae.b_dec.zero_()


def _shuffled_batches(x: Tensor, batch_size: int, device: str) -> Iterator[Tensor]:
    """Batches of a fresh permutation of ``x`` per epoch (last partial batch dropped), forever."""
    while True:
        perm = torch.randperm(x.shape[0])
        for i in range(x.shape[0] // batch_size):
            yield x[perm[i * batch_size : (i + 1) * batch_size]].to(device)


def _fit(sl_: Any, x: Tensor, modules: tuple[str, ...], cfg: LoraStateSAEConfig, device: str) -> LoraStateSAE:
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    n, d_in = x.shape
    bs = cfg.batch_size
    steps = (n // bs) * cfg.epochs
    scfg = sl_.BatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=cfg.expansion * d_in, k=cfg.k, aux_loss_coefficient=cfg.aux_k_coefficient,
        apply_b_dec_to_input=False, normalize_activations="none", decoder_init_norm=None,
        rescale_acts_by_decoder_norm=True, device=device, dtype="float32",
    )
    tsae = sl_.BatchTopKTrainingSAE(scfg)
    _paper_init(tsae)
    tsae.cfg.metadata.hook_name = "lora_activation_state"
    tsae.cfg.metadata.lora_state_modules = list(modules)
    tcfg = SAETrainerConfig(
        total_training_samples=steps * bs, train_batch_size_samples=bs, lr=cfg.lr, lr_end=cfg.lr,
        lr_warm_up_steps=min(cfg.warmup_steps, steps - 1), device=device,
        dead_feature_window=max(1, cfg.dead_tokens // bs), feature_sampling_window=max(1, min(steps, 1000)),
        n_batches_for_norm_estimate=1, logger=LoggingConfig(log_to_wandb=False),
    )
    provider = _shuffled_batches(x, bs, device)
    trainer = sl_.SAETrainer(cfg=tcfg, sae=tsae, data_provider=provider)
    t0 = time.perf_counter()
    try:
        tsae = trainer.fit()
    finally:
        provider.close()
    seconds = time.perf_counter() - t0
    norms = tsae.W_dec.detach().norm(dim=-1).float().cpu()
    sae = _to_inference(sl_, tsae)
    result = LoraStateSAE(sae=sae, modules=modules, config=cfg, decoder_norms=norms, mse=float("nan"),
                          fvu=float("nan"), l0=float("nan"), dead_latents=0, seconds=seconds,
                          n_training_tokens=int(trainer.n_training_samples))
    acts = result.encode(x)
    x_hat = sae.decode(acts.to(sae.W_dec.device)).float().cpu()
    err = (x - x_hat).pow(2).sum()
    fvu = float(err / (x - x.mean(0)).pow(2).sum().clamp(min=1e-30))
    stats = dict(mse=float(err / n), fvu=fvu, l0=float((acts > 0).sum(1).float().mean()),
                 dead_latents=int((acts > 0).sum(0).eq(0).sum()))
    logger.info("LoRA-state SAE %d -> %d: FVU %.3f, L0 %.1f, dead %d, %.1f s", d_in, result.d_sae, fvu,
                stats["l0"], stats["dead_latents"], seconds)
    return LoraStateSAE(**{**{f: getattr(result, f) for f in LoraStateSAE.__dataclass_fields__}, **stats})


def _to_inference(sl_: Any, tsae: Any) -> Any:
    """sae-lens training SAE -> its inference SAE in memory (as ``save_inference_model`` writes it: a
    BatchTopK SAE becomes a JumpReLU SAE with unit decoder rows)."""
    state = {k: v.detach().clone() for k, v in tsae.state_dict().items()}
    tsae.process_state_dict_for_saving_inference(state)
    sae = sl_.SAE.from_dict(tsae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae
