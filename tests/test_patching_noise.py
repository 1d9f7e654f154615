"""Metric gaps within numerical noise are warned about and marked (issue 16, item 4)."""

from __future__ import annotations

import warnings

import pytest
import torch


def _pair(d_vocab: int, batch: int = 2, pos: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, d_vocab, (batch, pos), generator=g)
    return clean, corrupted


def _rare_token_model(token: int):
    """A tiny model that (almost) never predicts ``token``: its unembedding column is pushed far down."""
    import steer_lens as sl

    model = sl.random_model("gpt2", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    with torch.no_grad():
        model.unembed.b_U[token] -= 60.0  # p(token) ~ e^-60 on every input
    return model


def test_noise_floor_closed_form():
    import steer_lens as sl

    eps32, eps16 = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    assert sl.patching.noise_floor(0.3) == pytest.approx(100 * eps32)  # scales below 1 count as 1
    assert sl.patching.noise_floor(-8.0) == pytest.approx(800 * eps32)
    assert sl.patching.noise_floor(2.0, torch.bfloat16) == pytest.approx(200 * eps16)
    assert sl.patching.noise_floor(1.0, torch.int64) == pytest.approx(100 * eps32)  # non-float: fp32
    assert sl.patching.is_within_noise(1e-6, 1e-6)  # the prob_change case
    assert not sl.patching.is_within_noise(1e-3, 1.0)
    assert sl.patching.is_within_noise(float("nan"), 1.0)
    assert not sl.patching.is_within_noise(1e-3, 1.0, torch.float64)
    assert sl.patching.is_within_noise(1e-3, 1.0, torch.bfloat16)


def test_activation_patch_warns_and_marks_a_gap_within_noise():
    import steer_lens as sl

    token = 11
    model = _rare_token_model(token)
    clean, corrupted = _pair(model.cfg.d_vocab)
    metric = sl.patching.prob_change(token)
    with pytest.warns(sl.patching.NoisyMetricWarning, match="clean and corrupted metrics differ") as rec:
        res = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_pre")
    assert rec[0].filename == __file__  # points at the caller, not at steer_lens
    assert res.within_noise and res.noise_floor == pytest.approx(sl.patching.noise_floor(0.0))
    assert abs(res.clean_metric - res.corrupted_metric) < 1e-20
    assert torch.isnan(res.normalized()).all()  # fractions of a noise gap are not reported
    assert "WITHIN NOISE" in repr(res) and "WITHIN NOISE" in res._repr_html_()
    with pytest.warns(sl.patching.NoisyMetricWarning, match="attribution_patch"):
        att = sl.patching.attribution_patch(model, clean, corrupted, metric, "resid_pre")
    assert att.within_noise
    with pytest.warns(sl.patching.NoisyMetricWarning) as rec:
        every = sl.patching.activation_patch_block_every(model, clean, corrupted, metric)
    assert every.within_noise and len(rec) == 1  # one warning for the stacked result


def test_scaled_metric_with_a_tiny_gap_warns():
    import steer_lens as sl

    model = sl.random_model("neox", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    clean, corrupted = _pair(model.cfg.d_vocab, seed=1)
    ld = sl.patching.logit_diff(3, 7)

    def tiny(logits):  # a real metric, in units that make its gap ~1e-9
        return 1e-9 * ld(logits)

    with pytest.warns(sl.patching.NoisyMetricWarning):
        res = sl.patching.activation_patch(model, clean, corrupted, tiny, "z")
    assert res.within_noise


def test_a_normal_metric_does_not_warn(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=2)
    metric = sl.patching.logit_diff(3, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.patching.NoisyMetricWarning)
        res = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_pre")
        att = sl.patching.attribution_patch(model, clean, corrupted, metric, "resid_pre")
        steered = sl.SteeredTransformer(
            model, hooks=["blocks.1.hook_resid_pre"], init="random", init_norm=2.0, seed=0
        )
        den = sl.patching.steering_patch(steered, clean, metric, "resid_pre")
    for r in (res, att, den):
        assert not r.within_noise and r.noise_floor > 0
        assert abs(r.clean_metric - r.corrupted_metric) > 100 * r.noise_floor
        assert "WITHIN NOISE" not in repr(r)
    assert not torch.isnan(res.normalized()).any()


def test_steering_patch_with_a_vector_that_does_nothing_warns(tiny_model):
    import steer_lens as sl

    model = tiny_model
    steered = sl.SteeredTransformer(
        model, hooks=["blocks.1.hook_resid_pre"], init="random", init_norm=1e-9, seed=0
    )
    tokens, _ = _pair(model.cfg.d_vocab, seed=3)
    with pytest.warns(sl.patching.NoisyMetricWarning, match="steered and base metrics"):
        den = sl.patching.steering_patch(steered, tokens, sl.patching.logprob(3), "resid_pre")
    assert den.within_noise
    with pytest.warns(sl.patching.NoisyMetricWarning, match="base and steered metrics"):
        noi = sl.patching.steering_patch(steered, tokens, sl.patching.logprob(3), "resid_pre", mode="noise")
    assert noi.within_noise


def test_path_patch_marks_a_gap_within_noise_and_gives_no_additivity(tiny_model):
    import steer_lens as sl

    model = tiny_model
    tokens, _ = _pair(model.cfg.d_vocab, seed=3)
    tiny = sl.SteeredTransformer(model, hooks=["blocks.1.hook_resid_pre"], init="random", init_norm=1e-9, seed=0)
    with pytest.warns(sl.patching.NoisyMetricWarning, match="path_patch"):
        res = sl.patching.path_patch(tiny, tokens, sl.patching.logprob(3), variants=False)
    assert res.within_noise and res.noise_floor > abs(res.total_effect)
    assert res.additivity != res.additivity                   # NaN: a ratio of float noise is not reported
    big = sl.SteeredTransformer(model, hooks=["blocks.1.hook_resid_pre"], init="random", init_norm=50.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.patching.NoisyMetricWarning)
        ok = sl.patching.path_patch(big, tokens, sl.patching.logprob(3), variants=False)
    assert not ok.within_noise and ok.additivity == ok.additivity
