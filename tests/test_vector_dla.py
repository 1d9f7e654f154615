"""vector_dla: direct logit attribution of a vector's effect, checked against independent references.

The references never go through ``vector_dla``: the target logits come from the bare model's own
forward pass (``model(tokens)`` for base, ``model.run_with_hooks`` with a hand-written ``act + v``
hook for steered), the vector's term is written out by hand from the run's cached final-LN scale, and
the per-head terms come from TransformerLens's ``stack_head_results(apply_ln=True)`` called here.
The models get random attention/MLP/unembedding biases and final-LN weights, so the bias row and
``w_ln`` are exercised.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

FAMILIES = ("gpt2", "neox", "llama")
HOOKS = ("blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.0.hook_resid_mid",
         "hook_embed", "blocks.1.hook_resid_post")
TOKENS = torch.tensor([[1, 5, 7, 9, 2], [2, 3, 4, 8, 11]])


def _model(family: str, **overrides):
    """A fresh 2-layer random model with random biases and final-LN weight (not the shared fixture)."""
    import steer_lens as sl

    m = sl.random_model(family, n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=3, **overrides)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("b_O", "b_out", "b_U", "ln_final.b")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("ln_final.w"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return m


def _steered(model, hook: str, norm: float = 4.0, scale: float = 1.0, seed: int = 0):
    import steer_lens as sl

    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    v = v / v.norm() * norm
    return sl.SteeredTransformer(model, [hook], init={hook: v}, scale=scale), v * scale


def _refs(model, hook, v, a: int, b: int | None, pos: int = -1):
    """Base and steered ``logit_a − logit_b − (b_U[a] − b_U[b])`` at ``pos``, from the model itself."""
    with torch.no_grad():
        base = model(TOKENS)[:, pos]
        steer = model.run_with_hooks(TOKENS, fwd_hooks=[(hook, lambda act, hook: act + v)])[:, pos]

    def pick(logits):
        out = logits - model.b_U
        return out[:, a] - (0 if b is None else out[:, b])

    return pick(base), pick(steer)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", HOOKS)
def test_components_sum_to_the_models_logit(family, hook):
    """(1) per run, Σ components = the model's target logit minus b_U; (2) Σ diff = the logit change."""
    import steer_lens as sl

    if family == "neox" and "resid_mid" in hook:
        pytest.skip("parallel attention and MLP: no hook_resid_mid")
    model = _model(family)
    steered, v = _steered(model, hook, scale=1.5)
    for target, (a, b) in (((3, 7), (3, 7)), (11, (11, None))):
        res = sl.analysis.vector_dla(steered, TOKENS, target)
        base, steer = _refs(model, hook, v, a, b)
        torch.testing.assert_close(res.base.sum(-1), base, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.steered.sum(-1), steer, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.diff.sum(-1), steer - base, atol=1e-4, rtol=0)
        torch.testing.assert_close(res.base_logit, base, atol=1e-5, rtol=0)
        assert res.max_error < 1e-4
        assert (res.base[:, res.kinds.index("vector")] == 0).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "hook_embed"])
def test_vector_term_by_hand(family, hook):
    """(3) the vector's term = centred(v) / scale_steered · w_ln · W_U[:, t], with the run's own scale."""
    import steer_lens as sl

    model = _model(family)
    steered, v = _steered(model, hook, scale=2.0)
    res = sl.analysis.vector_dla(steered, TOKENS, 5, position=2)
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, lambda act, hook: act + v)]):
        _, cache = model.run_with_cache(TOKENS)
    scale = cache["ln_final.hook_scale"][:, 2]  # [batch, 1]
    vc = v - v.mean() if model.cfg.normalization_type == "LN" else v
    expected = ((vc / scale) * model.ln_final.w) @ model.W_U[:, 5]
    torch.testing.assert_close(res.steered[:, res.labels.index(f"vector @ {hook}")], expected, atol=1e-5, rtol=1e-5)


