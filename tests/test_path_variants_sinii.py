"""Path patching, the full "Small Vectors, Big Effects" variant set (Sinii et al. 2025), against references.

The references do not use the library's hooks: the routed head variants are transcribed from the paper's
``PatchedLlamaDecoderLayer.forward`` (corl-team/steering-reasoning, models/head_patched_path/llama/
transformers.py L111-152) on TransformerLens's components; the q/k/v patches add or remove the vector on
one head's query / key / value *input* (``use_split_qkv_input``); the KL is ``torch.distributions``'.
"""

from __future__ import annotations

import math

import pytest
import torch

ATOL = 1e-9


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

HOOK = "blocks.0.hook_mlp_out"  # the paper's vector: the penultimate layer's mlp.down_proj bias


def _model(n_layers=2, n_heads=4, seed=1, **kw):
    import steer_lens as sl

    d_model = 8 * n_heads
    return sl.random_model(
        "llama", n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=53, n_ctx=32, seed=seed,
        dtype=torch.float64, **kw,
    )


def _setup(n_layers=2, n_heads=4, hook=HOOK, **kw):
    import steer_lens as sl

    model = _model(n_layers, n_heads, **kw)
    steered = sl.SteeredTransformer(model, hooks=[hook], init="random", init_norm=4.0, seed=0)
    tokens = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(5))
    return model, steered, tokens


def _vector(steered, model, tokens, hook=HOOK):
    """What the vector adds at its hook, read from the runs (independent of the vector's storage)."""
    _, cb = model.run_with_cache(tokens, names_filter=[hook])
    _, cs = steered.run_with_cache(tokens, names_filter=[hook])
    return cs[hook] - cb[hook]


METRIC_TOKENS = (1, 2)


def _metric(logits):
    return (logits[:, -1, METRIC_TOKENS[0]] - logits[:, -1, METRIC_TOKENS[1]]).mean()


def _paper_last_block_logits(model, steered, tokens, kind, head, route):
    """PatchedLlamaDecoderLayer.forward (head / inverse_head x patch_path) on the last block, by hand."""
    L = model.cfg.n_layers - 1
    names = [f"blocks.{L}.hook_resid_pre", f"blocks.{L}.attn.hook_z"]
    _, cb = model.run_with_cache(tokens, names_filter=names)
    _, cs = steered.run_with_cache(tokens, names_filter=names)
    blk = model.blocks[L]
    z_van, z_st = cb[names[1]], cs[names[1]]  # [batch, pos, head, d_head], before o_proj
    h = slice(head, head + 1)
    z_pat = (z_st.clone(), z_van.clone())[kind == "only"]
    z_pat[:, :, h] = (z_van, z_st)[kind == "only"][:, :, h]
    o_proj = lambda z: torch.einsum("bphd,hdm->bpm", z, blk.attn.W_O) + blk.attn.b_O
    residual = cs[names[0]]  # residual_steered in both head variants
    a_pat, a_st = o_proj(z_pat), o_proj(z_st)
    mlp_input, residual = {
        "all": (residual + a_pat, residual + a_pat),
        "residual": (residual + a_st, residual + a_pat),
        "mlp": (residual + a_pat, residual + a_st),
    }[route]
    out = residual + blk.mlp(blk.ln2(mlp_input))
    return model.unembed(model.ln_final(out))


# ---------------------------------------------------------------------------------------------------
# head x route == the paper's layer, transcribed
# ---------------------------------------------------------------------------------------------------
def test_head_route_variants_equal_the_papers_layer():
    import steer_lens as sl

    model, steered, tokens = _setup()
    res = sl.patching.path_patch(steered, tokens, _metric, variants="full")
    assert res.block == 1
    base = float(_metric(model(tokens)))
    for kind in ("knockout", "only"):
        for head in (0, 3):
            for route in ("all", "residual", "mlp"):
                ref = float(_metric(_paper_last_block_logits(model, steered, tokens, kind, head, route))) - base
                got = res.variants[f"{kind} head {head} -> {route}"]
                assert math.isclose(got, ref, rel_tol=1e-9, abs_tol=ATOL), (kind, head, route, got, ref)
    # routes really differ (the test would be vacuous otherwise)
    assert abs(res.variants["knockout head 0 -> residual"] - res.variants["knockout head 0 -> mlp"]) > 1e-4
    # "full" replaces the unrouted per-head names; "-> all" is what variants=True calls "knockout head H"
    basic = sl.patching.path_patch(steered, tokens, _metric)
    assert "knockout head 0" not in res.variants and "knockout head 0" in basic.variants
    for i in range(4):
        for kind in ("knockout", "only"):
            assert math.isclose(basic.variants[f"{kind} head {i}"], res.variants[f"{kind} head {i} -> all"],
                                rel_tol=1e-12, abs_tol=1e-12)


