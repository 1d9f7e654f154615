"""Tests of steer_lens.sae: SAE features of steering vectors (sae-lens).

Closed-form cases (a vector along one decoder direction; a perfect SAE whose error term is zero; a
model whose logits are linear in the SAE's activations) and references (TransformerLens caches,
sae-lens encode/decode) on tiny random models; one real-model test.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import (
    ConfigError,
    EmptyInputError,
    HookNameError,
    MetricError,
    ShapeMismatchError,
)

sae_lens = pytest.importorskip("sae_lens")

D = 32
HOOK = "blocks.1.hook_resid_pre"


def _model(family="llama", **kw):
    return sl.random_model(family, d_model=D, n_heads=4, d_vocab=50, n_ctx=32, seed=0, **kw)


def _tokens(n=6, pos=12, seed=0):
    return torch.randint(0, 50, (n, pos), generator=torch.Generator().manual_seed(seed))


def _topk_sae(model, hook=HOOK, d_sae=64, k=6, seed=0, rescale=False):
    torch.manual_seed(seed)
    cfg = sae_lens.TopKSAEConfig(d_in=int(model.cfg.d_model), d_sae=d_sae, k=k,
                                 rescale_acts_by_decoder_norm=rescale)
    sae = sae_lens.TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T * (1.0 + torch.rand(d_sae, 1)))  # decoder rows of varied norm
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = sl.model_info(model).name
    return sae


def _perfect_sae(model, hook=HOOK):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, so the error term is 0."""
    d = int(model.cfg.d_model)
    cfg = sae_lens.StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False)
    sae = sae_lens.StandardSAE(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = sl.model_info(model).name
    return sae


def _last_logit_diff(logits):
    return logits[:, -1, 3] - logits[:, -1, 7]


# ---------------------------------------------------------------------------------------------------
# vector_features
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [False, True])
def test_vector_along_decoder_direction_is_first_with_cosine_one(rescale):
    model = _model()
    sae = _topk_sae(model, rescale=rescale)
    i, c = 17, 2.5
    v = c * sae.W_dec[i].detach()
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init=v)
    vf = sl.sae.vector_features(steered, sae, k=5)
    assert vf.same_hook and vf.note == ""
    assert int(vf.top_cosine[0]) == i
    assert float(vf.cosine[i]) == pytest.approx(1.0, abs=1e-5)
    assert int(vf.sparse_features[0]) == i
    assert vf.residual_norm == pytest.approx(0.0, abs=1e-4 * float(v.norm()))
    # the OMP coefficient is on the effective (unit, when rescaled) decoder direction
    scale = float(sae.W_dec[i].detach().norm()) if rescale else 1.0
    assert float(vf.sparse_coefficients[0]) == pytest.approx(c * scale, rel=1e-4)
    # encoder pre-activation is v @ W_enc (times the decoder norm when the SAE rescales)
    pre = v @ sae.W_enc.detach()
    if rescale:
        pre = pre * sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(vf.pre_activation, pre, rtol=1e-5, atol=1e-5)
    assert int(vf.top_pre_activation[0]) == int(torch.argmax(pre))
    df = vf.to_pandas("sparse")
    assert list(df.columns) == ["feature", "cosine", "pre_activation", "coefficient", "residual_norm"]
    assert vf.plot().data and "<table" in vf._repr_html_()


def test_vector_features_scale_and_sparse_reconstruction_of_two_features():
    model = _model()
    sae = _topk_sae(model)
    v = 1.5 * sae.W_dec[3].detach() - 0.7 * sae.W_dec[40].detach()
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init=v, scale=2.0)
    vf = sl.sae.vector_features(steered, sae, k=2)
    assert set(vf.sparse_features.tolist()) == {3, 40}
    coef = dict(zip(vf.sparse_features.tolist(), vf.sparse_coefficients.tolist(), strict=True))
    assert coef[3] == pytest.approx(3.0, rel=1e-4) and coef[40] == pytest.approx(-1.4, rel=1e-4)
    assert vf.vector_norm == pytest.approx(float(2 * v.norm()), rel=1e-5)
    assert vf.relative_residual < 1e-4


