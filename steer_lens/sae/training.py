"""Loading, training and evaluating sparse autoencoders (SAEs) with sae-lens.

* :func:`load` wraps ``SAE.load_from_disk`` / ``SAE.from_pretrained`` and records the hook the SAE
  reads.
* :func:`train` streams residual-stream activations from a model over a corpus (TransformerLens hooks,
  shuffled in sae-lens's mixing buffer) into sae-lens's own ``SAETrainer`` (TopK or standard ReLU+L1
  SAE), then reports :func:`evaluate`'s quality numbers on held-out text.
* :func:`sample_corpus` builds a training corpus by sampling stories from the model itself, for models
  whose real text is too small to train an SAE on.

Methods: TopK SAEs (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), ReLU SAEs with an
L1 penalty (Bricken et al. 2023, "Towards Monosemanticity"); the loss-recovered metric as in sae-lens's
evals (zero ablation as the reference).

:func:`evaluate` and :class:`SAEQuality` live in :mod:`steer_lens.sae.evaluation` and
:func:`sample_corpus` in :mod:`steer_lens.sae.corpus`; all three are importable from here too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from steer_lens._utils import device_of, unwrap
from steer_lens.config_types import check_field_types
from steer_lens.errors import ConfigError, EmptyInputError, ModelNotAvailableError
from steer_lens.models import check_hook_names, model_info
from steer_lens.results import Result
from steer_lens.sae._core import ModelLike, check_nonempty, hook_width, iter_batches, run_kwargs, sae_lens
from steer_lens.sae.corpus import sample_corpus
from steer_lens.sae.evaluation import SAEQuality, evaluate
from steer_lens.vectors.io import atomic_folder, atomic_write_json

__all__ = ["SAEQuality", "SAETrainConfig", "TrainedSAE", "evaluate", "load", "sample_corpus", "train"]

logger = logging.getLogger(__name__)

QUALITY_FILE = "steer_lens_quality.json"


# ---------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------
def load(
    path_or_release: str | os.PathLike,
    *,
    hook: str | None = None,
    sae_id: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
) -> Any:
    """Load a sae-lens SAE from a folder (``SAE.load_from_disk``) or a pretrained release
    (``SAE.from_pretrained``).

    Args:
        path_or_release: a folder holding ``cfg.json`` + ``sae_weights.safetensors`` (sae-lens format,
            as written by :meth:`TrainedSAE.save` or ``SAE.save_model``), or a sae-lens release name
            such as ``"gpt2-small-res-jb"`` (then ``sae_id`` is required).
        hook: the hook point the SAE reads, e.g. ``"blocks.0.hook_resid_post"``. Checked against the
            SAE's ``metadata.hook_name`` when that is set; stored there when it is not.
        sae_id: the SAE's id within a release (ignored for folders).
        device: where to put the SAE.
        dtype: override of the SAE's dtype (``None``: as saved).

    Returns:
        A sae-lens ``SAE`` (``TopKSAE``, ``StandardSAE``, ...) in eval mode.

    Raises:
        FileNotFoundError: not a folder, and no ``sae_id`` was given for a release.
        ConfigError: ``hook`` differs from the SAE's own hook; unknown release or id.
        ModelNotAvailableError: a release that is neither cached nor downloadable (offline).
        MissingDependencyError: sae-lens is not installed (``pip install steer-lens[sae]``).
    """
    sl_ = sae_lens()
    path = Path(path_or_release)
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(
                f"{str(path)!r} has no cfg.json; expected a sae-lens SAE folder (cfg.json + "
                "sae_weights.safetensors) as written by TrainedSAE.save or SAE.save_model."
            )
        sae = sl_.SAE.load_from_disk(path, device=str(device), dtype=dtype)
    else:
        if sae_id is None:
            raise FileNotFoundError(
                f"{str(path_or_release)!r} is not a folder; to load a pretrained release pass its "
                "sae_id too, e.g. sl.sae.load('gpt2-small-res-jb', sae_id='blocks.8.hook_resid_pre')."
            )
        try:
            sae = sl_.SAE.from_pretrained(
                str(path_or_release), sae_id, device=str(device), dtype=dtype or "float32"
            )
        except ValueError as e:
            raise ConfigError(f"sae-lens could not find release/id: {e}") from e
        except OSError as e:
            raise ModelNotAvailableError(
                f"could not download SAE {path_or_release!r}/{sae_id!r} ({e}). Fix: go online once, or "
                "train one with sl.sae.train(model, hook, texts)."
            ) from e
    meta_hook = getattr(sae.cfg.metadata, "hook_name", None)
    if hook is not None:
        if meta_hook is not None and meta_hook != hook:
            raise ConfigError(
                f"hook: the SAE at {str(path_or_release)!r} was trained on {meta_hook!r}, got "
                f"hook={hook!r}. Fix: pass hook={meta_hook!r} or leave it out."
            )
        sae.cfg.metadata.hook_name = hook
    sae.eval()
    return sae


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """Settings of :func:`train` (validated on construction).

    Attributes:
        architecture: ``"topk"`` (TopK SAE with the AuxK dead-feature loss) or ``"standard"`` (ReLU SAE
            with an L1 penalty).
        d_sae: number of features.
        k: active features per token (TopK).
        l1_coefficient: L1 penalty weight (standard).
        training_tokens: activations to train on (the corpus is cycled when smaller).
        batch_size: activations per optimiser step.
        lr: Adam learning rate; the last ``lr_decay_fraction`` of steps decay it linearly to 0.
        lr_decay_fraction: fraction of steps with linear decay, in [0, 1).
        buffer_size: activations held in the shuffling buffer (sae-lens ``mixing_buffer``).
        text_batch_size: texts per model forward pass when collecting activations.
        context_size: maximum tokens per text (longer texts are truncated).
        normalize_activations: scale activations to mean norm ``sqrt(d_in)`` while training (the scale
            is folded into the weights afterwards; sae-lens ``expected_average_only_in``).
        dead_feature_window: optimiser steps without firing after which a feature counts as dead
            (and the TopK AuxK loss starts training it).
        seed: seed of initialisation and shuffling.
    """

    architecture: Literal["topk", "standard"] = "topk"
    d_sae: int = 1024
    k: int = 16
    l1_coefficient: float = 5.0
    training_tokens: int = 200_000
    batch_size: int = 512
    lr: float = 4e-3
    lr_decay_fraction: float = 0.3
    buffer_size: int = 32_768
    text_batch_size: int = 32
    context_size: int = 512
    normalize_activations: bool = True
    dead_feature_window: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.architecture not in ("topk", "standard"):
            raise ConfigError(f"architecture: expected 'topk' or 'standard', got {self.architecture!r}.")
        for name in ("d_sae", "training_tokens", "batch_size", "buffer_size", "text_batch_size",
                     "context_size", "dead_feature_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"k: expected an integer in [1, d_sae={self.d_sae}], got {self.k!r}.")
        if self.buffer_size < self.batch_size:
            raise ConfigError(
                f"buffer_size: expected >= batch_size={self.batch_size}, got {self.buffer_size}."
            )
        if self.training_tokens < self.batch_size:
            raise ConfigError(
                f"training_tokens: expected >= batch_size={self.batch_size}, got {self.training_tokens}."
            )
        for name in ("lr", "l1_coefficient"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: expected a positive finite number, got {v!r}.")
        if not 0 <= self.lr_decay_fraction < 1:
            raise ConfigError(f"lr_decay_fraction: expected a value in [0, 1), got {self.lr_decay_fraction}.")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TrainedSAE(Result):
    """The result of :func:`train`: the sae-lens SAE plus how it was made and how good it is.

    Every ``steer_lens.sae`` function accepts a ``TrainedSAE`` wherever it takes an SAE.

    Attributes:
        sae: the inference sae-lens SAE (``TopKSAE`` / ``StandardSAE``), eval mode, metadata holding the
            model name and hook.
        quality: :class:`SAEQuality` on ``eval_texts`` (``None`` when none were given).
        config: the :class:`SAETrainConfig` used.
        train_l0: mean L0 over the last sparsity window of training (sae-lens's count).
        train_dead_features: features dead at the end of training (sae-lens's dead-feature window).
        seconds: wall-clock training time, seconds (collection of activations included).
        n_training_tokens: activations seen by the optimiser.
    """

    sae: Any
    quality: SAEQuality | None
    config: SAETrainConfig
    train_l0: float
    train_dead_features: int
    seconds: float
    n_training_tokens: int

    @property
    def hook(self) -> str:
        """The hook point the SAE reads."""
        return str(self.sae.cfg.metadata.hook_name)

    def save(self, path: str | os.PathLike) -> Path:
        """Save in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``, loadable with
        :func:`load` or ``SAE.load_from_disk``) plus ``steer_lens_quality.json``. The folder is
        written as a whole (:func:`~steer_lens.vectors.io.atomic_folder`): an interrupted save leaves
        the old folder, never new weights beside an old config."""
        path = Path(path)
        info = {
            "config": self.config.to_dict(),
            "quality": None if self.quality is None else self.quality.to_dict(),
            "train_l0": self.train_l0,
            "train_dead_features": self.train_dead_features,
            "seconds": self.seconds,
            "n_training_tokens": self.n_training_tokens,
        }
        with atomic_folder(path) as tmp:
            self.sae.save_model(tmp)
            atomic_write_json(tmp / QUALITY_FILE, info)
        return path

    def to_pandas(self):
        """One-row DataFrame: config highlights and quality."""
        import pandas as pd

        row = {"architecture": self.config.architecture, "d_sae": self.config.d_sae, "k": self.config.k,
               "training_tokens": self.n_training_tokens, "seconds": self.seconds,
               "train_dead_features": self.train_dead_features}
        if self.quality is not None:
            row.update(self.quality.to_dict())
        return pd.DataFrame([row])

    def plot(self):
        """Feature-density histogram on the evaluation text (plotly Figure)."""
        if self.quality is None:
            raise ConfigError("no evaluation was run (pass eval_texts to train) so there is nothing to plot.")
        return self.quality.plot()

    def _summary(self) -> str:
        return f"<b>TrainedSAE</b> at <code>{self.hook}</code> ({self.seconds:.1f} s)"


def _activation_stream(model, hook: str, texts: Any, cfg: SAETrainConfig, *, cycle: bool) -> Iterator[Tensor]:
    """Activations ``[n_tokens, d_in]`` (fp32) at ``hook`` over ``texts``, batch after batch; the corpus is
    repeated when ``cycle``."""
    epoch = 0
    while True:
        got = 0
        for batch in iter_batches(model, texts, batch_size=cfg.text_batch_size, max_len=cfg.context_size):
            out: list[Tensor] = []

            def grab(act, hook, out=out, batch=batch):
                out.append(act[batch.count].detach().float())

            with torch.no_grad():
                model.run_with_hooks(
                    batch.tokens, fwd_hooks=[(hook, grab)], return_type=None,
                    **run_kwargs(model, hook, batch, stop=True),
                )
            got += out[0].shape[0]
            yield out[0]
        if got == 0:
            raise EmptyInputError("texts: the corpus has no tokens besides BOS; give longer texts.")
        if not cycle:
            return
        epoch += 1
        if epoch == 1:
            logger.info("the corpus (%d tokens) is smaller than training_tokens: re-using it", got)


def _batches(model, hook: str, texts: Any, cfg: SAETrainConfig, *, cycle: bool) -> Iterator[Tensor]:
    from sae_lens.training.mixing_buffer import mixing_buffer

    return mixing_buffer(
        cfg.buffer_size, cfg.batch_size, _activation_stream(model, hook, texts, cfg, cycle=cycle)
    )


def train(
    model: ModelLike,
    hook: str,
    texts: Any,
    *,
    d_sae: int | None = None,
    k: int | None = None,
    config: SAETrainConfig | None = None,
    eval_texts: Any = None,
    **overrides: Any,
) -> TrainedSAE:
    """Train a sparse autoencoder on a model's activations at ``hook`` with sae-lens's ``SAETrainer``.

    Activations are collected with TransformerLens hooks over ``texts`` (streamed: a few text batches
    at a time, shuffled in sae-lens's ``mixing_buffer``) and fed to ``SAETrainer`` as its data
    provider; the TopK (``TopKTrainingSAE``, AuxK loss for dead features) or standard
    (``StandardTrainingSAE``, L1) architecture is sae-lens's own. The activation-norm scaling used
    during training is folded into the weights, and the result is converted to sae-lens's inference
    SAE, with ``metadata.model_name`` / ``hook_name`` set. Quality (:func:`evaluate`) is measured on
    ``eval_texts`` when given; keep evaluation text separate from training text.

    When the real corpus is small, train on text sampled from the model (:func:`sample_corpus`); on
    ``raincandy-u/TinyStories-656K``, 128 -> 1024 TopK k=16 on ~200k sampled activations reaches
    FVU around 0.1 on real stories (see docs/benchmarks/sae.md).

    Args:
        model: a HookedTransformer (or SteeredTransformer: its base model is used).
        hook: hook point, e.g. ``"blocks.0.hook_resid_post"``.
        texts: training corpus: strings, dataset rows with ``"text"``, or token ids. Lists, tensors and
            datasets are cycled if they hold fewer than ``training_tokens`` tokens; a one-shot iterator
            is not, and must be long enough.
        d_sae: shortcut for the config field of the same name (number of features).
        k: shortcut for the config field of the same name (active features per token, TopK).
        config: a :class:`SAETrainConfig` (default: its defaults).
        eval_texts: held-out texts for :func:`evaluate`.
        **overrides: any other :class:`SAETrainConfig` field.

    Returns:
        :class:`TrainedSAE` (pass it, or its ``.sae``, to the analyses).

    Raises:
        HookNameError: ``hook`` is not in the model, or is not ``[batch, pos, d]``.
        ConfigError: bad settings. EmptyInputError: empty corpus.
        MissingDependencyError: sae-lens is not installed.
    """
    sl_ = sae_lens()
    model = unwrap(model)
    fields_ = dict(config.to_dict()) if config is not None else {}
    if d_sae is not None:
        fields_["d_sae"] = d_sae
    if k is not None:
        fields_["k"] = k
    unknown = set(overrides) - set(SAETrainConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown training setting(s) {sorted(unknown)}; known: {sorted(SAETrainConfig.__dataclass_fields__)}."
        )
    fields_.update(overrides)
    cfg = SAETrainConfig(**fields_)
    check_nonempty(texts)
    check_hook_names(model, [hook])
    shape = hook_width(model, hook)
    if len(shape) != 3:
        from steer_lens.errors import HookNameError

        raise HookNameError(
            f"hook {hook!r} has activations of shape {list(shape)} (batch 1, pos 2); an SAE here needs "
            "[batch, pos, d]. Use a residual-stream hook (hook_resid_pre/mid/post) or hook_attn_out/mlp_out."
        )
    d_in = int(shape[-1])
    device = str(device_of(model))
    info = model_info(model)
    with torch.random.fork_rng(devices=[]):  # the user's RNG state is left as it was
        torch.manual_seed(cfg.seed)
        return _train(sl_, model, hook, texts, cfg, d_in, device, info, eval_texts)


def _train(sl_, model, hook, texts, cfg: SAETrainConfig, d_in, device, info, eval_texts) -> TrainedSAE:
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    common = dict(
        d_in=d_in, d_sae=cfg.d_sae, device=device, dtype="float32",
        normalize_activations="expected_average_only_in" if cfg.normalize_activations else "none",
    )
    if cfg.architecture == "topk":
        scfg = sl_.TopKTrainingSAEConfig(k=cfg.k, **common)
        tsae = sl_.TopKTrainingSAE(scfg)
    else:
        scfg = sl_.StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common)
        tsae = sl_.StandardTrainingSAE(scfg)
    meta = tsae.cfg.metadata
    meta.model_name = info.name
    meta.hook_name = hook
    meta.context_size = cfg.context_size
    meta.prepend_bos = True
    meta.steer_lens_weight_processing = info.processing()
    steps = cfg.training_tokens // cfg.batch_size
    tcfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr,
        lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        device=device,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(1, min(steps, 1000)),
        n_batches_for_norm_estimate=max(1, min(20, steps)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    cycle = not isinstance(texts, Iterator)
    provider = _batches(model, hook, texts, cfg, cycle=cycle)
    t0 = time.perf_counter()
    trainer = sl_.SAETrainer(cfg=tcfg, sae=tsae, data_provider=provider)
    try:
        tsae = trainer.fit()
    except StopIteration as e:
        raise ConfigError(
            f"the corpus (a one-shot iterator) ran out before training_tokens={cfg.training_tokens} "
            "activations; pass a list (it is cycled) or lower training_tokens."
        ) from e
    finally:
        provider.close()
    seconds = time.perf_counter() - t0
    sae = _to_inference(sl_, tsae)
    train_l0 = float(getattr(sae.cfg.metadata, "l0", None) or float("nan"))
    train_dead = int(getattr(sae.cfg.metadata, "num_dead_features", None) or 0)
    quality = None
    if eval_texts is not None:
        quality = evaluate(model, sae, eval_texts, batch_size=cfg.text_batch_size)
        sae.cfg.metadata.steer_lens_quality = quality.to_dict()
        logger.info(
            "SAE at %s: FVU %.3f, L0 %.1f, dead %d/%d, loss recovered %.3f", hook, quality.fvu,
            quality.l0, quality.dead_features, quality.d_sae, quality.loss_recovered,
        )
    return TrainedSAE(
        sae=sae, quality=quality, config=cfg, train_l0=train_l0, train_dead_features=train_dead,
        seconds=seconds, n_training_tokens=int(trainer.n_training_samples),
    )


def _to_inference(sl_, tsae):
    """sae-lens training SAE -> inference SAE, in memory (as ``save_inference_model`` would write it)."""
    state = {k: v.detach().clone() for k, v in tsae.state_dict().items()}
    tsae.process_state_dict_for_saving_inference(state)
    cfg_dict = tsae.cfg.get_inference_sae_cfg_dict()
    sae = sl_.SAE.from_dict(cfg_dict)
    sae.load_state_dict(state)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae
