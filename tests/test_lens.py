"""Logit lens: the vector lens in closed form, the layer lens against TransformerLens, shift per position."""

from __future__ import annotations

import pytest
import torch

HOOK = "blocks.1.hook_resid_pre"


def test_raw_vector_lens_is_W_U_times_v(tiny_model):
    import steer_lens as sl

    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    s = sl.SteeredTransformer(tiny_model, [HOOK], init=v, scale=2.0)
    res = sl.lens.vector_logit_lens(s, k=5)[HOOK]
    expected = (2.0 * v) @ tiny_model.W_U
    torch.testing.assert_close(res.scores, expected, rtol=1e-5, atol=1e-5)
    assert res.top_ids.tolist() == expected.topk(5).indices.tolist()
    assert res.bottom_ids.tolist() == (-expected).topk(5).indices.tolist()
    assert res.rank_of(int(expected.argmax())) == 1


def test_norm_vector_lens_applies_final_norm(tiny_model):
    import steer_lens as sl

    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    s = sl.SteeredTransformer(tiny_model, [HOOK], init=v)
    res = sl.lens.vector_logit_lens(s, k=3, mode="norm")[HOOK]
    expected = tiny_model.ln_final(v[None, None])[0, 0] @ tiny_model.W_U
    torch.testing.assert_close(res.scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.real_model
def test_effect_lens_zero_for_zero_vector_and_matches_definition(real_model):
    import steer_lens as sl

    s = sl.SteeredTransformer(real_model, [HOOK])
    texts = ["Once upon a time there was a dog.", "Tom ran home."]
    assert float(sl.lens.vector_logit_lens(s, mode="effect", texts=texts)["all"].scores.abs().max()) == 0.0
    s.vectors.set_(HOOK, torch.randn(128, generator=torch.Generator().manual_seed(2)) * 30)
    res = sl.lens.vector_logit_lens(s, mode="effect", texts=texts)["all"]
    total, n = 0, 0
    for t in texts:
        toks = real_model.to_tokens(t)
        total = total + (s(toks).log_softmax(-1) - real_model(toks).log_softmax(-1))[0].sum(0)
        n += toks.shape[1]
    torch.testing.assert_close(res.scores, (total / n).detach(), rtol=1e-4, atol=1e-5)
    assert res.unit == "nats"


@pytest.mark.real_model
def test_layer_lens_base_equals_transformer_lens_reference(real_model):
    import steer_lens as sl

    s = sl.SteeredTransformer(real_model, [HOOK], init="random", init_norm=80.0)
    lens = sl.lens.layer_logit_lens(s, "Once upon a time there was")
    toks = real_model.to_tokens("Once upon a time there was")
    _, cache = real_model.run_with_cache(toks)
    ref = cache.accumulated_resid(apply_ln=True)[:, 0] @ real_model.W_U + real_model.b_U
    torch.testing.assert_close(lens.base_logits, ref.detach(), rtol=0, atol=1e-5)
    # independent of TransformerLens's helper: ln_final on each layer's residual
    manual = torch.stack([real_model.ln_final(cache[f"blocks.{i}.hook_resid_pre"]) for i in range(2)]
                         + [real_model.ln_final(cache["blocks.1.hook_resid_post"])])[:, 0] @ real_model.W_U
    torch.testing.assert_close(lens.base_logits, manual.detach(), rtol=0, atol=1e-4)
    # steered run: layer 0 is untouched, layer 1 carries the vector, the final layer is the model's output
    assert torch.equal(lens.steered_logits[0], lens.base_logits[0])
    assert not torch.allclose(lens.steered_logits[1], lens.base_logits[1])
    torch.testing.assert_close(lens.steered_logits[-1], s(toks)[0].detach(), rtol=0, atol=1e-4)
    assert lens.labels == ["0_pre", "1_pre", "final_post"]
    assert lens.kl[0].abs().max() < 1e-9 and (lens.kl[1] > 0).all()


@pytest.mark.real_model
def test_generation_shift_zero_for_zero_vector_and_bounded(real_model):
    import steer_lens as sl

    s = sl.SteeredTransformer(real_model, ["blocks.1.hook_resid_post"])
    res = sl.analysis.generation_shift(s, "Once upon a time", max_new_tokens=8, n_samples=2)
    assert float(res.mean_tv.abs().max()) == 0.0
    s.vectors.set_("blocks.1.hook_resid_post", torch.randn(128, generator=torch.Generator().manual_seed(0)) * 200)
    res = sl.analysis.generation_shift(s, "Once upon a time", max_new_tokens=8, n_samples=4)
    assert ((res.mean_tv > 0) & (res.mean_tv <= 1)).all()
    assert 0 < res.first_position_share < 1
    assert len(res.top_gains) == 8 and len(res.top_gains[0]) == 5
    assert res.plot().data[0].type == "bar"


def test_direction_lens_rejects_wrong_width(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="d_model"):
        sl.lens.direction_lens(tiny_model, torch.zeros(7))


def test_generation_shift_honours_positions(tiny_model):
    """Under positions='generated' the first generated token comes from an unsteered pass: TV 0."""
    import steer_lens as sl

    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], init="random", init_norm=20.0,
                              positions="generated")
    res = sl.analysis.generation_shift(s, torch.randint(3, 50, (1, 5)), max_new_tokens=6, n_samples=3)
    assert float(res.mean_tv[0]) == 0.0
    assert (res.mean_tv[1:] > 0).all()


def test_lens_results_follow_the_result_protocol(tiny_model):
    import pandas as pd

    import steer_lens as sl
    from steer_lens.errors import ConfigError

    d = torch.randn(2, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    lens = sl.lens.direction_lens(tiny_model, d, k=4, names=["a", "b"])
    assert [ts.name for ts in lens] == ["a", "b"] and len(lens) == 2
    torch.testing.assert_close(lens.scores, d @ tiny_model.W_U, rtol=1e-5, atol=1e-5)
    top = lens.top(2)
    assert isinstance(top, pd.DataFrame) and len(top) == 2 * 2 * 2  # 2 directions x (top, bottom) x 2
    assert top[top.side == "top"].groupby("name")["value"].apply(lambda v: v.is_monotonic_decreasing).all()
    assert "<table" in lens._repr_html_() and lens.plot().data
    with pytest.raises(ConfigError, match="per-token"):
        lens.token_view()
    s = sl.SteeredTransformer(tiny_model, [HOOK], init="random", init_norm=5.0)
    ll = sl.lens.layer_logit_lens(s, torch.randint(3, 50, (6,)))
    assert len(ll.str_tokens) == 6 and ll.top(2).shape[0] == 2 and ll.plot().data
    with pytest.raises(ConfigError, match="k"):
        ll.to_pandas(k=11)