def test_vector_at_other_hook_warns_and_points_to_activation_shift():
    model = _model()
    sae = _topk_sae(model)
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=1.0)
    with pytest.warns(sl.sae.HookMismatchWarning, match="activation_shift"):
        vf = sl.sae.vector_features(steered, sae)
    assert not vf.same_hook and "activation_shift" in vf.note


# ---------------------------------------------------------------------------------------------------
# splicing, attribution and ablation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_spliced_with_error_term_equals_plain_model_exactly(family):
    model = _model(family)
    sae = _topk_sae(model)
    toks = _tokens()
    plain = model(toks)
    spliced = model.run_with_hooks(toks, fwd_hooks=sl.sae.splice_hooks(sae))
    assert torch.equal(plain, spliced)
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=2.0)
    assert torch.equal(steered(toks), steered.run_with_hooks(toks, fwd_hooks=sl.sae.splice_hooks(sae)))
    # without the error term the reconstruction replaces the activation (different logits)
    recon = model.run_with_hooks(toks, fwd_hooks=sl.sae.splice_hooks(sae, error_term=False))
    assert not torch.allclose(plain, recon)


def test_attribution_is_exact_for_a_metric_linear_in_the_activations():
    # no final norm: logits = resid_post @ W_U + b_U, linear in the SAE's activations at the last layer
    model = _model("gpt2", normalization_type=None)
    hook = "blocks.1.hook_resid_post"
    sae = _topk_sae(model, hook=hook)
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=3.0)
    toks = _tokens(n=5)

    def metric(logits):
        return logits[:, :, 3].sum(-1) - 2.0 * logits[:, -1, 7]

    attr = sl.sae.attribute(steered, sae, toks, metric, batch_size=2, ablation_sizes=(1, 3), n_random=2)
    with torch.no_grad(), steered.disabled():
        base = metric(steered(toks)).mean()
    steer = metric(steered(toks)).detach().mean()
    assert attr.metric_base == pytest.approx(float(base), rel=1e-5)
    assert attr.metric_steered == pytest.approx(float(steer), rel=1e-5)
    # features + error term = exact effect
    assert attr.total_attribution == pytest.approx(attr.effect, rel=1e-4, abs=1e-4)
    # features alone = exact effect of setting every feature to its base value (ablation "all")
    all_row = next(r for r in attr.ablation if r["kind"] == "all")
    removed = attr.metric_steered - all_row["metric"]
    assert float(attr.attribution.double().sum()) == pytest.approx(removed, rel=1e-4, abs=1e-4)
    # top-1 ablation is exact too for a linear metric
    top1 = next(r for r in attr.ablation if r["kind"] == "top" and r["n"] == 1)
    f = int(attr.top(1)["feature"][0])
    assert float(attr.attribution[f]) == pytest.approx(attr.metric_steered - top1["metric"], rel=1e-3, abs=1e-4)
    assert {r["kind"] for r in attr.ablation} == {"top", "random", "all"}
    assert attr.plot().data and "<table" in attr._repr_html_()


def test_ablating_all_features_removes_the_whole_effect_when_the_error_term_is_zero():
    model = _model("llama")
    sae = _perfect_sae(model)
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_post"], init="random", init_norm=3.0)
    toks = _tokens(n=4)
    attr = sl.sae.attribute(steered, sae, toks, _last_logit_diff, ablation_sizes=(2,), n_random=1)
    assert abs(attr.effect) > 1e-3
    assert attr.error_attribution == pytest.approx(0.0, abs=1e-5)
    all_row = next(r for r in attr.ablation if r["kind"] == "all")
    assert all_row["metric"] == pytest.approx(attr.metric_base, abs=1e-4)
    assert all_row["fraction_removed"] == pytest.approx(1.0, abs=1e-3)


def test_ablating_all_features_leaves_exactly_the_error_terms_share():
    model = _model("llama")
    sae = _topk_sae(model)
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init="random", init_norm=3.0)
    toks = _tokens(n=3)
    attr = sl.sae.attribute(steered, sae, toks, _last_logit_diff, ablation_sizes=(1,), n_random=0)
    all_row = next(r for r in attr.ablation if r["kind"] == "all")

    # reference: base run with only the change of the error term added at the hook
    def err(x):
        return x - sae.decode(sae.encode(x))

    with torch.no_grad():
        _, cb = model.run_with_cache(toks, names_filter=[HOOK])
        _, cs = steered.run_with_cache(toks, names_filter=[HOOK])
        d_err = err(cs[HOOK]) - err(cb[HOOK])
        ref = model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: a + d_err)])
    assert all_row["metric"] == pytest.approx(float(_last_logit_diff(ref).mean()), abs=1e-4)


