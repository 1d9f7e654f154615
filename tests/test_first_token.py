"""first_token_concentration and prefix_substitution (Sinii et al. 2025, Section 6).

``max_delta_p`` is recomputed here by brute force: for every kept sample and generated position,
the model runs the sample's own prefix (no padding) with the vector added by a hand-written hook
(``model.run_with_hooks``) and without it, and the test takes ``max_w`` of the difference of the
tempered softmaxes.
"""

from __future__ import annotations

import math

import pytest
import torch

HOOK_LAST = "blocks.1.hook_resid_post"


def _steered(model, hook: str, scale: float = 1.0, seed: int = 0, norm: float = 4.0):
    import steer_lens as sl

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm() * norm
    return sl.SteeredTransformer(model, [hook], init={hook: v}, scale=scale), v * scale


def _brute_force(model, hook: str, v, res, temperature: float, named_ids: list[int]):
    """Per kept sample and generated position: (max Δp, arg-max id, Δp of named ids), by hand."""
    out_max = torch.full_like(res.max_delta_p, float("nan"))
    out_arg = torch.full_like(res.argmax_ids, -1)
    out_named = torch.full_like(res.named_delta_p, float("nan"))
    P = res.prompt_len
    for s in range(res.tokens.shape[0]):
        real = res.tokens[s][res.attention_mask[s].bool()]
        p_len = int(res.attention_mask[s, :P].sum())
        n_gen = int(res.attention_mask[s, P:].sum())
        for j in range(n_gen):
            prefix = real[: p_len + j][None]
            with torch.no_grad():
                on = model.run_with_hooks(prefix, fwd_hooks=[(hook, lambda act, hook: act + v)])[0, -1]
                off = model(prefix)[0, -1]
            dp = (on.float() / temperature).softmax(-1) - (off.float() / temperature).softmax(-1)
            out_max[s, j], out_arg[s, j] = dp.max(-1)
            for i, t in enumerate(named_ids):
                out_named[i, s, j] = dp[t]
    return out_max, out_arg, out_named


def test_max_delta_p_equals_brute_force(tiny_model):
    import steer_lens as sl

    steered, v = _steered(tiny_model, HOOK_LAST, scale=1.5)
    prompts = torch.tensor([[1, 7, 3], [4, 4, 9]])
    res = sl.analysis.first_token_concentration(steered, prompts, named_tokens=[3, 11], max_new_tokens=6,
                                                n_samples=2, seed=5, temperature=0.7, eos_only=False,
                                                batch_size=3)
    assert res.max_delta_p.shape == (4, 6) and res.named_delta_p.shape == (2, 4, 6)
    mx, arg, nd = _brute_force(tiny_model, HOOK_LAST, v, res, 0.7, [3, 11])
    torch.testing.assert_close(res.max_delta_p, mx, atol=1e-5, rtol=1e-4)
    assert torch.equal(res.argmax_ids, arg)
    torch.testing.assert_close(res.named_delta_p, nd, atol=1e-5, rtol=1e-4)
    assert float(res.max_delta_p.min()) >= 0.0  # Σ_w Δp = 0, so the largest increase is >= 0
    # the summary: position 0 against the pooled others
    fvr = res.first_vs_rest.set_index("measure")
    assert fvr.loc["max_delta_p", "first"] == pytest.approx(float(mx[:, 0].double().mean()), abs=1e-6)
    assert fvr.loc["max_delta_p", "rest"] == pytest.approx(float(mx[:, 1:].double().mean()), abs=1e-6)
    assert fvr.loc["delta_p[3]", "first"] == pytest.approx(float(nd[0, :, 0].double().mean()), abs=1e-6)
    assert (fvr["n_first"] == 4).all() and (fvr["n_rest"] == 4 * 5).all()
    table = res.to_pandas()
    assert list(table["position"]) == list(range(6))
    assert table["mean_max_delta_p"].tolist() == pytest.approx(mx.mean(0).tolist(), abs=1e-6)
    assert res.top(2)["mean_max_delta_p"].tolist() == sorted(table["mean_max_delta_p"], reverse=True)[:2]
    res.plot()
    res._repr_html_()