def test_direct_only_path_without_layernorm():
    """(3) no LayerNorm, vector at the last hook_resid_post: its term is v · W_U[:, t] and nothing else moves."""
    import steer_lens as sl

    model = _model("gpt2", normalization_type=None)
    hook = "blocks.1.hook_resid_post"
    steered, v = _steered(model, hook)
    res = sl.analysis.vector_dla(steered, TOKENS, (4, 9))
    vec = res.kinds.index("vector")
    expected = v @ (model.W_U[:, 4] - model.W_U[:, 9])
    torch.testing.assert_close(res.steered[:, vec], expected.expand(2), atol=1e-5, rtol=0)
    others = [i for i in range(len(res.labels)) if i != vec]
    assert torch.equal(res.diff[:, others], torch.zeros(2, len(others)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"])
def test_zero_vector_gives_exactly_zero_differences(family, hook):
    """(4) a zero vector: every steered − base difference is exactly 0."""
    import steer_lens as sl

    steered = sl.SteeredTransformer(_model(family), [hook])
    res = sl.analysis.vector_dla(steered, TOKENS, (3, 7))
    assert torch.equal(res.diff, torch.zeros_like(res.diff))
    assert torch.equal(res.base, res.steered)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_equal_transformer_lens_stack_head_results(family):
    """(5) per-head terms = TransformerLens's stack_head_results + apply_ln_to_stack, projected by hand."""
    import steer_lens as sl

    model = _model(family)
    hook = "blocks.1.hook_resid_pre"
    steered, v = _steered(model, hook)
    res = sl.analysis.vector_dla(steered, TOKENS, (3, 7))
    direction = (model.W_U[:, 3] - model.W_U[:, 7]) * model.ln_final.w
    heads = [i for i, k in enumerate(res.kinds) if k == "head"]
    for values, fwd_hooks in ((res.base, []), (res.steered, [(hook, lambda act, hook: act + v)])):
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
            _, cache = model.run_with_cache(TOKENS)
        stack, labels = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True, return_labels=True)
        assert [res.labels[i] for i in heads] == labels
        torch.testing.assert_close(values[:, heads], (stack @ direction).T, atol=1e-5, rtol=1e-5)


def test_several_vectors_per_text_targets_and_table():
    """Two vectors each get a row; per-text targets; the table, top, plot and HTML work."""
    import steer_lens as sl

    model = _model("gpt2")
    hooks = ["blocks.0.hook_attn_out", "blocks.1.hook_resid_pre"]
    vs = {h: torch.randn(32, generator=torch.Generator().manual_seed(i)) for i, h in enumerate(hooks)}
    steered = sl.SteeredTransformer(model, hooks, init=vs)
    res = sl.analysis.vector_dla(steered, TOKENS, [3, (4, 5)])
    with torch.no_grad():
        logits = model.run_with_hooks(TOKENS, fwd_hooks=[(h, lambda act, hook: act + vs[hook.name]) for h in hooks])
    out = logits[:, -1] - model.b_U
    torch.testing.assert_close(res.steered.sum(-1), torch.stack([out[0, 3], out[1, 4] - out[1, 5]]), atol=1e-4, rtol=0)
    assert [lab for lab, k in zip(res.labels, res.kinds, strict=True) if k == "vector"] == [f"vector @ {h}" for h in hooks]
    df = res.to_pandas()
    assert list(df.columns) == ["component", "kind", "layer", "base", "steered", "diff"] and len(df) == len(res.labels)
    assert len(res.to_pandas(per_text=True)) == 2 * len(res.labels)
    assert res.top(3)["diff"].abs().is_monotonic_decreasing
    assert len(res.plot().data) == 3 and "VectorDLA" in res._repr_html_()


def test_refuses_what_it_cannot_attribute():
    import steer_lens as sl
    from steer_lens.errors import ConfigError, ShapeMismatchError
    from steer_lens.vectors import GatedVectors

    model = _model("gpt2")
    with pytest.raises(ShapeMismatchError):
        sl.analysis.vector_dla(sl.SteeredTransformer(model, ["blocks.0.attn.hook_z"]), TOKENS, 3)
    with pytest.raises(ConfigError, match="residual stream"):
        sl.analysis.vector_dla(sl.SteeredTransformer(model, ["ln_final.hook_normalized"]), TOKENS, 3)
    gated = GatedVectors(["blocks.1.hook_resid_pre"], 32)
    with pytest.raises(ConfigError, match="plain SteeringVectors"):
        sl.analysis.vector_dla(sl.SteeredTransformer(model, ["blocks.1.hook_resid_pre"], vectors=gated), TOKENS, 3)
    steered = sl.SteeredTransformer(model, ["blocks.1.hook_resid_pre"])
    for bad in (53, "a", (1, 2, 3), [1, 2, 3]):
        with pytest.raises(ConfigError):
            sl.analysis.vector_dla(steered, TOKENS, bad)
    with pytest.raises(ConfigError, match="position"):
        sl.analysis.vector_dla(steered, TOKENS, 3, position=5)


def test_real_model_text_target(real_model, sentences):
    """TinyStories-656K (unfolded RMSNorm weight), texts of two lengths, a pair of running-text ids."""
    import steer_lens as sl
    from steer_lens.errors import ConfigError

    hook = "blocks.1.hook_resid_pre"
    steered, _ = _steered(real_model, hook, norm=8.0)
    texts = sentences[:2]
    the, dog = (int(real_model.to_tokens(w, prepend_bos=False)[0, -1]) for w in (" the", " dog"))
    res = sl.analysis.vector_dla(steered, texts, (the, dog))
    with pytest.raises(ConfigError, match="2 tokens"):  # SentencePiece's dummy prefix: 'the' alone is 2 tokens
        sl.analysis.vector_dla(steered, texts, "the")
    assert res.max_error < 1e-4 and len(res.str_tokens) == 2
    torch.testing.assert_close(res.diff.sum(-1), res.steered_logit - res.base_logit, atol=1e-4, rtol=0)
    assert float(res.diff[:, res.kinds.index("vector")].abs().max()) > 0