def test_attribute_bad_metric_and_no_leaked_hooks():
    model = _model()
    sae = _topk_sae(model)
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init="random", init_norm=1.0)
    toks = _tokens(n=2)
    before = model(toks)
    with pytest.raises(MetricError, match="shape"):
        sl.sae.attribute(steered, sae, toks, lambda logits: logits[:, -1])

    def boom(logits):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        sl.sae.attribute(steered, sae, toks, boom)
    assert torch.equal(model(toks), before)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_scalar_metric_is_a_batch_mean():
    model = _model()
    sae = _topk_sae(model)
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init="random", init_norm=1.0)
    toks = _tokens(n=4)
    a = sl.sae.attribute(steered, sae, toks, _last_logit_diff, batch_size=3, ablation=False)
    b = sl.sae.attribute(steered, sae, toks, lambda lg: _last_logit_diff(lg).mean(), batch_size=3,
                         ablation=False)
    assert a.effect == pytest.approx(b.effect, rel=1e-5)
    torch.testing.assert_close(a.attribution, b.attribution, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# activation_shift
# ---------------------------------------------------------------------------------------------------
def test_activation_shift_matches_reference_and_perfect_sae_explains_all():
    model = _model()
    sae = _topk_sae(model)
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=2.0)
    toks = _tokens(n=5)
    shift = sl.analysis.activation_shift(steered, sae, toks, batch_size=2, per_token_texts=3)
    with torch.no_grad():
        _, cb = model.run_with_cache(toks, names_filter=[HOOK])
        _, cs = steered.run_with_cache(toks, names_filter=[HOOK])
        fb, fs = sae.encode(cb[HOOK]), sae.encode(cs[HOOK])
    torch.testing.assert_close(shift.mean_shift, (fs - fb).mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shift.mean_base, fb.mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shift.token_shift[1], (fs - fb)[1], rtol=1e-4, atol=1e-6)
    assert shift.n_tokens == toks.numel() and len(shift.token_shift) == 3
    assert shift.plot().data and shift.token_view() is not None

    perfect = _perfect_sae(model)
    s2 = sl.analysis.activation_shift(steered, perfect, toks)
    assert s2.explained == pytest.approx(1.0, abs=1e-5)
    assert s2.explained_mean == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        err = lambda x: x - sae.decode(sae.encode(x))
        d_err = (err(cs[HOOK]) - err(cb[HOOK])).mean(dim=(0, 1))
    torch.testing.assert_close(shift.mean_error_change, d_err, rtol=1e-4, atol=1e-5)


def test_activation_shift_of_a_vector_at_the_hook_is_the_vector():
    model = _model()
    sae = _perfect_sae(model)
    v = torch.randn(D, generator=torch.Generator().manual_seed(1))
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init=v)
    shift = sl.analysis.activation_shift(steered, sae, _tokens(n=3))
    torch.testing.assert_close(shift.mean_residual_change, v, rtol=1e-4, atol=1e-5)
    assert shift.residual_change_sq == pytest.approx(float(v.pow(2).sum()), rel=1e-4)


