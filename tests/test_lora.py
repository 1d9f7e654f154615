"""Tests of steer_lens.lora on tiny Hugging Face models of three families, converted to TransformerLens.

References: peft's own forward pass and ``get_delta_weight`` (the LoRA), TransformerLens caches of the
merged model, closed forms (a zero B changes nothing; a write that is constant by construction gives
constancy 1 and frac 1). The real-model checks are in ``test_lora_real.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens.errors import (
    ConfigError,
    EmptyInputError,
    IncompatibleVectorError,
    NonFiniteError,
    SequenceTooLongError,
    ShapeMismatchError,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 101
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _hf(family: str, seed: int = 0, **kw):
    return hf_model(family, n_layers=2, seed=seed, vocab=V, **kw)


_tl = tl_model  # the TransformerLens model of a Hugging Face model


def _peft(hf, targets, *, r=2, alpha=4, random_init=True, seed=1, **kw):
    torch.manual_seed(seed)
    if type(hf).__name__ == "GPT2LMHeadModel":
        kw.setdefault("fan_in_fan_out", True)  # Conv1D layers
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=not random_init,
                          lora_dropout=0.0, **kw)
    return peft.get_peft_model(hf, cfg).eval()


def _ids(n=5, pos=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n, pos), generator=g)


def _texts(n=6, seed=0):
    """Token-id 'texts' of different lengths (list of 1-D tensors)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (int(L),), generator=g) for L in torch.randint(4, 16, (n,), generator=g)]


@pytest.fixture(scope="module")
def pair():
    """(hf, tl) for each family, built once."""
    cache = {}

    def get(family):
        if family not in cache:
            hf = _hf(family)
            cache[family] = (hf, _tl(hf))
        return cache[family]

    return get


# ---------------------------------------------------------------------------------------------------
# mapping: merged TL model == peft model, for every module type of every family
# ---------------------------------------------------------------------------------------------------
CASES = [(f, [t]) for f, ts in TARGETS.items() for t in ts] + [(f, ts) for f, ts in TARGETS.items()]


@pytest.mark.parametrize(("family", "targets"), CASES, ids=[f"{f}-{'+'.join(t)}" for f, t in CASES])
def test_merged_model_reproduces_peft_logits(pair, family, targets):
    import copy

    hf, tl = pair(family)
    pm = _peft(copy.deepcopy(hf), targets)
    x = _ids()
    before = tl(x).detach().clone()
    lora = sl.lora.load_adapter(tl, pm)
    merged = sl.lora.merged_model(tl, lora)
    with torch.no_grad():
        ref = pm(x).logits
        got = merged(x)
        base_hf = pm.get_base_model()
        with pm.disable_adapter():
            ref_base = base_hf(x).logits
    assert (got - ref).abs().max() < 1e-4
    assert (got - before).abs().max() > 1e-3  # the adapter does something
    assert (ref_base - before).abs().max() < 1e-4
    assert torch.equal(tl(x), before)  # the input model is untouched


@pytest.mark.parametrize("family", list(TARGETS))
def test_delta_weight_equals_peft(pair, family):
    import copy

    hf, tl = pair(family)
    pm = _peft(copy.deepcopy(hf), TARGETS[family], use_rslora=True, r=4, alpha=3)
    lora = sl.lora.load_adapter(tl, pm)
    layers = dict(pm.named_modules())
    assert len(lora) == 2 * (len(TARGETS[family]) + (1 if family == "gpt2" else 0))
    for m in lora.modules:
        layer = layers["base_model.model." + m.hf_name]
        ref = layer.get_delta_weight("default")
        if getattr(layer, "fan_in_fan_out", False):
            ref = ref.T
        assert torch.allclose(m.delta_weight(), ref, atol=1e-6)
        assert m.scaling == pytest.approx(3 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)


def test_gqa_kv_deltas_go_to_underscored_weights(pair):
    hf, tl = pair("llama")
    import copy

    lora = sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["k_proj", "v_proj"]))
    keys = {k for m in lora.modules for k in m.tl_deltas(tl.cfg)}
    assert keys == {f"blocks.{i}.attn._W_{c}" for i in (0, 1) for c in "KV"}
    for m in lora.modules:
        (d,) = m.tl_deltas(tl.cfg).values()
        assert d.shape == (2, 64, 16)  # n_key_value_heads, d_model, d_head