def test_one_head_closed_forms():
    """One head: only head 0 is the whole attention; knockout head 0 routed is attn_to_* swapped."""
    import steer_lens as sl

    _, steered, tokens = _setup(n_heads=1)
    v = sl.patching.path_patch(steered, tokens, _metric, variants="full").variants
    close = lambda a, b: math.isclose(v[a], v[b], rel_tol=1e-9, abs_tol=ATOL)
    for route in ("all", "residual", "mlp"):
        assert close(f"only head 0 -> {route}", "attn_to_both")
    assert close("knockout head 0 -> all", "skip_attention")
    assert close("knockout head 0 -> residual", "attn_to_mlp")  # the MLP reads the steered attention
    assert close("knockout head 0 -> mlp", "attn_to_residual")  # the residual carries the steered attention
    assert close("knockout group 0", "skip_attention") and close("only group 0", "attn_to_both")
    assert close("knockout v all heads", "knockout v kv-head 0")


# ---------------------------------------------------------------------------------------------------
# q / k / v patches == the vector added to / removed from one head's q / k / v input
# ---------------------------------------------------------------------------------------------------
def _split_input_logits(tokens, vec_delta, hook, b, parts, kind, n_layers, n_heads, **kw):
    """A fresh copy of the model with split q/k/v inputs. ``knockout``: the steered run with the vector
    removed from ``parts`` = {hook name: heads} of block ``b``; ``only``: the base run with the vector
    added to those inputs and to the residual stream after attention (the paper's residual_steered)."""
    model = _model(n_layers, n_heads, **kw)
    model.set_use_split_qkv_input(True)
    hooks = []
    if kind == "knockout":
        hooks.append((hook, lambda act, hook: act + vec_delta))
    for name, heads in parts.items():
        sign = -1.0 if kind == "knockout" else 1.0

        def edit(act, hook, heads=heads, sign=sign):
            act = act.clone()
            act[:, :, heads] += sign * vec_delta[:, :, None]
            return act

        hooks.append((f"blocks.{b}.{name}", edit))
    if kind == "only":
        hooks.append((f"blocks.{b}.hook_resid_mid", lambda act, hook: act + vec_delta))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@pytest.mark.parametrize("n_layers", [2, 3])
def test_qkv_patches_equal_split_input_references(n_layers):
    import steer_lens as sl

    model, steered, tokens = _setup(n_layers=n_layers)
    assert model.cfg.n_key_value_heads == 2  # GQA: 4 query heads, 2 key-value heads
    delta = _vector(steered, model, tokens)
    res = sl.patching.path_patch(steered, tokens, _metric, variants="full")
    base = float(_metric(model(tokens)))
    cases = [
        ("q head 2", {"hook_q_input": [2]}),
        ("q head 0", {"hook_q_input": [0]}),
        ("k kv-head 1", {"hook_k_input": [1]}),
        ("v kv-head 0", {"hook_v_input": [0]}),
        ("v all heads", {"hook_v_input": [0, 1]}),
    ]
    for label, parts in cases:
        for kind in ("knockout", "only"):
            logits = _split_input_logits(tokens, delta, HOOK, 1, parts, kind, n_layers, 4)
            ref = float(_metric(logits)) - base
            got = res.variants[f"{kind} {label}"]
            assert math.isclose(got, ref, rel_tol=1e-9, abs_tol=ATOL), (kind, label, got, ref)
    assert len({round(res.variants[f"knockout {lab}"], 9) for lab, _ in cases}) == len(cases)


def test_q_k_v_together_equal_the_whole_head_without_gqa():
    """With one key-value head per query head, q + k + v of head h from the base run is knocking out head
    h, and q + k + v of head h steered (the rest base) is steering only head h; the group of size 1 is
    the head."""
    import steer_lens as sl

    model, steered, tokens = _setup(n_key_value_heads=4)
    delta = _vector(steered, model, tokens)
    v = sl.patching.path_patch(steered, tokens, _metric, variants="full").variants
    base = float(_metric(model(tokens)))
    for h in (1, 3):
        parts = {"hook_q_input": [h], "hook_k_input": [h], "hook_v_input": [h]}
        for kind in ("knockout", "only"):
            ref = float(_metric(_split_input_logits(tokens, delta, HOOK, 1, parts, kind, 2, 4,
                                                    n_key_value_heads=4))) - base
            assert math.isclose(v[f"{kind} head {h} -> all"], ref, rel_tol=1e-9, abs_tol=ATOL)
            assert math.isclose(v[f"{kind} group {h}"], v[f"{kind} head {h} -> all"], rel_tol=1e-12, abs_tol=1e-12)