def test_vector_downstream_of_the_sae_warns_and_shifts_nothing():
    model = _model()
    sae = _topk_sae(model, hook="blocks.0.hook_resid_pre")
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init="random", init_norm=1.0)
    with pytest.warns(sl.sae.HookMismatchWarning, match="downstream"):
        shift = sl.analysis.activation_shift(steered, sae, _tokens(n=2))
    assert float(shift.mean_abs_shift.abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input():
    model = _model()
    steered = sl.SteeredTransformer(model, hooks=[HOOK], init="random", init_norm=1.0)
    toks = _tokens(n=2)
    with pytest.raises(HookNameError, match=r"blocks\.9\.hook_resid_pre"):
        sl.sae.vector_features(steered, _topk_sae(model, hook="blocks.9.hook_resid_pre"))
    wide = sl.random_model("llama", d_model=48, n_heads=4, d_vocab=50, n_ctx=32)
    with pytest.raises(ShapeMismatchError, match="d_in=48"):
        sl.analysis.activation_shift(steered, _topk_sae(wide), toks)
    other = _topk_sae(model)
    other.cfg.metadata.model_name = "gpt2-small"
    with pytest.warns(sl.sae.SAEModelMismatchWarning, match=r"gpt2-small.*random-llama"):
        sl.sae.vector_features(steered, other)
    sae = _topk_sae(model)
    with pytest.raises(EmptyInputError):
        sl.analysis.activation_shift(steered, sae, [])
    with pytest.raises(EmptyInputError):
        sl.sae.attribute(steered, sae, torch.zeros(0, 5, dtype=torch.long), _last_logit_diff)
    with pytest.raises(ConfigError, match="tokenizer"):
        sl.analysis.activation_shift(steered, sae, ["a text"])
    with pytest.raises(ConfigError, match="sae"):
        sl.sae.vector_features(steered, object())
    with pytest.raises(ConfigError, match="k"):
        sl.sae.vector_features(steered, sae, k=0)
    normed = _topk_sae(model)
    normed.cfg.normalize_activations = "layer_norm"
    with pytest.raises(ConfigError, match="layer_norm"):
        sl.analysis.activation_shift(steered, normed, toks)
    nohook = _topk_sae(model)
    nohook.cfg.metadata.hook_name = None
    with pytest.raises(ConfigError, match="hook"):
        sl.analysis.activation_shift(steered, nohook, toks)


# ---------------------------------------------------------------------------------------------------
# training, evaluation, save / load, feature views
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    model = _model()
    toks = _tokens(n=48, pos=16, seed=3)
    state = torch.get_rng_state()
    res = sl.sae.train(model, HOOK, toks, d_sae=64, k=4, training_tokens=4096, batch_size=256,
                       buffer_size=1024, eval_texts=_tokens(n=8, pos=16, seed=4))
    assert torch.equal(torch.get_rng_state(), state)  # the user's RNG is untouched
    return model, res


def test_train_returns_a_sae_lens_topk_sae_with_metadata(trained):
    model, res = trained
    assert isinstance(res.sae, sae_lens.TopKSAE)
    assert res.hook == HOOK and res.sae.cfg.metadata.model_name == sl.model_info(model).name
    assert res.n_training_tokens == 4096 and res.sae.cfg.k == 4
    q = res.quality
    assert q is not None and 0 < q.l0 <= 4 and 0 <= q.dead_features <= 64 and q.n_tokens == 128
    assert q.fvu == pytest.approx(sl.sae.evaluate(model, res, _tokens(n=8, pos=16, seed=4)).fvu)
    assert "<table" in res._repr_html_() and res.plot().data


def test_evaluate_matches_reference(trained):
    model, res = trained
    sae = res.sae
    toks = _tokens(n=4, pos=10, seed=5)
    q = sl.sae.evaluate(model, sae, toks, batch_size=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[HOOK])
        x = cache[HOOK].reshape(-1, D)
        f = sae.encode(x)
        fvu = (x - sae.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        ce = model(toks, return_type="loss")
        spliced = model.run_with_hooks(toks, fwd_hooks=sl.sae.splice_hooks(sae, error_term=False),
                                       return_type="loss")
    assert q.fvu == pytest.approx(float(fvu), rel=1e-4)
    assert q.l0 == pytest.approx(float((f > 0).float().sum(-1).mean()), rel=1e-5)
    assert q.ce_clean == pytest.approx(float(ce), rel=1e-4)
    assert q.ce_spliced == pytest.approx(float(spliced), rel=1e-4)
    assert q.dead_features == int(((f > 0).sum(0) == 0).sum())


def test_train_standard_architecture_and_config_errors():
    model = _model()
    res = sl.sae.train(model, HOOK, _tokens(n=16, pos=16), d_sae=48, architecture="standard",
                       training_tokens=1024, batch_size=256, buffer_size=512)
    assert isinstance(res.sae, sae_lens.StandardSAE) and res.quality is None
    with pytest.raises(ConfigError, match="lr"):
        sl.sae.SAETrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="k"):
        sl.sae.SAETrainConfig(d_sae=8, k=9)
    with pytest.raises(ConfigError, match="unknown"):
        sl.sae.train(model, HOOK, _tokens(), lr_schedule="x")
    with pytest.raises(HookNameError):
        sl.sae.train(model, "blocks.7.hook_resid_pre", _tokens())
    with pytest.raises(EmptyInputError):
        sl.sae.train(model, HOOK, [])


def test_save_and_load_round_trip(trained, tmp_path: Path):
    _, res = trained
    folder = res.save(tmp_path / "sae")
    assert {p.name for p in folder.iterdir()} >= {"cfg.json", "sae_weights.safetensors",
                                                  "steer_lens_quality.json"}
    sae = sl.sae.load(folder)
    x = torch.randn(5, D)
    torch.testing.assert_close(sae.encode(x), res.sae.encode(x))
    assert sae.cfg.metadata.hook_name == HOOK
    # sae-lens loads it too
    assert isinstance(sae_lens.SAE.load_from_disk(folder), sae_lens.TopKSAE)
    with pytest.raises(ConfigError, match="trained on"):
        sl.sae.load(folder, hook="blocks.0.hook_resid_pre")
    with pytest.raises(FileNotFoundError, match="sae_id"):
        sl.sae.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no-such-release"):
        sl.sae.load("no-such-release", sae_id="x")  # sae-lens rejects it before any download


def test_feature_views(trained):
    model, res = trained
    sae = res.sae
    lens = sl.sae.feature_logit_lens(model, sae, [2, 5], k=3)
    ref = sae.W_dec.detach()[[2, 5]] @ model.W_U.detach()
    torch.testing.assert_close(lens.logits, ref, rtol=1e-5, atol=1e-5)
    assert lens.top_tokens[0][0] == f"<{int(ref[0].argmax())}>"
    toks = _tokens(n=6, pos=10, seed=7)
    top = sl.sae.top_activating_tokens(model, sae, [2, 5], toks, n=3, batch_size=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[HOOK])
        f = sae.encode(cache[HOOK])
    for feat in [2, 5]:
        best = float(f[..., feat].max())
        if best > 0:
            a, t, p, _, _ = top.examples[feat][0]
            assert a == pytest.approx(best, rel=1e-5) and float(f[t, p, feat]) == pytest.approx(best, rel=1e-5)
        assert len(top.examples[feat]) <= 3
    assert top.to_pandas().shape[1] == 7
    with pytest.raises(ConfigError):
        sl.sae.feature_logit_lens(model, sae, [999])


# ---------------------------------------------------------------------------------------------------
# real model
# ---------------------------------------------------------------------------------------------------
REAL = "raincandy-u/TinyStories-656K"


def _real_available() -> bool:
    cache = os.environ.get("HF_HUB_CACHE")
    return bool(cache) and (Path(cache) / ("models--" + REAL.replace("/", "--"))).exists()


def _real_texts() -> list[str]:
    data = Path(os.environ.get("STEER_LENS_DATA", Path(__file__).parents[2] / "shared" / "data" / "tinystories"))
    texts: list[str] = []
    for f in sorted(data.glob("*.txt")):
        for part in f.read_text().replace("<|endoftext|>", "\n").split("\n"):
            if part.strip():
                texts.append(part.strip())
    return texts


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not _real_available(), reason="TinyStories-656K is not in HF_HUB_CACHE")
def test_real_model_train_and_attribute():
    texts = _real_texts()
    if not texts:
        pytest.skip("no real text found (set STEER_LENS_DATA)")
    model = sl.load_model(REAL, device="cpu")
    hook = "blocks.0.hook_resid_post"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sl.sae.train(model, hook, texts[:24], d_sae=256, k=8, training_tokens=30_720,
                           batch_size=512, eval_texts=texts[24:])
    q = res.quality
    assert q is not None and q.fvu < 0.5 and q.l0 <= 8 and q.loss_recovered > 0.5
    steered = sl.SteeredTransformer(model, hooks=[hook], init=4.0 * res.sae.W_dec[0].detach())
    toks = model.to_tokens(texts[24:26])
    assert torch.equal(steered(toks), steered.run_with_hooks(toks, fwd_hooks=sl.sae.splice_hooks(res)))
    vf = sl.sae.vector_features(steered, res, k=5)
    assert int(vf.top_cosine[0]) == 0
    tok = model.tokenizer
    ids = {tok.decode([i]).strip().lower(): i for i in range(int(model.cfg.d_vocab))}
    a, b = ids["dog"], ids["cat"]
    attr = sl.sae.attribute(steered, res, texts[24:28], lambda lg: lg[:, -1, a] - lg[:, -1, b],
                            ablation_sizes=(1,), n_random=1)
    assert attr.n_texts == 4 and abs(attr.effect) > 0
    assert int(attr.top(1)["feature"][0]) == 0 or abs(float(attr.attribution[0])) > 0