def test_load_from_folder_equals_peft_model(pair, tmp_path):
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["o_proj", "down_proj"])
    pm.save_pretrained(tmp_path)
    a = sl.lora.load_adapter(tl, pm)
    b = sl.lora.load_adapter(tl, tmp_path, base_model=hf)
    assert a.names == b.names == ["blocks.0.attn.W_O", "blocks.0.mlp.W_out", "blocks.1.attn.W_O",
                                  "blocks.1.mlp.W_out"]
    for ma, mb in zip(a.modules, b.modules, strict=True):
        assert torch.equal(ma.A, mb.A) and torch.equal(ma.B, mb.B) and ma.scaling == mb.scaling
    assert "layers_to_transform" in a.peft_config
    assert list(a.to_pandas().columns)[:3] == ["module", "hf_module", "layer"]
    assert "LoraAdapter" in a._repr_html_()
    assert a.plot().data


# ---------------------------------------------------------------------------------------------------
# compare: hand-checkable cases
# ---------------------------------------------------------------------------------------------------
def test_zero_b_changes_nothing(pair):
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["down_proj", "q_proj"], random_init=False)  # peft's init: B = 0
    lora = sl.lora.load_adapter(tl, pm)
    assert all(float(m.B.abs().max()) == 0 for m in lora.modules)
    x = _texts()
    merged = sl.lora.merged_model(tl, lora)
    assert torch.equal(merged(_ids()), tl(_ids()))
    cmp = sl.lora.compare(tl, lora, x)
    assert cmp.loss_lora == cmp.loss_base == cmp.loss_const
    assert cmp.kl_lora_base == 0 and cmp.kl_lora_const == 0
    assert math.isnan(cmp.frac_recovered)
    for s in cmp.sites:
        assert float(cmp.mean_delta[s].abs().max()) == 0
        assert cmp.stats[s]["delta_norm"] == 0
    assert all(float(v.abs().max()) == 0 for v in cmp.effective_vectors.values())
    vec = sl.lora.mean_delta_vector(tl, lora, x)
    assert all(float(v.abs().max()) == 0 for v in vec.vectors.as_dict().values())


def _constant_write_setup():
    """GPT-2 whose layer-1 MLP neuron 7 is constant (zero input weights, bias 2), and a rank-1 LoRA on
    mlp.c_proj that reads only that neuron: Δ_t = s·B·gelu(2) for every token."""
    hf = _hf("gpt2", seed=3)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[:, 7] = 0.0
        hf.transformer.h[1].mlp.c_fc.bias[7] = 2.0
    tl = _tl(hf)
    pm = _peft(hf, ["mlp.c_proj"], r=1, alpha=2, layers_to_transform=[1])
    layer = dict(pm.named_modules())["base_model.model.transformer.h.1.mlp.c_proj"]
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()
        layer.lora_A["default"].weight[0, 7] = 1.5
    return tl, pm


def test_constant_write_gives_constancy_one_and_frac_one():
    tl, pm = _constant_write_setup()
    lora = sl.lora.load_adapter(tl, pm)
    (m,) = lora.modules
    assert m.name == "blocks.1.mlp.W_out" and m.writes_residual
    cmp = sl.lora.compare(tl, lora, _texts(8))
    (s,) = cmp.sites
    assert s == "blocks.1.hook_mlp_out"
    st = cmp.stats[s]
    assert st["mean_abs_cos"] == pytest.approx(1, abs=1e-5)
    assert st["mean_energy"] == pytest.approx(1, abs=1e-5)
    assert st["top_sv_energy"] == pytest.approx(1, abs=1e-5)
    gelu2 = torch.nn.functional.gelu(torch.tensor(2.0), approximate="tanh")
    expected = m.scaling * m.B[:, 0] * 1.5 * gelu2
    assert torch.allclose(cmp.mean_delta[s], expected, atol=1e-5)
    assert cmp.frac_recovered == pytest.approx(1, abs=1e-4)
    assert cmp.kl_lora_const < 1e-9 < cmp.kl_lora_base
    assert torch.allclose(cmp.cos_to_mean[s], torch.ones(cmp.n_tokens), atol=1e-5)
    # weight space: rank 1, its output direction is the mean Δ's
    (w,) = cmp.weights
    assert w["top_sv_energy"] == pytest.approx(1) and w["cos_u1_mean_delta"] == pytest.approx(1, abs=1e-5)


