"""SteeredTransformer: exactness of the added vectors, positions, hooks' ownership, generation, files."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

HOOK_KINDS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]


def _tokens(model, batch=2, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.d_vocab, (batch, pos), generator=g)


def _n_hooks(model) -> int:
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_zero_vector_is_bit_identical(tiny_model, kind):
    import steer_lens as sl

    if f"blocks.0.{kind}" not in tiny_model.hook_dict:
        pytest.skip(f"{kind} does not exist in this architecture (parallel attention and MLP)")
    toks = _tokens(tiny_model)
    s = sl.SteeredTransformer(tiny_model, [f"blocks.0.{kind}", f"blocks.1.{kind}"])
    assert torch.equal(s(toks), tiny_model(toks))


def test_last_layer_vector_equals_adding_by_hand(tiny_model):
    import steer_lens as sl

    L = tiny_model.cfg.n_layers - 1
    hook = f"blocks.{L}.hook_resid_post"
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 2
    toks = _tokens(tiny_model)
    _, cache = tiny_model.run_with_cache(toks)
    by_hand = tiny_model.unembed(tiny_model.ln_final(cache[hook] + v))
    s = sl.SteeredTransformer(tiny_model, [hook], init=v)
    torch.testing.assert_close(s(toks), by_hand, rtol=0, atol=1e-5)
    # scale multiplies the vector
    by_hand2 = tiny_model.unembed(tiny_model.ln_final(cache[hook] + 2.5 * v))
    with s.scaled(2.5):
        torch.testing.assert_close(s(toks), by_hand2, rtol=0, atol=1e-5)


def test_vector_gets_gradients_model_does_not(tiny_model):
    import steer_lens as sl

    flags = [p.requires_grad for p in tiny_model.parameters()]
    s = sl.SteeredTransformer(tiny_model, ["blocks.1.hook_resid_pre"])
    with s.gradients():  # steered calls record a graph only when asked (issue 16 item 9)
        s(_tokens(tiny_model)).logsumexp(-1).sum().backward()
    g = s.vectors["blocks.1.hook_resid_pre"].grad
    assert g is not None and g.abs().sum() > 0
    # no gradient reaches the model, and its requires_grad flags are as the user left them (issue 15)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert [n for n, _ in s.named_parameters()] == ["vectors.params.blocks__1__hook_resid_pre"]


@pytest.mark.parametrize("positions", ["prompt", "generated", "mask"])
def test_positions_token_by_token(tiny_model, positions):
    import steer_lens as sl

    hook = "blocks.1.hook_resid_pre"
    toks = _tokens(tiny_model, batch=2, pos=8)
    v = torch.ones(tiny_model.cfg.d_model)
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    s = sl.SteeredTransformer(tiny_model, [hook], init=v, positions=mask if positions == "mask" else positions)
    plens = torch.tensor([3, 5])
    _, steered_cache = s.run_with_cache(toks, prompt_lengths=plens, names_filter=[hook])
    _, base_cache = tiny_model.run_with_cache(toks, names_filter=[hook])
    delta = (steered_cache[hook] - base_cache[hook]).abs().sum(-1) > 0  # [batch, pos]
    idx = torch.arange(8)
    if positions == "prompt":
        expected = idx[None] < plens[:, None]
    elif positions == "generated":
        expected = idx[None] >= plens[:, None]
    else:
        expected = mask[None].expand(2, 8)
    assert torch.equal(delta, expected)


def test_generation_kv_cache_equals_recompute_under_steering(tiny_model):
    import steer_lens as sl

    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_post"], init="random", init_norm=8.0)
    toks = _tokens(tiny_model, batch=2, pos=5)
    a = s.generate(toks, 12, do_sample=False, use_kv_cache=True)
    b = s.generate(toks, 12, do_sample=False, use_kv_cache=False)
    assert torch.equal(a, b)
    # sampling: same seed, same tokens, with or without the cache
    a = s.generate(toks, 12, seed=5, use_kv_cache=True)
    b = s.generate(toks, 12, seed=5, use_kv_cache=False)
    assert torch.equal(a, b)


def test_generation_honours_positions_while_decoding(tiny_model):
    """Greedy tokens decoded step by step equal the argmax of one teacher-forced steered pass."""
    import steer_lens as sl

    for positions in ("generated", "prompt", "all"):
        s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], init="random", init_norm=10.0,
                                  positions=positions)
        toks = _tokens(tiny_model, batch=1, pos=4)
        out = s.generate(toks, 10, do_sample=False)
        logits = s(out, prompt_lengths=[4])
        assert torch.equal(logits[0, 3:-1].argmax(-1), out[0, 4:]), positions


@pytest.mark.real_model
def test_batched_left_padded_generation_equals_one_by_one(real_model):
    import steer_lens as sl

    s = sl.SteeredTransformer(real_model, ["blocks.1.hook_resid_pre"], init="random", init_norm=60.0, seed=2)
    prompts = ["Once upon a time", "The little cat sat on the big red mat and", "Tom"]
    together = s.generate(prompts, 15, do_sample=False)
    alone = [s.generate(p, 15, do_sample=False) for p in prompts]
    assert together == alone
    with s.disabled():
        base = s.generate(prompts[0], 15, do_sample=False)
    assert base != together[0]


def test_hooks_removed_and_model_pristine_after_exception(tiny_model):
    import steer_lens as sl

    toks = _tokens(tiny_model)
    pristine = tiny_model(toks)
    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"],
                              init="random", init_norm=5.0)

    def boom(act, hook):
        raise RuntimeError("inside the call")

    with pytest.raises(RuntimeError, match="inside the call"):
        s.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    with pytest.raises(RuntimeError):
        with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", boom)]):
            s(toks)
    assert _n_hooks(tiny_model) == 0
    assert torch.equal(tiny_model(toks), pristine)
    # and the steered calls still work afterwards
    assert not torch.equal(s(toks), pristine)


def test_foreign_hooks_survive_steered_calls(tiny_model):
    import steer_lens as sl

    seen = []
    handle_hook = ("blocks.0.hook_resid_post", lambda act, hook: seen.append(1))
    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"])
    with tiny_model.hooks(fwd_hooks=[handle_hook]):
        s(_tokens(tiny_model))
        tiny_model(_tokens(tiny_model))
    assert len(seen) == 2


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    import steer_lens as sl

    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out"],
                              init="random", init_norm=3.0, scale=1.5, positions="prompt")
    s.save(tmp_path / "v")
    again = sl.SteeredTransformer.load(tmp_path / "v", tiny_model)
    for h in s.hook_names:
        assert torch.equal(again.vectors[h], s.vectors[h])
    assert again.scale == 1.5 and again.positions == "prompt"
    toks = _tokens(tiny_model)
    assert torch.equal(again(toks, prompt_lengths=[3, 4]), s(toks, prompt_lengths=[3, 4]))
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["weight_processing"] == {"fold_ln": False, "center_writing_weights": False,
                                        "center_unembed": False, "fold_value_biases": False}
    assert cfg["d_model"] == tiny_model.cfg.d_model and cfg["hook_names"] == list(s.hook_names)
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "vectors.safetensors"]


def test_explicit_mask_survives_save_load(tiny_model, tmp_path):
    import steer_lens as sl

    mask = torch.tensor([False, True, True, False])
    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], init="random", init_norm=3.0,
                              positions=mask)
    s.save(tmp_path / "v")
    again = sl.SteeredTransformer.load(tmp_path / "v", tiny_model)
    assert torch.equal(again.positions, mask)


def test_load_into_incompatible_model_names_both_sides(tmp_path):
    import steer_lens as sl
    from steer_lens.errors import IncompatibleVectorError

    a = sl.random_model("llama", d_model=32, n_heads=4, seed=0)
    b = sl.random_model("llama", d_model=64, n_heads=4, seed=0)
    c = sl.random_model("llama", d_model=32, n_heads=4, seed=7)
    sl.SteeredTransformer(a, ["blocks.0.hook_resid_pre"]).save(tmp_path / "v")
    with pytest.raises(IncompatibleVectorError, match=r"d_model=32.*d_model=64"):
        sl.SteeredTransformer.load(tmp_path / "v", b)
    with pytest.raises(IncompatibleVectorError, match=r"seed0.*seed7"):
        sl.SteeredTransformer.load(tmp_path / "v", c)
    assert sl.SteeredTransformer.load(tmp_path / "v", c, allow_other_model=True).hook_names == (
        "blocks.0.hook_resid_pre",)


def test_bad_input_errors_before_any_change(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError, HookNameError, NonFiniteError, ShapeMismatchError

    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_pre"):
        sl.SteeredTransformer(tiny_model, ["blocks.1.hook_resid_pree"])
    # per-head vectors at attn.hook_z are now allowed (issue 14); attention patterns never are
    with pytest.raises(HookNameError, match="d_model"):
        sl.SteeredTransformer(tiny_model, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(NonFiniteError):
        sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], scale=float("nan"))
    with pytest.raises(ShapeMismatchError, match="expected shape"):
        sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], init=torch.zeros(5))
    with pytest.raises(NonFiniteError):
        sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"],
                              init=torch.full((tiny_model.cfg.d_model,), float("inf")))
    with pytest.raises(ConfigError):
        sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], positions="middle")
    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"])
    with pytest.raises(NonFiniteError):
        s.scale = float("inf")
    assert s.scale == 1.0
    assert _n_hooks(tiny_model) == 0


@pytest.mark.real_model
def test_prompt_too_long_raises(real_model):
    import steer_lens as sl
    from steer_lens.errors import SequenceTooLongError

    s = sl.SteeredTransformer(real_model, ["blocks.1.hook_resid_pre"])
    with pytest.raises(SequenceTooLongError, match="n_ctx=512"):
        s.generate("dog " * 600, 10)


def test_model_not_available_offline(monkeypatch, tmp_path):
    import steer_lens as sl
    from steer_lens.errors import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_CACHE"):
        sl.load_model("nobody/no-such-model-steer-lens", device="cpu")


@pytest.mark.real_model
def test_difference_of_means_matches_manual(real_model):
    from steer_lens.steering import difference_of_means

    pos, neg = ["The dog ran.", "A dog barked."], ["The cat sat."]
    hook = "blocks.1.hook_resid_pre"
    v = difference_of_means(real_model, hook, pos, neg)[hook]

    def act(t):
        _, c = real_model.run_with_cache(real_model.to_tokens(t))
        return c[hook][0, 1:].double().mean(0)

    manual = (act(pos[0]) + act(pos[1])) / 2 - act(neg[0])
    torch.testing.assert_close(v.double(), manual, rtol=0, atol=1e-5)


# -- properties of the vector module -------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(-50, 50, allow_nan=False), min_size=16, max_size=16),
       scale=st.floats(-4, 4, allow_nan=False), layer=st.integers(0, 1))
def test_property_delta_is_scale_times_vector(values, scale, layer):
    import steer_lens as sl

    model = _property_model()
    hook = f"blocks.{layer}.hook_resid_mid"
    v = torch.tensor(values, dtype=torch.float32)
    s = sl.SteeredTransformer(model, [hook], init=v, scale=scale)
    toks = torch.tensor([[1, 2, 3, 4]])
    _, cs = s.run_with_cache(toks, names_filter=[hook])
    _, cb = model.run_with_cache(toks, names_filter=[hook])
    torch.testing.assert_close(cs[hook] - cb[hook], (scale * v).expand_as(cb[hook]), rtol=1e-5, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=16, max_size=16),
       max_norm=st.floats(0.1, 50))
def test_property_clamp_norm_projects_onto_ball(values, max_norm):
    from steer_lens.vectors import SteeringVectors

    v = torch.tensor(values, dtype=torch.float32)
    vecs = SteeringVectors(["h"], 16, init={"h": v})
    vecs.clamp_norm_(max_norm)
    out = vecs["h"].detach()
    assert float(out.norm()) <= max_norm * (1 + 1e-5)
    if float(v.norm()) <= max_norm:
        assert torch.equal(out, v)
    elif float(v.norm()) > 1e-3:
        torch.testing.assert_close(out / out.norm(), v / v.norm(), rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=16, max_size=16))
def test_property_save_load_exact(values, tmp_path_factory):
    import steer_lens as sl

    model = _property_model()
    v = torch.tensor(values, dtype=torch.float32)
    s = sl.SteeredTransformer(model, ["blocks.0.hook_resid_pre"], init=v)
    folder = tmp_path_factory.mktemp("prop")
    s.save(folder)
    assert torch.equal(sl.SteeredTransformer.load(folder, model).vectors["blocks.0.hook_resid_pre"], v)


_PROPERTY_MODEL = []


def _property_model():
    import steer_lens as sl

    if not _PROPERTY_MODEL:
        _PROPERTY_MODEL.append(sl.random_model("gpt2", d_model=16, n_heads=2, d_vocab=11, n_ctx=8, seed=0))
    return _PROPERTY_MODEL[0]


@pytest.mark.real_model
def test_works_on_transformer_bridge(real_model):
    """The wrapper uses only the hook API HookedTransformer and TransformerBridge share."""
    import warnings

    import steer_lens as sl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers("raincandy-u/TinyStories-656K", device="cpu")
    v = torch.randn(128, generator=torch.Generator().manual_seed(0)) * 50
    on_bridge = sl.SteeredTransformer(bridge, ["blocks.1.hook_resid_pre"], init=v)
    on_hooked = sl.SteeredTransformer(real_model, ["blocks.1.hook_resid_pre"], init=v)
    toks = real_model.to_tokens("Once upon a time there was a dog")
    torch.testing.assert_close(on_bridge(toks), on_hooked(toks), rtol=0, atol=1e-4)
    assert on_bridge.generate("Once upon a time", 10, do_sample=False) == on_hooked.generate(
        "Once upon a time", 10, do_sample=False)
    with on_bridge.disabled():
        assert torch.equal(on_bridge(toks), bridge(toks))


def test_greedy_sampling_equals_argmax_of_steered_forward(tiny_model):
    """The sampling loop (KV cache, matmul_layout) picks the argmax of the plain steered forward pass."""
    import steer_lens as sl

    s = sl.SteeredTransformer(tiny_model, ["blocks.1.hook_resid_pre"], init="random", init_norm=6.0)
    toks = _tokens(tiny_model, batch=3, pos=4)
    out = s.generate(toks, 8, do_sample=False, stop_at_eos=False)
    ref = toks
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, s(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("hooks", [["blocks.1.hook_resid_pre"], ["blocks.0.hook_mlp_out", "ln_final.hook_normalized"]])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_sampling_unembeds_the_last_position_only_and_equals_the_full_forward(tiny_model, hooks, use_kv_cache):
    """Every step of the sampling loop (the prefill included) unembeds one position per row, unless a vector
    sits at the final norm (then the full forward runs, every position unembedded); the seeded samples equal
    those of the loop forced to unembed every position (TransformerLens's own ``model(tokens)[:, -1]``)."""
    from unittest import mock

    import steer_lens as sl
    from steer_lens import generation

    s = sl.SteeredTransformer(tiny_model, hooks, init="random", init_norm=6.0, seed=4)
    toks = _tokens(tiny_model, batch=3, pos=6)
    rows: list[tuple[int, ...]] = []
    handle = tiny_model.unembed.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape[:2])))
    try:
        got = s.generate(toks, 7, seed=3, stop_at_eos=False, use_kv_cache=use_kv_cache)
        apart = rows[:]
        rows.clear()
        with mock.patch.object(generation, "unembeds_apart", lambda steered: False):
            ref = s.generate(toks, 7, seed=3, stop_at_eos=False, use_kv_cache=use_kv_cache)
    finally:
        handle.remove()
    assert torch.equal(got, ref)
    full = [(3, 6 + i) if not use_kv_cache or i == 0 else (3, 1) for i in range(7)]
    assert rows == full  # the forced run: TransformerLens's full forward
    assert apart == (full if len(hooks) == 2 else [(3, 1)] * 7)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_sampling_prefills_each_distinct_prompt_once(tiny_model, positions):
    """Rows that repeat a prompt (RL's groups) are prefilled once, the KV cache rows copied: the prefill
    sees the 2 distinct prompts (one left-padded), not 6 rows; the seeded samples equal those of the loop
    prefilling every row, and the rows of a group still sample independently."""
    from unittest import mock

    import steer_lens as sl
    from steer_lens import generation

    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"], init="random",
                              init_norm=6.0, seed=4, positions=positions)
    toks = _tokens(tiny_model, batch=2, pos=6)[[0, 0, 0, 1, 1, 1]]
    attn = torch.ones_like(toks)
    attn[3:, :2] = 0
    seen: list[tuple[int, ...]] = []
    kw = dict(temperature=1.0, top_p=1.0, top_k=None, do_sample=True, seed=3, stop_at_eos=False, use_kv_cache=True)
    with tiny_model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: seen.append(tuple(a.shape[:2])))]):
        got = generation.sample_tokens(s, toks, attn, None, 7, **kw)
        shared = seen[:]
        seen.clear()
        with mock.patch.object(generation, "distinct_prompts", lambda t, a: None):
            ref = generation.sample_tokens(s, toks, attn, None, 7, **kw)
    assert shared == [(2, 6)] + [(6, 1)] * 6 and seen == [(6, 6)] + [(6, 1)] * 6
    assert torch.equal(got.tokens, ref.tokens)
    assert not torch.equal(got.tokens[0, 6:], got.tokens[1, 6:])