def test_dataset_rows_iterators_and_ragged_token_lists_give_the_same_shift():
    model = _model()
    sae = _topk_sae(model)
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=2.0)
    toks = _tokens(n=4)
    ref = sl.analysis.activation_shift(steered, sae, toks)
    rows = sl.analysis.activation_shift(steered, sae, [{"text": t} for t in toks], batch_size=3)
    it = sl.analysis.activation_shift(steered, sae, iter(list(toks)))
    for other in (rows, it):
        torch.testing.assert_close(other.mean_shift, ref.mean_shift, rtol=1e-4, atol=1e-6)
    # ragged 1-D token lists are left-padded; padding is excluded from the statistics
    ragged = [toks[0], toks[1, :7]]
    r = sl.analysis.activation_shift(steered, sae, ragged, batch_size=2)
    assert r.n_tokens == 12 + 7
    one = sl.analysis.activation_shift(steered, sae, toks[1:2, :7])
    torch.testing.assert_close(r.token_shift[1], one.token_shift[0], rtol=1e-3, atol=1e-4)
    with pytest.raises(ConfigError, match="text"):
        sl.analysis.activation_shift(steered, sae, [{"body": "x"}])


def test_interrupted_training_leaves_the_model_and_rng_untouched():
    model = _model()
    toks = _tokens(n=8)
    before = model(toks)
    state = torch.get_rng_state()

    class Interrupting:
        def __iter__(self):
            yield from toks
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sl.sae.train(model, HOOK, Interrupting(), d_sae=32, k=4, training_tokens=2048, batch_size=256,
                     buffer_size=1024)
    assert torch.equal(model(toks), before)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert torch.equal(torch.get_rng_state(), state)