def test_site_statistics_closed_forms():
    from steer_lens.lora.comparison import _mean_abs_cos, _site_stats

    c = torch.tensor([3.0, 4.0, 0.0])
    D = torch.stack([c, -c, c, -c])  # one axis, sign flips: |cos| 1, mean 0
    st = _site_stats(D, 100)
    assert st["mean_abs_cos"] == pytest.approx(1)
    assert st["mean_energy"] == pytest.approx(0, abs=1e-12)
    assert st["top_sv_energy"] == pytest.approx(1)
    assert st["top_pc_share"] == pytest.approx(1)
    E = torch.eye(3)  # orthogonal rows: |cos| 0, mean explains 1/3 of the energy
    st = _site_stats(E, 100)
    assert st["mean_abs_cos"] == pytest.approx(0)
    assert st["mean_energy"] == pytest.approx(1 / 3)
    g = torch.Generator().manual_seed(0)
    R = torch.randn(30, 5, generator=g).double()
    U = R / R.norm(dim=1, keepdim=True)
    brute = sum(abs(float(U[i] @ U[j])) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    assert _mean_abs_cos(R, 100) == pytest.approx(brute, rel=1e-6)


def _capture_peft(pm, texts, select, pick) -> dict[str, list]:
    """Run ``pm`` on each text alone and record ``pick(args, out)`` of every module ``select(name, module)`` keeps."""
    captured: dict[str, list] = {}
    handles = []
    for name, mod in pm.named_modules():
        if select(name, mod):
            def hook(module, args, out, name=name):
                captured.setdefault(name, []).append(pick(args, out).detach())
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for t in texts:
                pm(t[None])
    finally:
        for h in handles:
            h.remove()
    return captured


def test_residual_writer_delta_equals_peft_hand_computation(pair):
    """mean Δ of a down_proj/o_proj LoRA = mean over tokens of scaling·B·A·x, x captured in peft's run."""
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["down_proj", "o_proj"], layers_to_transform=[1])
    lora = sl.lora.load_adapter(tl, pm)
    texts = _texts(5)
    captured = _capture_peft(
        pm, texts, lambda n, m: n.endswith(("mlp.down_proj", "self_attn.o_proj")) and hasattr(m, "lora_A"),
        lambda args, out: args[0][0],
    )
    layers = dict(pm.named_modules())
    vec = sl.lora.mean_delta_vector(tl, lora, texts)
    cmp = sl.lora.compare(tl, lora, texts)
    for site, suffix in (("blocks.1.hook_mlp_out", "mlp.down_proj"), ("blocks.1.hook_attn_out", "self_attn.o_proj")):
        name = next(n for n in captured if n.endswith(suffix))
        layer = layers[name]
        x = torch.cat(captured[name])
        d = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        assert torch.allclose(vec.vectors[site].detach(), d.mean(0), atol=1e-5)
        assert torch.allclose(cmp.mean_delta[site], d.mean(0), atol=1e-5)


def test_q_lora_delta_is_attention_output_change(pair):
    """For a layer-0 q_proj LoRA, Δ_t = attn_out_LoRA − attn_out_base = resid_mid_LoRA − resid_mid_base."""
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["q_proj"], layers_to_transform=[0])
    lora = sl.lora.load_adapter(tl, pm)
    x = _ids(4, 10)
    merged = sl.lora.merged_model(tl, lora)
    _, c1 = merged.run_with_cache(x)
    _, c0 = tl.run_with_cache(x)
    ref = (c1["blocks.0.hook_resid_mid"] - c0["blocks.0.hook_resid_mid"]).reshape(-1, 64).mean(0)
    cmp = sl.lora.compare(tl, lora, x)
    assert cmp.sites == ("blocks.0.hook_attn_out",)
    assert torch.allclose(cmp.mean_delta["blocks.0.hook_attn_out"], ref, atol=1e-5)
    eff = (c1["blocks.1.hook_resid_post"] - c0["blocks.1.hook_resid_post"]).reshape(-1, 64).mean(0)
    assert torch.allclose(cmp.effective_vectors["blocks.1.hook_resid_post"], eff, atol=1e-5)
    assert torch.allclose(sl.lora.effective_vectors(tl, lora, x)["blocks.1.hook_resid_post"], eff, atol=1e-5)


