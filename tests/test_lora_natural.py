"""Tests of sl.lora.natural_vector (Wang et al. 2025: PC1 of the LoRA deltas times their mean norm) and of
recipes.wang2025.

References: the deltas are recomputed from peft's own LoRA layers (scaling·B·A·x with x captured in peft's
forward pass); the paper's PCA (sklearn ``PCA`` = SVD of the centred deltas) is transcribed with numpy;
closed forms for rank-1 delta fields (Δ_t = c_t·b: PC1 = ±b/‖b‖, mean norm = mean|c_t|·‖b‖).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens.errors import ConfigError, EmptyInputError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 101


def _hf_llama(seed: int = 0):
    return hf_model("llama", n_layers=2, seed=seed, vocab=V)


_tl = tl_model  # the TransformerLens model of a Hugging Face model


def _peft(hf, targets, *, r, layer, seed=1):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                          lora_dropout=0.0, layers_to_transform=[layer])
    return peft.get_peft_model(hf, cfg).eval()


def _texts(n=6, seed=0):
    """Token-id 'texts' of different lengths (used as given: no BOS is added to token ids)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (int(L),), generator=g) for L in torch.randint(4, 16, (n,), generator=g)]


@pytest.fixture(scope="module")
def pair():
    hf = _hf_llama()
    return hf, _tl(hf)


def _peft_deltas(pm, texts, suffix: str) -> torch.Tensor:
    """Δ_t = scaling·B·A·x_t of the one LoRA layer whose name ends with ``suffix``, x_t from peft's run."""
    ((_, layer),) = [(n, m) for n, m in pm.named_modules() if n.endswith(suffix) and hasattr(m, "lora_A")]
    xs = []
    h = layer.register_forward_hook(lambda mod, args, out: xs.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for t in texts:
                pm(t[None])
    finally:
        h.remove()
    x = torch.cat(xs)
    with torch.no_grad():
        return (layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]).double()


# ---------------------------------------------------------------------------------------------------
# (a) a rank-1 LoRA: deltas along a known direction u
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "site"), [("down_proj", "blocks.1.hook_mlp_out"),
                                              ("o_proj", "blocks.1.hook_attn_out")])
def test_rank1_natural_vector_is_u_times_mean_norm(pair, target, site):
    hf, tl = pair
    pm = _peft(copy.deepcopy(hf), [target], r=1, layer=1)
    lora = sl.lora.load_adapter(tl, pm)
    texts = _texts()
    vec = sl.lora.natural_vector(tl, lora, texts)
    assert vec.hook_names == (site,)
    v = vec.vectors[site].detach().double()

    # closed form from peft's weights: Δ_t = (A·x_t)·(scaling·B), so u = B/‖B‖ and ‖Δ_t‖ = |A·x_t|·‖s·B‖
    ((_, layer),) = [(n, m) for n, m in pm.named_modules() if n.endswith(target) and hasattr(m, "lora_A")]
    b = (layer.lora_B["default"].weight[:, 0] * layer.scaling["default"]).detach().double()
    u = b / b.norm()
    D = _peft_deltas(pm, texts, target)
    c = D @ u  # the scalar coefficient of each token
    assert torch.allclose(D, c[:, None] * u[None], atol=1e-6)  # the field really is rank 1
    mean_norm = float(c.abs().mean())  # ‖Δ_t‖ = |c_t| since u is a unit vector
    assert float(v.norm()) == pytest.approx(mean_norm, rel=1e-5)
    cos = float(v @ u / v.norm())
    assert abs(cos) == pytest.approx(1.0, abs=1e-5)
    # sign: towards the mean delta (mean c_t · u)
    assert math.copysign(1.0, cos) == math.copysign(1.0, float(c.mean()))
    cfg = vec.training_config
    assert cfg["source"] == "lora.natural_vector" and cfg["n_tokens"] == sum(len(t) for t in texts)
    assert cfg["explained_variance"][site] == pytest.approx(1.0, abs=1e-6)
    assert cfg["mean_delta_norm"][site] == pytest.approx(mean_norm, rel=1e-6)


def test_rank2_natural_vector_equals_the_papers_pca(pair):
    """Against the paper's recipe transcribed with numpy: sklearn's PCA is the SVD of the centred deltas;
    v = components_[0] · mean‖Δ_t‖ (up to sign), and explained_variance_ratio_[0] = S_0² / Σ S²."""
    hf, tl = pair
    pm = _peft(copy.deepcopy(hf), ["down_proj"], r=2, layer=0, seed=4)
    lora = sl.lora.load_adapter(tl, pm)
    texts = _texts(8, seed=2)
    vec = sl.lora.natural_vector(tl, lora, texts, batch_size=3)
    site = "blocks.0.hook_mlp_out"
    D = _peft_deltas(pm, texts, "down_proj").numpy()
    Dc = D - D.mean(0)
    _, S, Vt = np.linalg.svd(Dc, full_matrices=False)
    ref = Vt[0] * np.linalg.norm(D, axis=1).mean()
    ref = ref if ref @ D.mean(0) >= 0 else -ref
    got = vec.vectors[site].detach().double().numpy()
    assert np.allclose(got, ref, atol=1e-5 * np.linalg.norm(ref))
    assert vec.training_config["explained_variance"][site] == pytest.approx(S[0] ** 2 / (S**2).sum(), rel=1e-6)
    assert 0.5 < vec.training_config["explained_variance"][site] < 1.0  # a real rank-2 field