def test_ablation_table_equals_the_closed_form_on_a_linear_toy():
    # issue 16 item 2: top-n can remove more than the whole effect and "all" less; both are the closed form
    # fraction(S) = sum_{i in S} attr_i / effect, exact for a metric linear at the hook (no final norm here)
    model = _model("gpt2", normalization_type=None)
    hook = "blocks.1.hook_resid_post"
    d = int(model.cfg.d_model)
    sae = _perfect_sae(model, hook=hook)                       # error term 0: "all" removes everything
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=3.0)
    toks = _tokens(n=4)
    sizes = (1, 2, 4, 8, 16, 32, 2 * d)
    attr = sl.sae.attribute(steered, sae, toks, _last_logit_diff, ablation_sizes=sizes, n_random=0)
    sign = 1.0 if attr.effect >= 0 else -1.0
    ranked = torch.sort(sign * attr.attribution.double(), descending=True).values * sign
    tops = {r["n"]: r for r in attr.ablation if r["kind"] == "top"}
    for n, row in tops.items():
        closed = float(ranked[:n].sum()) / attr.effect
        assert row["linear_estimate"] == pytest.approx(closed, rel=1e-6, abs=1e-9)
        assert row["fraction_removed"] == pytest.approx(closed, rel=1e-3, abs=1e-4)
    all_row = next(r for r in attr.ablation if r["kind"] == "all")
    assert all_row["fraction_removed"] == pytest.approx(1.0, abs=1e-3)
    assert max(r["fraction_removed"] for r in tops.values()) > 1.05              # overshoot: not monotone
    assert (ranked < 0).any()                                                    # ... from features pushing back