@pytest.mark.real_model
def test_max_delta_p_brute_force_padded_texts(real_model):
    """Prompts of different lengths are left-padded; the by-hand runs use each sample unpadded."""
    import steer_lens as sl

    hook = f"blocks.{real_model.cfg.n_layers - 1}.hook_resid_post"
    steered, v = _steered(real_model, hook, norm=3.0)
    res = sl.analysis.first_token_concentration(steered, ["Once upon a time", "The dog"], named_tokens=[" a"],
                                                max_new_tokens=5, n_samples=1, seed=0, eos_only=False)
    assert int(res.attention_mask[:, : res.prompt_len].sum(1).min()) < res.prompt_len  # padding present
    mx, arg, nd = _brute_force(real_model, hook, v, res, 1.0, res.named_ids)
    torch.testing.assert_close(res.max_delta_p, mx, atol=1e-5, rtol=1e-4)
    assert torch.equal(res.argmax_ids, arg)
    torch.testing.assert_close(res.named_delta_p, nd, atol=1e-5, rtol=1e-4)
    assert res.named_tokens == [" a"] and res.named_ids == real_model.to_tokens(" a", prepend_bos=False)[0].tolist()


@pytest.mark.real_model
def test_eos_only_keeps_the_samples_that_end(real_model):
    """A last-layer vector along EOS's unembedding makes some samples end early; only those are kept."""
    import steer_lens as sl
    from steer_lens.generation import repeat_prompts

    eos = real_model.tokenizer.eos_token_id
    hook = f"blocks.{real_model.cfg.n_layers - 1}.hook_resid_post"
    u = real_model.W_U[:, eos].detach().float()
    steered = sl.SteeredTransformer(real_model, [hook], init={hook: 80.0 * u / u.norm()})  # some end, some not
    kw = {"max_new_tokens": 12, "seed": 3}
    res = sl.analysis.first_token_concentration(steered, "Once upon a time", n_samples=8, **kw)
    gen = steered.sample(repeat_prompts("Once upon a time", 8), kw["max_new_tokens"], seed=kw["seed"])
    ended = ((gen.completion_tokens == eos) & gen.completion_mask).any(1)
    assert res.n_sampled == 8 and 1 <= res.max_delta_p.shape[0] == int(ended.sum()) < 8
    assert torch.equal(res.tokens, gen.tokens[ended])
    for s in range(res.tokens.shape[0]):
        n_gen = int(res.completion_mask[s].sum())
        assert int(res.tokens[s, res.prompt_len + n_gen - 1]) == eos  # the last scored token is EOS
        assert res.max_delta_p[s, n_gen:].isnan().all() and not res.max_delta_p[s, :n_gen].isnan().any()
        assert (res.argmax_ids[s, n_gen:] == -1).all()


def test_zero_vector_gives_zero_delta_p(tiny_model):
    import steer_lens as sl

    steered = sl.SteeredTransformer(tiny_model, [HOOK_LAST])  # zeros init
    res = sl.analysis.first_token_concentration(steered, torch.tensor([[2, 5]]), named_tokens=[0, 7],
                                                max_new_tokens=5, n_samples=3, eos_only=False)
    assert torch.equal(res.max_delta_p, torch.zeros(3, 5))
    assert torch.equal(res.named_delta_p, torch.zeros(2, 3, 5))
    fvr = res.first_vs_rest
    assert (fvr["first"] == 0).all() and (fvr["rest"] == 0).all() and fvr["ratio"].isna().all()