# -- vectors of other hook shapes (issue 14: the width comes from the hook grammar) -------------------
@pytest.mark.parametrize("hook, dims", [
    ("blocks.0.attn.hook_z", ("n_heads", "d_head")),
    ("blocks.1.attn.hook_q", ("n_heads", "d_head")),
    ("blocks.0.mlp.hook_post", ("d_mlp",)),
])
def test_per_head_and_neuron_vectors_equal_adding_by_hand(tiny_model, hook, dims):
    import steer_lens as sl

    shape = tuple(int(getattr(tiny_model.cfg, d)) for d in dims)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    toks = _tokens(tiny_model)
    by_hand = tiny_model.run_with_hooks(toks, fwd_hooks=[(hook, lambda act, hook: act + v)])
    s = sl.SteeredTransformer(tiny_model, [hook], init=v)
    assert [tuple(p.shape) for p in s.parameters()] == [shape]
    assert s.vectors.shapes[hook] == shape
    torch.testing.assert_close(s(toks), by_hand, rtol=0, atol=1e-5)
    # an explicit position mask broadcasts over the trailing axes: only position 3 is steered
    mask = torch.zeros(toks.shape[1], dtype=torch.bool)
    mask[3] = True

    def at_3(act, hook):
        out = act.clone()
        out[:, 3] += v
        return out

    by_hand_3 = tiny_model.run_with_hooks(toks, fwd_hooks=[(hook, at_3)])
    s.positions = mask
    torch.testing.assert_close(s(toks), by_hand_3, rtol=0, atol=1e-5)
    assert _n_hooks(tiny_model) == 0


