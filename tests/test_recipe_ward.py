"""Tests of ``steer_lens.recipes.ward2025`` (Ward, Riechers & Shai 2025, "Rank-1 LoRAs Encode Interpretable
Reasoning Signals").

References: a transcription of the paper's training config (jnward/s1_peft at 925f7c2, the submodule
``s1_peft`` of jnward/reasoning-lora-interp at 9b103c4: ``train/sft_lora.sh`` and ``train/sft_lora.py``) and
of its SAE settings (reasoning-lora-interp ``3_lora_sae/3.0_train_sae.py``); transformers' own
``TrainingArguments`` defaults for what the script leaves unset; peft's own LoRA layers for the adapter
the recipe builds (rank, scaling, count of modules).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens import recipes
from steer_lens.errors import ConfigError

peft = pytest.importorskip("peft")

# train/sft_lora.sh (line numbers of 925f7c2)
PAPER_SH = {
    "lr": 1e-3,             # l.7  lr=1e-3
    "min_lr": 0,            # l.8  min_lr=0 (cosine to 0, l.113)
    "epochs": 5,            # l.9  epochs=5
    "weight_decay": 1e-4,   # l.10 weight_decay=1e-4
    "batch_size": 16,       # l.11 batch_size=16 (micro 1 x accumulation, l.12-15)
    "rank": 1,              # l.19 rank=1
    "alpha": 16,            # l.20 alpha=16
    "warmup_ratio": 0.05,   # l.106 --warmup_ratio=0.05
    "betas": (0.9, 0.95),   # l.116-117 --adam_beta1=0.9 --adam_beta2=0.95
}
# train/sft_lora.py
PAPER_PY = {
    "target_modules": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},  # l.62
    "lora_dropout": 0.0,    # l.130
    "bias": "none",         # l.132
    "use_rslora": True,     # l.133
}
# 3_lora_sae/3.0_train_sae.py
PAPER_SAE = {"k": 16, "lr": 5e-4, "batch_size": 512, "expansion": 8, "aux_k_coefficient": 1 / 32,  # l.239-243
             "seed": 42, "warmup_steps": 100, "dead_tokens": 1_000_000, "epochs": 1}             # l.244, 269, 271, 366


def _pair(n_layers=3):
    hf = hf_model("llama", n_layers=n_layers, seed=0)
    return hf, tl_model(hf)


def test_recipe_values_equal_the_papers_config():
    from transformers import TrainingArguments

    _, tl = _pair()
    r = recipes.ward2025(tl, n_train=1000)             # s1K-1.1: 1000 traces
    c = r.config
    assert (c.rank, c.alpha, c.use_rslora) == (PAPER_SH["rank"], PAPER_SH["alpha"], PAPER_PY["use_rslora"])
    assert set(c.target_modules) == PAPER_PY["target_modules"] and c.layers is None
    assert (c.lr, c.lr_units, c.weight_decay, tuple(c.betas)) == (
        PAPER_SH["lr"], "absolute", PAPER_SH["weight_decay"], PAPER_SH["betas"])
    assert c.batch_size == PAPER_SH["batch_size"]
    # transformers' steps per epoch: 1000 sequences // 16 per step = 62; 5 epochs; warm-up ceil(5%)
    assert c.steps == PAPER_SH["epochs"] * (1000 // 16) == 310
    assert c.warmup_steps == math.ceil(PAPER_SH["warmup_ratio"] * 310) == 16
    # the script leaves max_grad_norm unset: transformers' default applies
    assert c.grad_clip == TrainingArguments.__dataclass_fields__["max_grad_norm"].default == 1.0
    sae = r.extra["sae"]
    assert {k: getattr(sae, k) for k in PAPER_SAE} == PAPER_SAE
    assert r.hooks == () and any("cosine" in d for d in r.differs)
    assert all(".sh" in v or ".py" in v for v in r.sources.values())           # each cites a file
    assert all("l." in v for v in r.sources.values())                           # ... and its lines


def test_recipe_builds_rank1_lora_on_all_seven_modules_of_every_layer():
    n_layers = 3
    hf, tl = _pair(n_layers)
    r = recipes.ward2025(tl, n_train=16)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 101, (6,), generator=g), torch.randint(3, 101, (4,), generator=g)) for _ in range(4)]
    res = sl.lora.train_adapter(hf, pairs, dataclasses.replace(r.config, steps=2, batch_size=2))
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in res.peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 7 * n_layers
    kinds = {n.rsplit(".", 1)[-1] for n in layers}
    assert kinds == PAPER_PY["target_modules"]
    assert {int(n.split("layers.")[1].split(".")[0]) for n in layers} == set(range(n_layers))
    for m in layers.values():
        assert m.r["default"] == 1
        assert m.scaling["default"] == pytest.approx(PAPER_SH["alpha"] / math.sqrt(1))   # rsLoRA
        assert isinstance(m.lora_dropout["default"], torch.nn.Identity)                  # dropout 0
    trainable = sum(p.numel() for p in res.peft_model.parameters() if p.requires_grad)
    assert trainable == sum(m.in_features + m.out_features for m in layers.values())
    lora = sl.lora.load_adapter(tl, res)
    assert len(lora.modules) == 7 * n_layers and all(m.rank == 1 for m in lora.modules)
    state = sl.lora.lora_activation_state(tl, lora, [torch.randint(3, 101, (5,), generator=g)])
    assert state.states.shape == (5, 7 * n_layers)


def test_recipe_layers_and_bad_inputs():
    _, tl = _pair()
    assert recipes.ward2025(tl, n_train=40, layers=[0, 2]).config.layers == (0, 2)
    assert recipes.ward2025(tl, n_train=8).config.steps == 5          # at least one step per epoch
    for kw in ({"n_train": 0}, {"n_train": True}, {"n_train": 16, "layers": [3]}, {"n_train": 16, "layers": []}):
        with pytest.raises(ConfigError):
            recipes.ward2025(tl, **kw)
    with pytest.raises(ConfigError, match="gated MLP"):
        recipes.ward2025(tl_model(hf_model("gpt2", n_layers=2)), n_train=16)