def test_kv_group_equals_its_query_heads_by_hand():
    """GQA (2 query heads per key-value head): group g is query heads 2g and 2g+1 at hook_z."""
    import steer_lens as sl

    model, steered, tokens = _setup()
    v = sl.patching.path_patch(steered, tokens, _metric, variants="full").variants
    base = float(_metric(model(tokens)))
    z = "blocks.1.attn.hook_z"
    _, cb = model.run_with_cache(tokens, names_filter=[z])
    _, cs = steered.run_with_cache(tokens, names_filter=[z])
    for g in (0, 1):
        heads = [2 * g, 2 * g + 1]

        def knock(act, hook, heads=heads):
            act = act.clone()
            act[:, :, heads] = cb[z][:, :, heads]
            return act

        def only(act, hook, heads=heads):
            out = cb[z].clone()
            out[:, :, heads] = cs[z][:, :, heads]
            return out

        with model.hooks(fwd_hooks=[(z, knock)]):
            ref_k = float(_metric(steered(tokens))) - base
        with model.hooks(fwd_hooks=[(z, only)]):
            ref_o = float(_metric(steered(tokens))) - base
        assert math.isclose(v[f"knockout group {g}"], ref_k, rel_tol=1e-9, abs_tol=ATOL)
        assert math.isclose(v[f"only group {g}"], ref_o, rel_tol=1e-9, abs_tol=ATOL)
    assert not math.isclose(v["knockout group 0"], v["knockout head 0 -> all"], abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# per-token KL
# ---------------------------------------------------------------------------------------------------
def _kl_ref(p_logits, q_logits, temperature):
    from torch.distributions import Categorical, kl_divergence

    return kl_divergence(Categorical(logits=p_logits / temperature), Categorical(logits=q_logits / temperature))


def test_per_token_kl_equals_torch_distributions():
    from steer_lens.patching.path import per_token_kl

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 5, 11, generator=g, dtype=torch.float64), torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    for t in (1.0, 0.7):
        got = per_token_kl(p, q, temperature=t)
        assert got.shape == (3, 5)
        torch.testing.assert_close(got, _kl_ref(p, q, t), atol=1e-12, rtol=1e-10)
    assert per_token_kl(p, p).abs().max() == 0


def test_variant_kl_follows_the_papers_reference():
    import steer_lens as sl

    model, steered, tokens = _setup()
    t = 0.8
    res = sl.patching.path_patch(steered, tokens, _metric, variants="full", kl=True, temperature=t)
    assert res.kl_reference == "paper" and set(res.variant_kl) == set(res.variants)
    assert res.variant_kl["attn_to_both"].abs().max() == 0  # the steered run against itself
    steered_logits = steered(tokens)
    # knockout: reference is the steered run; only: the skip_attention run (pre_last_layer_steering L176)
    knock = _paper_last_block_logits(model, steered, tokens, "knockout", 2, "residual")
    torch.testing.assert_close(res.variant_kl["knockout head 2 -> residual"], _kl_ref(steered_logits, knock, t),
                               atol=1e-10, rtol=1e-8)
    z_b = model.run_with_cache(tokens, names_filter=["blocks.1.hook_attn_out"])[1]["blocks.1.hook_attn_out"]
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", lambda act, hook: z_b)]):
        skip = steered(tokens)
    only = _paper_last_block_logits(model, steered, tokens, "only", 1, "mlp")
    torch.testing.assert_close(res.variant_kl["only head 1 -> mlp"], _kl_ref(skip, only, t), atol=1e-10, rtol=1e-8)
    # a single reference on request
    vs_base = sl.patching.path_patch(steered, tokens, _metric, kl="base")
    torch.testing.assert_close(vs_base.variant_kl["attn_to_both"], _kl_ref(model(tokens), steered_logits, 1.0),
                               atol=1e-10, rtol=1e-8)
    df = res.to_pandas()
    row = df[df.name == "knockout head 2 -> residual"].iloc[0]
    assert math.isclose(row.kl, float(res.variant_kl["knockout head 2 -> residual"].mean()), rel_tol=1e-12)


def test_table_columns_and_option_errors():
    import steer_lens as sl

    _, steered, tokens = _setup()
    res = sl.patching.path_patch(steered, tokens, _metric, variants="full")
    df = res.to_pandas().set_index("name")
    assert {"kind", "part", "unit", "head", "route", "kl"} <= set(df.columns)
    assert tuple(df.loc["only head 2 -> mlp", ["kind", "part", "unit", "head", "route"]]) == ("only", "z", "head", 2, "mlp")
    assert tuple(df.loc["knockout k kv-head 1", ["part", "unit", "head", "route"]]) == ("k", "kv-head", 1, "all")
    assert tuple(df.loc["only group 0", ["part", "unit", "head"]]) == ("z", "group", 0)
    assert df.loc["only v all heads", "unit"] == "all heads" and df.loc["skip_layer", "kind"] == "skip_layer"
    n = 4 * 2 * 3 + (4 + 2 + 2) * 2 + 2 + 2 * 2 + 5  # head x route, q/k/v, v all, groups, whole-block
    assert len(res.variants) == n
    for bad in ({"variants": "all"}, {"kl": "vanilla"}, {"kl": True, "variants": False}, {"kl": True, "temperature": 0.0}):
        with pytest.raises(sl.errors.ConfigError):
            sl.patching.path_patch(steered, tokens, _metric, **bad)
