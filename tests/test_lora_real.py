"""steer_lens.lora on the real model (raincandy-u/TinyStories-656K, Llama with GQA): peft references.

These pin the computation (merged logits = peft's, tokenization = TransformerLens's, losses = the
held-out loss of the training module), not the finding; the finding is reported in docs/lora.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import IncompatibleVectorError

peft = pytest.importorskip("peft")

REAL = "raincandy-u/TinyStories-656K"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _real_available() -> bool:
    cache = os.environ.get("HF_HUB_CACHE")
    return bool(cache) and (Path(cache) / ("models--" + REAL.replace("/", "--"))).exists()


pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not _real_available(), reason="TinyStories-656K is not in HF_HUB_CACHE"),
]


def _real_text() -> str:
    data = Path(os.environ.get("STEER_LENS_DATA", Path(__file__).parents[2] / "shared" / "data" / "tinystories"))
    return " ".join(f.read_text().replace("<|endoftext|>", " ") for f in sorted(data.glob("*.txt")))


def _sentences(pattern: str = r"\w", n: int = 24) -> list[str]:
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", _real_text())]
    return [s for s in sents if len(s.split()) > 4 and re.search(pattern, s, re.I)][:n]


@pytest.fixture(scope="module")
def model():
    return sl.load_model(REAL, device="cpu")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(REAL, dtype=torch.float32).eval()


def test_merged_model_reproduces_peft_logits_on_every_module_type(model, hf, tmp_path):
    import copy

    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=2, target_modules=ALL, init_lora_weights=False, use_rslora=True)).eval()
    lora = sl.lora.load_adapter(model, pm)
    assert sorted({m.kind for m in lora.modules}) == sorted(["q", "k", "v", "o", "gate", "in", "out"])
    texts = _sentences(n=8)
    merged = sl.lora.merged_model(model, lora)
    with torch.no_grad():
        for t in texts:
            x = model.to_tokens(t)
            ref = pm(x).logits
            assert (merged(x) - ref).abs().max() < 1e-4
            assert (model(x) - ref).abs().max() > 1e-2  # the adapter changes the output
    # save with peft, load the folder: the base model is loaded by name from the cache
    pm.save_pretrained(tmp_path)
    back = sl.lora.load_adapter(model, tmp_path)
    assert back.base_model_name == REAL
    for a, b in zip(lora.modules, back.modules, strict=True):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scaling == b.scaling == 1.0
    # an adapter folder recorded for another base model: named in the error, nothing loaded
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleVectorError, match=r"someone/other-model.*TinyStories-656K"):
        sl.lora.load_adapter(model, tmp_path)


def test_train_adapter_tokenizes_like_transformerlens(model):
    from transformers import AutoTokenizer

    from steer_lens.lora.train import _HFTokens

    tok = _HFTokens(AutoTokenizer.from_pretrained(REAL))
    for t in _sentences(n=6):
        assert tok(t, True) == model.to_tokens(t, prepend_bos=True)[0].tolist()
        assert tok(" " + t, False) == model.to_tokens(" " + t, prepend_bos=False)[0].tolist()


def test_recipe_lora_vs_trained_vector(model):
    """The documented recipe: a LoRA and a steering vector trained on the same data, compared."""
    from steer_lens.train import SFTConfig, heldout_loss, sft

    texts = _sentences(r"\bdogs?\b", n=16)
    assert len(texts) >= 8
    cfg = sl.lora.LoraTrainConfig(rank=4, target_modules=("down_proj",), layers=(1,), steps=30, batch_size=8,
                                  lr=3e-3)
    res = sl.lora.train_adapter(REAL, texts, cfg)
    lora = sl.lora.load_adapter(model, res)
    assert lora.names == ["blocks.1.mlp.W_out"]
    steered = sl.SteeredTransformer(model, hooks=["blocks.1.hook_mlp_out"])
    sft(steered, texts, SFTConfig(steps=30, batch_size=8, progress=False))
    cmp = sl.lora.compare(model, lora, texts, steered=steered)
    site = "blocks.1.hook_mlp_out"
    assert cmp.loss_lora < cmp.loss_base  # trained on these texts
    st = cmp.stats[site]
    for k in ("mean_abs_cos", "mean_energy", "top_sv_energy", "top_pc_share"):
        assert 0 <= st[k] <= 1 + 1e-9
    assert -1 <= st["cos_steering"] <= 1
    assert cmp.frac_recovered == pytest.approx(
        (cmp.loss_base - cmp.loss_const) / (cmp.loss_base - cmp.loss_lora))
    # cross-check the losses with the training module's held-out loss
    assert cmp.loss_base == pytest.approx(heldout_loss(model, texts), abs=1e-5)
    assert cmp.loss_steered == pytest.approx(heldout_loss(steered, texts), abs=1e-5)
    vec = sl.lora.mean_delta_vector(model, lora, texts)
    assert cmp.loss_const == pytest.approx(heldout_loss(vec, texts), abs=1e-5)
    assert cmp.loss_lora == pytest.approx(heldout_loss(sl.lora.merged_model(model, lora), texts), abs=1e-5)
    # rank-4 activations and the logit lens of B read on the real tokenizer
    acts = sl.lora.adapter_activations(model, lora, texts[:4])
    assert acts.acts["blocks.1.mlp.W_out"][0].shape[1] == 4
    lens = acts.logit_lens("blocks.1.mlp.W_out", component=0)
    assert len(lens) == 10 and all(isinstance(t, str) for t in lens.promoted)