def test_per_head_vector_trains_saves_and_loads(tiny_model, tmp_path):
    import steer_lens as sl
    from steer_lens.errors import ShapeMismatchError

    hook = "blocks.0.attn.hook_z"
    s = sl.SteeredTransformer(tiny_model, [hook], init="random", init_norm=2.0)
    toks = _tokens(tiny_model)
    s(toks, grad=True).logsumexp(-1).sum().backward()
    assert s.vectors[hook].grad.shape == (tiny_model.cfg.n_heads, tiny_model.cfg.d_head)
    again = sl.SteeredTransformer.load(s.save(tmp_path / "z"), tiny_model)
    assert torch.equal(again.vectors[hook], s.vectors[hook])
    assert torch.equal(again(toks), s(toks))
    with pytest.raises(ShapeMismatchError, match="expected shape"):
        sl.SteeredTransformer(tiny_model, [hook], init=torch.zeros(tiny_model.cfg.d_model))
    # residual-stream analyses name the hook that does not fit
    with pytest.raises(ShapeMismatchError, match=r"attn\.hook_z"):
        sl.lens.vector_logit_lens(s, k=3)
    with pytest.raises(ShapeMismatchError, match=r"vector_stats.*attn\.hook_z"):
        sl.analysis.vector_stats(s)