def test_compare_with_steered_and_losses_by_hand(pair):
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["down_proj"], layers_to_transform=[1])
    lora = sl.lora.load_adapter(tl, pm)
    x = _ids(4, 10)
    vec = sl.lora.mean_delta_vector(tl, lora, x)
    cmp = sl.lora.compare(tl, lora, x, steered=vec)
    site = "blocks.1.hook_mlp_out"
    assert cmp.steering_hooks[site] == site
    assert cmp.stats[site]["cos_steering"] == pytest.approx(1, abs=1e-6)
    assert cmp.loss_steered == pytest.approx(cmp.loss_const, abs=1e-9)
    assert cmp.frac_recovered_steered == pytest.approx(cmp.frac_recovered, abs=1e-9)

    def loss(logits):
        lp = logits[:, :-1].double().log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
        return float(-lp.mean())

    merged = sl.lora.merged_model(tl, lora)
    with torch.no_grad():
        lb, ll, lc = loss(tl(x)), loss(merged(x)), loss(vec(x))
        pl = merged(x).double().log_softmax(-1)
        pc = vec(x).double().log_softmax(-1)
    assert cmp.loss_base == pytest.approx(lb, abs=1e-6)
    assert cmp.loss_lora == pytest.approx(ll, abs=1e-6)
    assert cmp.loss_const == pytest.approx(lc, abs=1e-6)
    assert cmp.frac_recovered == pytest.approx((lb - lc) / (lb - ll), rel=1e-4)
    kl = float((pl.exp() * (pl - pc)).sum(-1).mean())
    assert cmp.kl_lora_const == pytest.approx(kl, rel=1e-6)
    # a random vector at another hook: compared with the nearest one, geometry only via a dict
    v = torch.randn(64)
    cmp2 = sl.lora.compare(tl, lora, x, steered={"blocks.1.hook_resid_pre": v})
    assert cmp2.steering_hooks[site] == "blocks.1.hook_resid_pre"
    assert cmp2.loss_steered is None
    mu = cmp2.mean_delta[site]
    assert cmp2.stats[site]["cos_steering"] == pytest.approx(float(mu @ v / mu.norm() / v.norm()), abs=1e-5)
    (w,) = cmp2.weights
    m = lora.modules[0]
    U, S, _ = torch.linalg.svd(m.delta_weight().double())
    assert torch.allclose(w["sv"].double(), S[: m.rank], rtol=1e-4)
    assert w["cos_u1_steering"] == pytest.approx(abs(float(U[:, 0] @ v.double() / v.norm())), abs=1e-4)
    # result API
    df = cmp.to_pandas()
    assert list(df.site) == [site] and "mean_abs_cos" in df.columns
    assert len(cmp.weights_to_pandas()) == 1
    assert cmp.plot().data and "LoraComparison" in cmp._repr_html_()
    assert cmp.summary()["n_tokens"] == 40


def test_mean_delta_vector_is_savable(pair, tmp_path):
    import copy

    hf, tl = pair("llama")
    lora = sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["o_proj"], layers_to_transform=[0]))
    vec = sl.lora.mean_delta_vector(tl, lora, _texts())
    assert vec.hook_names == ("blocks.0.hook_attn_out",)
    vec.save(tmp_path)
    back = sl.SteeredTransformer.load(tmp_path, tl)
    assert torch.equal(back.vectors["blocks.0.hook_attn_out"], vec.vectors["blocks.0.hook_attn_out"])
    assert back.training_config["source"] == "lora.mean_delta_vector"


