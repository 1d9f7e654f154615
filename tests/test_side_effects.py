"""Side effects of a vector on the model's own samples (issue 16 item 1): the measures against
independent references, and SFT's KL-to-base term and side-effect report."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

HOOK = "blocks.1.hook_resid_pre"


# ---------------------------------------------------------------------------------------------------
# the measures against references
# ---------------------------------------------------------------------------------------------------
def test_next_token_kl_matches_torch_kl_div_and_a_hand_value():
    from steer_lens.train.side_effects import next_token_kl

    g = torch.Generator().manual_seed(0)
    s, b = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.4
    # KL(p_s || p_b) per position = kl_div(input=log p_b, target=log p_s, log_target=True) summed over vocab
    per_pos = torch.nn.functional.kl_div(b.log_softmax(-1), s.log_softmax(-1), log_target=True,
                                         reduction="none").sum(-1)
    torch.testing.assert_close(next_token_kl(s, b, mask), per_pos[mask].mean(), rtol=1e-6, atol=1e-7)
    # two tokens: p_s = (1/2, 1/2), p_b = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    s2 = torch.zeros(1, 1, 2)
    b2 = torch.tensor([[[math.log(3.0), 0.0]]])
    kl = next_token_kl(s2, b2, torch.ones(1, 1, dtype=torch.bool))
    assert math.isclose(float(kl), 0.5 * math.log(4 / 3), rel_tol=1e-6)


def test_distinct_n_and_repeat_rate_closed_forms():
    from steer_lens.errors import ConfigError
    from steer_lens.train.side_effects import distinct_n, repeat_rate

    alt = [1, 2, 1, 2, 1, 2]  # 2-grams 12 21 12 21 12: 2 distinct of 5; every token from the 3rd repeats
    assert distinct_n([alt], 2) == pytest.approx(2 / 5)
    assert repeat_rate([alt], window=4) == pytest.approx(4 / 5)
    assert repeat_rate([alt], window=1) == 0.0  # each token differs from the one just before
    fresh = [1, 2, 3, 4, 5, 6]
    assert distinct_n([fresh], 2) == 1.0 and repeat_rate([fresh]) == 0.0
    const = [7] * 5  # 4 identical 2-grams; every token after the first repeats
    assert distinct_n([const], 2) == pytest.approx(1 / 4) and repeat_rate([const]) == 1.0
    # distinct-n averages per sequence; the repeat rate pools tokens over sequences
    assert distinct_n([alt, fresh], 2) == pytest.approx((2 / 5 + 1) / 2)
    assert repeat_rate([alt, fresh]) == pytest.approx(4 / 10)
    assert distinct_n([[1, 1, 2]], 1) == pytest.approx(2 / 3)
    assert math.isnan(distinct_n([[3]], 2)) and math.isnan(repeat_rate([[3]]))
    with pytest.raises(ConfigError, match="n"):
        distinct_n([alt], 0)
    with pytest.raises(ConfigError, match="window"):
        repeat_rate([alt], window=0)


def test_check_side_effects_thresholds():
    from steer_lens.train.side_effects import check_side_effects

    assert check_side_effects(0.5, 0.95, 0.99, 0.05, 0.01) == ()
    reasons = check_side_effects(1.5, 0.80, 0.99, 0.2, 0.01)
    assert len(reasons) == 3 and "KL" in reasons[0] and "distinct-2" in reasons[1] and "repeat" in reasons[2]


# ---------------------------------------------------------------------------------------------------
# gradient of the KL term (float64, random model: autograd vs finite differences)
# ---------------------------------------------------------------------------------------------------
def test_gradient_of_the_kl_term_flows_into_the_vector():
    import steer_lens as sl
    from steer_lens.train.side_effects import sample_kl, sample_rows

    model = sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1,
                            dtype=torch.float64)
    steered = sl.SteeredTransformer(model, [HOOK])
    steered.vectors.to(torch.float64)
    v0 = torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    steered.vectors.set_(HOOK, v0)
    gen = sample_rows(steered, [[1, 5, 7], [1, 9]], 6, seed=0)
    with steered.gradients():
        kl = sample_kl(steered, gen)
        kl.backward()
    param = next(p for p in steered.vectors.parameters() if p.grad is not None)
    grad = param.grad.reshape(-1).clone()
    assert float(kl.detach()) > 0 and grad.norm() > 0 and torch.isfinite(grad).all()
    d = torch.randn(32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-3  # central differences: O(eps^2) error; smaller eps meets fp32 parts of the forward

    def kl_at(v):
        steered.vectors.set_(HOOK, v)
        with torch.no_grad():
            return float(sample_kl(steered, gen))

    fd = (kl_at(v0 + eps * d) - kl_at(v0 - eps * d)) / (2 * eps)
    assert fd == pytest.approx(float(grad @ d), rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# on the real model
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def steered(real_model):
    import steer_lens as sl

    return sl.SteeredTransformer(real_model, [HOOK])


def _train(sentences, word="dog", n=20):
    return [s for s in sentences if f" {word}" in s][:n]


@pytest.mark.real_model
def test_zero_vector_has_zero_kl_and_the_base_samples(steered):
    from steer_lens.train.side_effects import sample_rows, side_effects

    se = side_effects(steered, ["Once upon a time", "Tom"] * 4, max_new_tokens=16, seed=3)
    assert se.kl == 0.0 and se.healthy
    assert se.completions == se.base_completions
    assert (se.distinct_2, se.repeat_rate) == (se.base_distinct_2, se.base_repeat_rate)
    rows = [steered.to_tokens(p).tolist() for p in ["Once upon a time", "Tom"] * 4]
    with steered.disabled():
        base = sample_rows(steered, rows, 16, seed=3)
    assert torch.equal(se.tokens, base.tokens.cpu())


@pytest.mark.real_model
def test_huge_vector_warns_zero_vector_does_not(steered, real_model, sentences):
    import steer_lens as sl
    from steer_lens.train.side_effects import SideEffectWarning

    config = sl.train.SFTConfig(steps=1, lr=1e-6, progress=False, side_effect_tokens=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SideEffectWarning)
        res = sl.train.sft(steered, _train(sentences), config)
    assert res.side_effects is not None and res.side_effects.healthy and res.side_effects.kl < 1e-6
    huge = sl.SteeredTransformer(real_model, [HOOK])
    huge.vectors.set_(HOOK, torch.randn(128, generator=torch.Generator().manual_seed(0)) * 200)
    with pytest.warns(SideEffectWarning, match="KL to the base model"):
        res = sl.train.sft(huge, _train(sentences), config)
    assert not res.side_effects.healthy and res.side_effects.kl > 1.0


@pytest.mark.real_model
def test_kl_term_is_added_to_the_loss_and_logged(real_model, sentences):
    import steer_lens as sl

    def run(kl_coef):
        st = sl.SteeredTransformer(real_model, [HOOK], init="random", init_norm=3.0, seed=0)
        cfg = sl.train.SFTConfig(steps=3, kl_coef=kl_coef, eval_every=2, progress=False, side_effect_tokens=8)
        return sl.train.sft(st, _train(sentences), cfg)

    plain, with_kl = run(0.0), run(0.5)
    assert "kl" not in plain.metrics and (with_kl.metrics["kl"] > 0).all()
    # step 0: same vectors and batch, so the loss differs by exactly kl_coef * kl
    diff = float(with_kl.metrics["loss"][0] - plain.metrics["loss"][0])
    assert diff == pytest.approx(0.5 * float(with_kl.metrics["kl"][0]), abs=2e-6)  # fp32 losses of ~5
    # side-effect measures at eval_every (steps 0 and 2 = the last), NaN between
    logged = ~torch.isnan(plain.metrics["side/kl"])
    assert logged.tolist() == [True, False, True]
    assert {"side/distinct_2", "side/repeat_rate"} <= set(plain.metrics)


@pytest.mark.real_model
def test_kl_coef_reduces_the_kl_of_the_trained_vector(real_model, sentences):
    import steer_lens as sl

    def kl_after(kl_coef):
        st = sl.SteeredTransformer(real_model, [HOOK])
        cfg = sl.train.SFTConfig(steps=80, lr=3e-2, kl_coef=kl_coef, kl_every=2, seed=0, progress=False,
                                 eval_every=1000, side_effect_tokens=24)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sl.train.sft(st, _train(sentences), cfg).side_effects

    free, tied = kl_after(0.0), kl_after(1.0)
    assert tied.kl < 0.6 * free.kl, (free.kl, tied.kl)


@pytest.mark.real_model
def test_bad_kl_settings_are_refused_before_anything_changes(steered, sentences):
    import steer_lens as sl
    from steer_lens.errors import ConfigError

    before = steered.vectors.direction(HOOK).clone()
    bad = [{"kl_coef": -0.1}, {"kl_coef": float("nan")}, {"kl_every": 0},
           {"kl_samples": 0}, {"kl_tokens": 0}, {"side_effect_tokens": 0}, {"side_effect_prompts": "Once"},
           {"side_effect_prompts": []}, {"kl_prompts": []}, {"kl_prompts": "Once"}]
    for kw in bad:
        with pytest.raises(ConfigError, match=next(iter(kw))):
            sl.train.SFTConfig(steps=1, **kw)
    with pytest.raises(ConfigError):  # a float tensor is not a prompt: refused before the first step
        sl.train.sft(steered, _train(sentences),
                     sl.train.SFTConfig(steps=1, progress=False, side_effect_prompts=[torch.ones(3)]))
    assert torch.equal(steered.vectors.direction(HOOK), before)


@pytest.mark.real_model
def test_side_effect_prompts_and_heldout_loss_on_the_result(steered, sentences):
    import steer_lens as sl

    held = [s for s in sentences if " dog" not in s][:8]
    cfg = sl.train.SFTConfig(steps=2, progress=False, eval_texts=held, side_effect_prompts=["Once upon a time"] * 4,
                             side_effect_tokens=8)
    res = sl.train.sft(steered, _train(sentences), cfg)
    se = res.side_effects
    assert se.tokens.shape[0] == 4 and len(se.completions) == 4
    assert se.heldout_loss == pytest.approx(sl.train.heldout_loss(steered, held), rel=1e-6)
    with steered.disabled():
        assert se.base_heldout_loss == pytest.approx(sl.train.heldout_loss(steered, held), rel=1e-6)
    assert set(se.to_pandas()["measure"]) == {"kl", "distinct_2", "repeat_rate", "heldout_loss"}
    assert "SideEffects" in res._repr_html_()
    assert len(se.plot().data) == 2  # base and steered bars
    off = sl.train.sft(steered, _train(sentences), sl.train.SFTConfig(steps=1, progress=False,
                                                                       measure_side_effects=False))
    assert off.side_effects is None and "side/kl" not in off.metrics