def test_hook_site_grammar_matches_transformer_lens(tiny_model):
    from transformer_lens.utils import get_act_name

    from steer_lens.hook_sites import KINDS, HookSite

    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v",
                 "pattern", "attn_scores", "result", "mlp_pre", "mlp_post"):
        tl_kind = {"mlp_pre": "pre", "mlp_post": "post", "attn_out": "attn_out"}.get(kind, kind)
        name = get_act_name(tl_kind, 1)
        assert HookSite.name_of(kind, 1) == name, kind
        site = HookSite.parse(name)
        assert (site.layer, site.kind) == (1, kind)
    # trailing shapes equal the model's activations at every hook that exists in this family
    _, cache = tiny_model.run_with_cache(_tokens(tiny_model, batch=1, pos=3))
    for kind, (_, dims, _) in KINDS.items():
        name = HookSite.name_of(kind, 0) if "{}" in KINDS[kind][0] else HookSite.name_of(kind)
        if name in cache.cache_dict and dims:
            assert tuple(cache[name].shape[2:]) == HookSite.parse(name).trailing_shape(tiny_model.cfg), name


def test_only_hooks_switches_subsets(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import HookNameError

    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    s = sl.SteeredTransformer(tiny_model, hooks, init="random", init_norm=3.0)
    toks = _tokens(tiny_model)
    v1 = s.vectors[hooks[1]].detach()
    by_hand = tiny_model.run_with_hooks(toks, fwd_hooks=[(hooks[1], lambda act, hook: act + v1)])
    with s.only_hooks([hooks[1]]):
        torch.testing.assert_close(s(toks), by_hand, rtol=0, atol=1e-5)
    with s.only_hooks([]):
        assert torch.equal(s(toks), tiny_model(toks))
    with pytest.raises(HookNameError, match="carry no vector"):
        with s.only_hooks(["blocks.0.hook_mlp_out"]):
            pass
    assert not torch.equal(s(toks), by_hand)  # both on again


def test_hook_that_never_fires_is_refused(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import HookNameError

    if tiny_model.cfg.use_hook_mlp_in:
        pytest.skip("this family fires hook_mlp_in")
    with pytest.raises(HookNameError, match="never fire"):
        sl.SteeredTransformer(tiny_model, ["blocks.0.hook_mlp_in"])


def test_folder_save_is_all_or_nothing(tiny_model, tmp_path, monkeypatch):
    """A save that fails after the tensors are written leaves the old folder exactly as it was."""
    import steer_lens as sl
    import steer_lens.vector_folder as steering_module

    hook = "blocks.0.hook_resid_pre"
    old = sl.SteeredTransformer(tiny_model, [hook], init="random", init_norm=1.0, seed=1, scale=0.5)
    folder = old.save(tmp_path / "v")
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    new = sl.SteeredTransformer(tiny_model, [hook], init="random", init_norm=1.0, seed=2, scale=2.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the config")

    monkeypatch.setattr(steering_module, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no temporary folder left
    again = sl.SteeredTransformer.load(folder, tiny_model)
    assert again.scale == 0.5 and torch.equal(again.vectors[hook], old.vectors[hook])
    # a complete save replaces the folder and keeps the user's other files
    new.save(folder)
    again = sl.SteeredTransformer.load(folder, tiny_model)
    assert again.scale == 2.0 and torch.equal(again.vectors[hook], new.vectors[hook])
    assert (folder / "notes.txt").read_text() == "mine"



def test_wrapping_leaves_the_users_model_trainable(tiny_model):
    """Issue 15: wrapping (and steered calls, also failing ones) never turns the model's gradients off."""
    import steer_lens as sl

    for p in tiny_model.parameters():
        p.requires_grad_(True)
    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"], init="random", init_norm=1.0)
    s(_tokens(tiny_model))
    with pytest.raises(RuntimeError):
        with s.steering():
            raise RuntimeError("inside a steered block")
    assert all(p.requires_grad for p in tiny_model.parameters())
    tiny_model(_tokens(tiny_model)).sum().backward()  # the user's own fine-tuning still gets gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
    tiny_model.zero_grad(set_to_none=True)
    for p in tiny_model.parameters():
        p.requires_grad_(False)


def test_steering_never_reaches_another_thread(tiny_model):
    """Issue 15: while one thread runs a steered call, the same model in another thread is unsteered."""
    import threading

    import steer_lens as sl

    toks = _tokens(tiny_model)
    base = tiny_model(toks)
    hook = "blocks.0.hook_resid_pre"
    s = sl.SteeredTransformer(tiny_model, [hook], init="random", init_norm=50.0, seed=0)
    steered_ref = s(toks)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        inside.wait(10)
        seen["plain"] = tiny_model(toks)  # runs while the main thread's hooks are installed
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with s.steering():
        inside.set()
        done.wait(10)
        mine = tiny_model(toks)
    t.join(10)
    assert torch.equal(seen["plain"], base)
    assert torch.equal(mine, steered_ref)
    assert _n_hooks(tiny_model) == 0


def test_nested_only_hooks_restore_the_outer_filter(tiny_model):
    import steer_lens as sl

    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    s = sl.SteeredTransformer(tiny_model, hooks, init="random", init_norm=3.0)
    toks = _tokens(tiny_model)
    with s.only_hooks([hooks[0]]):
        outer = s(toks)
        with s.only_hooks([hooks[1]]):
            s(toks)
        assert torch.equal(s(toks), outer)


@pytest.mark.parametrize("damage", ["not_json", "a_list", "missing_keys", "truncated_tensors", "nan_tensors"])
def test_damaged_folders_raise_named_errors(tiny_model, tmp_path, damage):
    """Issue 15: a damaged folder is an IncompatibleVectorError / NonFiniteError naming the file."""
    from safetensors.torch import save_file

    import steer_lens as sl
    from steer_lens.errors import IncompatibleVectorError, NonFiniteError

    hook = "blocks.0.hook_resid_pre"
    folder = sl.SteeredTransformer(tiny_model, [hook], init="random", init_norm=1.0).save(tmp_path / "v")
    cfg, tensors = folder / "config.json", folder / "vectors.safetensors"
    expected = IncompatibleVectorError
    if damage == "not_json":
        cfg.write_text("{not json")
    elif damage == "a_list":
        cfg.write_text("[1, 2]")
    elif damage == "missing_keys":
        cfg.write_text(json.dumps({"format": "steer_lens.vectors"}))
    elif damage == "truncated_tensors":
        tensors.write_bytes(tensors.read_bytes()[:40])
    else:
        save_file({hook: torch.full((tiny_model.cfg.d_model,), float("nan"))}, str(tensors))
        expected = NonFiniteError
    with pytest.raises(expected, match=r"config\.json|vectors\.safetensors"):
        sl.SteeredTransformer.load(folder, tiny_model)


def test_position_context_reads_back_and_refuses_other_values(tiny_model):
    """``position_context`` returns what ``set_offset`` made and restores a saved one (what
    ``recompute_blocks`` replays); anything else is refused before the wrapper changes."""
    import steer_lens as sl
    from steer_lens.hooks import PositionContext

    s = sl.SteeredTransformer(tiny_model, ["blocks.1.hook_resid_pre"])
    saved = s.position_context
    s.set_offset(5, prompt_end=torch.tensor([3]))
    moved = s.position_context
    assert isinstance(moved, PositionContext) and moved.offset == 5 and moved.prompt_end.tolist() == [3]
    s.position_context = saved
    assert s.position_context is saved and s.position_context.offset == 0
    # ConfigError (TypeCheckError first under the tests' jaxtyping + beartype, which read the hint)
    with pytest.raises((sl.errors.ConfigError, TypeError), match="PositionContext"):
        s.position_context = {"offset": 1}
    assert s.position_context is saved