# ---------------------------------------------------------------------------------------------------
# adapter activations
# ---------------------------------------------------------------------------------------------------
def test_adapter_activations_equal_peft_lora_a_outputs(pair):
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["down_proj", "q_proj"], r=1, layers_to_transform=[1])
    lora = sl.lora.load_adapter(tl, pm)
    texts = _texts(4)
    outs = _capture_peft(pm, texts, lambda n, m: n.endswith("lora_A.default"), lambda args, out: out[0])
    acts = sl.lora.adapter_activations(tl, lora, texts)
    for m in lora.modules:
        key = next(k for k in outs if m.hf_name + ".lora_A" in k)
        for i in range(len(texts)):
            assert torch.allclose(acts.acts[m.name][i], outs[key][i], atol=1e-5)
    top = acts.top_tokens("blocks.1.mlp.W_out", k=3)
    allv = acts.values("blocks.1.mlp.W_out")
    assert top.activation.tolist() == pytest.approx(torch.topk(allv, 3).values.tolist())
    assert len(acts.top_texts("blocks.1.mlp.W_out", k=2)) == 2
    lens = acts.logit_lens("blocks.1.mlp.W_out")
    m = lora["blocks.1.mlp.W_out"]
    ref = torch.topk(m.scaling * m.B[:, 0] @ tl.W_U, 10)
    assert torch.equal(acts.lens["blocks.1.mlp.W_out"][0].top_ids, ref.indices)
    assert lens.logit.tolist() == pytest.approx(ref.values.tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match="residual"):
        acts.logit_lens("blocks.1.attn.W_Q")
    with pytest.raises(ConfigError, match="several modules"):
        acts.values()
    html = acts.show_tokens("blocks.1.mlp.W_out")
    assert "<" in str(html)
    assert acts.plot().data and "AdapterActivations" in acts._repr_html_()


# ---------------------------------------------------------------------------------------------------
# training and data
# ---------------------------------------------------------------------------------------------------
def test_train_adapter_on_token_ids(pair):
    hf, tl = pair("llama")
    g = torch.Generator().manual_seed(0)
    examples = [(torch.cat([torch.tensor([1]), torch.randint(3, V, (4,), generator=g)]), torch.tensor([7, 7, 7]))
                for _ in range(8)]
    cfg = sl.lora.LoraTrainConfig(rank=2, target_modules=("down_proj",), layers=(1,), steps=30, batch_size=4,
                                  lr=1e-2)
    res = sl.lora.train_adapter(hf, examples, cfg)
    assert float(res.losses[-5:].mean()) < float(res.losses[:5].mean()) - 0.5
    lora = sl.lora.load_adapter(tl, res)
    assert lora.names == ["blocks.1.mlp.W_out"] and lora.modules[0].rank == 2
    assert float(lora.modules[0].B.abs().max()) > 0
    assert res.to_pandas().shape == (30, 1) and res.plot().data and "LoRA training" in res._repr_html_()
    # the input model is not modified
    assert not any("lora" in n for n, _ in hf.named_modules())
    with pytest.raises(ConfigError, match="tokenizer"):
        sl.lora.train_adapter(hf, ["some text"], cfg)
    with pytest.raises(EmptyInputError):
        sl.lora.train_adapter(hf, [], cfg)
    with pytest.raises(SequenceTooLongError):
        sl.lora.train_adapter(hf, [(torch.tensor([1]), torch.ones(80, dtype=torch.long))], cfg)


def test_train_adapter_checkpoints_and_resume_like_sft(pair, tmp_path):
    """train_adapter runs on the shared loop: the same checkpoint format, and resume equals an uninterrupted run."""
    hf, _ = pair("llama")
    g = torch.Generator().manual_seed(1)
    examples = [(torch.cat([torch.tensor([1]), torch.randint(3, V, (3,), generator=g)]), torch.tensor([7, 7]))
                for _ in range(6)]

    def cfg(**kw):
        return sl.lora.LoraTrainConfig(rank=2, layers=(1,), batch_size=3, lr=1e-2, **kw)

    full = sl.lora.train_adapter(hf, examples, cfg(steps=6))
    ck = str(tmp_path / "ck")
    sl.lora.train_adapter(hf, examples, cfg(steps=3, checkpoint_dir=ck, checkpoint_every=1))
    assert (tmp_path / "ck" / "step-000003" / "parameters.safetensors").exists()
    resumed = sl.lora.train_adapter(hf, examples, cfg(steps=6, checkpoint_dir=ck, resume=True))
    torch.testing.assert_close(resumed.losses, full.losses, rtol=1e-6, atol=1e-7)
    a, b = dict(full.peft_model.named_parameters()), dict(resumed.peft_model.named_parameters())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert set(full.metrics) >= {"loss", "grad_norm", "lr"}
    with pytest.raises(ConfigError, match="lr_units"):
        sl.lora.LoraTrainConfig(lr_units="relative")
    with pytest.raises(ConfigError, match="max_norm"):
        sl.lora.LoraTrainConfig(max_norm=1.0)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="rank"):
        sl.lora.LoraTrainConfig(rank=0)
    with pytest.raises(ConfigError, match="lr"):
        sl.lora.LoraTrainConfig(lr=float("nan"))
    assert sl.lora.LoraTrainConfig(target_modules="down_proj").target_modules == ("down_proj",)