# ---------------------------------------------------------------------------------------------------
# (b) property: on a rank-1 field the natural vector and the mean delta point the same way
# ---------------------------------------------------------------------------------------------------
def test_rank1_natural_vector_points_like_mean_delta_and_is_longer(pair):
    hf, tl = pair
    lora = sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["o_proj"], r=1, layer=0, seed=7))
    texts = _texts(5, seed=3)
    nat = sl.lora.natural_vector(tl, lora, texts)
    mean = sl.lora.mean_delta_vector(tl, lora, texts)
    (site,) = nat.hook_names
    a, m = nat.vectors[site].detach().double(), mean.vectors[site].detach().double()
    assert float(a @ m / (a.norm() * m.norm())) == pytest.approx(1.0, abs=1e-5)
    assert float(a.norm()) >= float(m.norm()) - 1e-6  # mean of norms >= norm of the mean


def test_pc1_helper_closed_forms():
    from steer_lens.lora.natural import _pc1_times_mean_norm

    u = torch.tensor([0.6, 0.0, -0.8])
    c = torch.tensor([1.0, -3.0, -2.0, 0.5])  # mean c < 0: the vector points along -u
    v, ratio, norm = _pc1_times_mean_norm(c[:, None] * u[None])
    assert norm == pytest.approx(float(c.abs().mean()))
    assert torch.allclose(v, -u * c.abs().mean(), atol=1e-6) and ratio == pytest.approx(1.0)
    row = torch.tensor([1.0, 2.0, 2.0])  # constant field: PC1 undefined, the vector is the constant
    v, ratio, norm = _pc1_times_mean_norm(row.repeat(4, 1))
    assert torch.allclose(v, row, atol=1e-6) and math.isnan(ratio) and norm == pytest.approx(3.0)
    v, ratio, norm = _pc1_times_mean_norm(torch.zeros(3, 3))
    assert float(v.abs().max()) == 0 and norm == 0


# ---------------------------------------------------------------------------------------------------
# (c) bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input(pair):
    hf, tl = pair
    lora = sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["down_proj"], r=1, layer=1))
    with pytest.raises(EmptyInputError):
        sl.lora.natural_vector(tl, lora, [])
    with pytest.raises(ConfigError, match="batch_size"):
        sl.lora.natural_vector(tl, lora, _texts(), batch_size=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        sl.lora.natural_vector(tl, lora, ["a text, but the model has no tokenizer"])


def test_post_norm_model_is_refused_before_anything_runs(pair):
    """Gemma-2/3 (use_normalization_before_and_after): hook_mlp_out is after ln2_post; the paper's vector
    lives before that norm, where TransformerLens has no hook point."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    hf, tl = pair
    lora = sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["down_proj"], r=1, layer=1))
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=V,
                                  d_mlp=96, act_fn="gelu", normalization_type="RMS", gated_mlp=True,
                                  use_normalization_before_and_after=True, positional_embedding_type="rotary")
    gemma_like = HookedTransformer(cfg)
    assert hasattr(gemma_like.blocks[1], "ln2_post")
    with pytest.raises(ConfigError, match=r"ln2_post.*Fix:"):
        sl.lora.natural_vector(gemma_like, lora, _texts())


# ---------------------------------------------------------------------------------------------------
# recipes.wang2025: the values read in JoshEngels/OOCR-Interp
# ---------------------------------------------------------------------------------------------------
def test_wang2025_values_match_the_papers_code():
    from steer_lens import recipes

    model = sl.random_model("llama", n_layers=48, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    r = recipes.wang2025(model, n_train=100)
    # the risky/safe training script (the one with --train_steering_vector):
    #   l.58  target_layer = 25 (its notebook default, of Gemma-3-12B's 48 layers)
    #   l.81  learning_rate = 2e-3 for a steering vector;  l.84 weight_decay = 0.0
    #   l.22-23 batch_size 1 x gradient_accumulation_steps 4 -> 4 examples per optimiser step
    #   l.31  num_epochs 3;  l.40 init_seed 42;  optimiser.step only every 4th example (l.333)
    # utils.py add_steering_vector: l.36-37 randn / norm (unit init); l.66-67 hook on the layer's mlp
    assert r.hooks == ("blocks.25.hook_mlp_out",)
    c = r.config
    assert (c.lr, c.lr_units, c.weight_decay, c.batch_size) == (2e-3, "absolute", 0.0, 4)
    assert c.steps == 3 * (100 // 4) and c.grad_clip is None and c.warmup_steps == 0
    assert c.objective == "promotion" and c.betas == (0.9, 0.999)
    assert r.steering == {"init": "random", "init_norm": 1.0, "seed": 42, "positions": "prompt"}
    st = r.steered(model)
    (v,) = st.vectors.as_dict().values()
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6) and st.positions == "prompt"
    assert all(s for s in r.sources.values()) and r.differs
    small = sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    assert recipes.wang2025(small, n_train=8).hooks == ("blocks.1.hook_mlp_out",)  # round(25/48 * 2)
    assert recipes.wang2025(small, n_train=2).config.steps == 1
    with pytest.raises(ConfigError, match="layer"):
        recipes.wang2025(small, n_train=8, layer=2)
    with pytest.raises(ConfigError, match="n_train"):
        recipes.wang2025(small, n_train=0)