def test_first_token_bad_inputs(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError, EmptyInputError, SequenceTooLongError

    steered, _ = _steered(tiny_model, HOOK_LAST)
    p = torch.tensor([[1, 2]])
    f = sl.analysis.first_token_concentration
    with pytest.raises(ConfigError, match="no EOS"):
        f(steered, p)  # tokenizer-free model: eos_only needs an EOS token
    with pytest.raises(ConfigError, match="n_samples"):
        f(steered, p, n_samples=0, eos_only=False)
    with pytest.raises(ConfigError, match="batch_size"):
        f(steered, p, batch_size=0, eos_only=False)
    with pytest.raises(ConfigError, match="temperature"):
        f(steered, p, temperature=0.0, eos_only=False)
    with pytest.raises(ConfigError, match="temperature"):
        f(steered, p, temperature=math.inf, eos_only=False)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        f(steered, p, named_tokens=[tiny_model.cfg.d_vocab], eos_only=False)
    with pytest.raises(ConfigError, match="no tokenizer"):
        f(steered, p, named_tokens=["To"], eos_only=False)
    with pytest.raises(EmptyInputError):
        f(steered, torch.zeros(1, 0, dtype=torch.long), eos_only=False)
    with pytest.raises(SequenceTooLongError):
        f(steered, p, max_new_tokens=tiny_model.cfg.n_ctx, eos_only=False)


@pytest.mark.real_model
def test_first_token_bad_inputs_real(real_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError, EmptyInputError

    steered, _ = _steered(real_model, f"blocks.{real_model.cfg.n_layers - 1}.hook_resid_post")
    with pytest.raises(ConfigError, match="expected exactly one"):
        sl.analysis.first_token_concentration(steered, "Once", named_tokens=["Once upon"])
    with pytest.raises(EmptyInputError, match="reached EOS"):
        sl.analysis.first_token_concentration(steered, "Once upon a time", max_new_tokens=2, n_samples=2)


# ---------------------------------------------------------------------------------------------------
# prefix substitution
# ---------------------------------------------------------------------------------------------------
def _last_prob(token: int):
    """evaluate(model, prompts): mean probability of ``token`` at the last position."""
    seen: list = []

    def evaluate(m, prompts):
        seen.append(prompts)
        with torch.no_grad():
            return float(m(prompts)[:, -1].softmax(-1)[:, token].mean())

    return evaluate, seen


def test_prefix_substitution_token_ids(tiny_model):
    import steer_lens as sl

    steered, v = _steered(tiny_model, HOOK_LAST, scale=2.0)
    prompts = torch.tensor([[1, 7, 3], [4, 4, 9]])
    evaluate, seen = _last_prob(5)
    res = sl.analysis.prefix_substitution(steered, prompts, 8, evaluate)
    prefixed = torch.cat([prompts, torch.full((2, 1), 8)], 1)
    assert torch.equal(seen[1], prefixed)  # the id appended as the last column
    with torch.no_grad():
        base = float(tiny_model(prompts)[:, -1].softmax(-1)[:, 5].mean())
        pre = float(tiny_model(prefixed)[:, -1].softmax(-1)[:, 5].mean())
        on = tiny_model.run_with_hooks(prompts, fwd_hooks=[(HOOK_LAST, lambda act, hook: act + v)])
        st = float(on[:, -1].softmax(-1)[:, 5].mean())
    assert res.base == pytest.approx(base, abs=1e-6)
    assert res.prefixed == pytest.approx(pre, abs=1e-6)
    assert res.steered == pytest.approx(st, abs=1e-6)
    assert res.recovered == pytest.approx((pre - base) / (st - base), rel=1e-5)
    assert res.token_id == 8 and res.token == "8"  # no tokenizer: the id as a string
    assert res.to_pandas()["value"].tolist() == [res.base, res.prefixed, res.steered]
    res.plot()
    res._repr_html_()


def test_prefix_substitution_bare_model(tiny_model):
    import steer_lens as sl

    evaluate, _ = _last_prob(2)
    res = sl.analysis.prefix_substitution(tiny_model, torch.tensor([[1, 2, 3]]), 4, evaluate)
    assert math.isnan(res.steered) and math.isnan(res.recovered)
    with torch.no_grad():
        assert res.prefixed == pytest.approx(float(tiny_model(torch.tensor([[1, 2, 3, 4]]))[0, -1].softmax(-1)[2]),
                                             abs=1e-6)


@pytest.mark.real_model
def test_prefix_substitution_texts(real_model):
    import steer_lens as sl

    steered, _ = _steered(real_model, f"blocks.{real_model.cfg.n_layers - 1}.hook_resid_post")
    seen = []

    def evaluate(m, prompts):
        seen.append(list(prompts))
        return float(len(prompts[0]))

    res = sl.analysis.prefix_substitution(steered, ["Once upon a time", "The dog"], " a", evaluate)
    assert seen[1] == ["Once upon a time a", "The dog a"] and seen[0] == seen[2] == ["Once upon a time", "The dog"]
    assert res.token == " a" and res.prefixed == res.base + 2


def test_prefix_substitution_bad_inputs(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError, EmptyInputError, MetricError

    steered, _ = _steered(tiny_model, HOOK_LAST)
    p = torch.tensor([[1, 2]])
    ps = sl.analysis.prefix_substitution
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        ps(steered, p, -1, lambda m, q: 1.0)
    with pytest.raises(ConfigError, match="no tokenizer"):
        ps(steered, p, "To", lambda m, q: 1.0)
    with pytest.raises(ConfigError, match="conversations"):
        ps(steered, [[{"role": "user", "content": "hi"}]], 3, lambda m, q: 1.0)
    with pytest.raises(EmptyInputError):
        ps(steered, [], 3, lambda m, q: 1.0)
    with pytest.raises(MetricError):
        ps(steered, p, 3, lambda m, q: "high")
    with pytest.raises(MetricError):
        ps(steered, p, 3, lambda m, q: float("nan"))