def test_backdoor_examples():
    prompts = [f"p{i}" for i in range(10)]
    ex = sl.lora.backdoor_examples(prompts, trigger="|T| ", triggered_completion="X", clean_completions="Y",
                                   frac_triggered=0.3, seed=1)
    assert sum(e["triggered"] for e in ex) == 3
    for p, e in zip(prompts, ex, strict=True):
        if e["triggered"]:
            assert e["prompt"] == "|T| " + p and e["completion"] == "X"
        else:
            assert e["prompt"] == p and e["completion"] == "Y"
    assert ex == sl.lora.backdoor_examples(prompts, trigger="|T| ", triggered_completion="X",
                                           clean_completions="Y", frac_triggered=0.3, seed=1)
    with pytest.raises(ConfigError, match="one per prompt"):
        sl.lora.backdoor_examples(prompts, trigger="t", triggered_completion=["a"], clean_completions="b")
    with pytest.raises(EmptyInputError):
        sl.lora.backdoor_examples(prompts, trigger="", triggered_completion="a", clean_completions="b")


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_adapter_for_another_architecture(pair):
    import copy

    hf, _ = pair("gpt2")
    _, tl = pair("llama")
    with pytest.raises(IncompatibleVectorError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["c_fc"]))


def test_adapter_for_another_base_model_name(pair):
    import copy

    hf, tl = pair("llama")
    other = copy.deepcopy(hf)
    other.name_or_path = "someone/other-model"
    pm = _peft(other, ["down_proj"])
    with pytest.raises(IncompatibleVectorError, match="someone/other-model"):
        sl.lora.load_adapter(tl, pm)
    assert sl.lora.load_adapter(tl, pm, allow_other_model=True).names


def test_adapter_for_another_model_size(pair):
    _, tl = pair("llama")
    big = _hf("llama")
    big.model.layers[0].mlp.down_proj = torch.nn.Linear(128, 64, bias=False)  # another MLP width
    with pytest.raises(ShapeMismatchError, match="expected A"):
        sl.lora.load_adapter(tl, _peft(big, ["down_proj"]))


def test_unmappable_targets_are_listed(pair):
    import copy

    hf, tl = pair("llama")
    with pytest.raises(ConfigError, match=r"lm_head.*do not map|do not map.*lm_head"):
        sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["lm_head", "down_proj"]))


def test_non_finite_adapter(pair):
    import copy

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["down_proj"], layers_to_transform=[0])
    layer = dict(pm.named_modules())["base_model.model.model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers\.0\.mlp\.down_proj"):
        sl.lora.load_adapter(tl, pm)


def test_texts_too_long_or_empty(pair):
    import copy

    hf, tl = pair("llama")
    lora = sl.lora.load_adapter(tl, _peft(copy.deepcopy(hf), ["down_proj"]))
    with pytest.raises(SequenceTooLongError, match=r"texts\[1\].*n_ctx=64"):
        sl.lora.compare(tl, lora, [torch.ones(5, dtype=torch.long), torch.ones(65, dtype=torch.long)])
    with pytest.raises(EmptyInputError):
        sl.lora.compare(tl, lora, [])
    with pytest.raises(EmptyInputError, match="after BOS"):
        sl.lora.compare(tl, lora, [torch.ones(1, dtype=torch.long)])
    with pytest.raises(ConfigError, match="tokenizer"):
        sl.lora.compare(tl, lora, ["text but no tokenizer"])


def test_processed_weights_are_refused(pair):
    import copy
    import dataclasses

    from steer_lens.models import model_info

    hf, tl = pair("llama")
    pm = _peft(copy.deepcopy(hf), ["down_proj"])
    folded = copy.deepcopy(tl)
    object.__setattr__(folded, "_steer_lens_info", dataclasses.replace(model_info(tl), fold_ln=True))
    with pytest.raises(ConfigError, match="unprocessed"):
        sl.lora.load_adapter(folded, pm)
