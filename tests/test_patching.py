"""Patching: exact equality with TransformerLens's patching, metrics, attribution and path patching."""

from __future__ import annotations

import math

import pytest
import torch

ATOL = 1e-5

# (hook, by, name of TransformerLens's function)
TL_CASES = [
    ("resid_pre", None, "get_act_patch_resid_pre"),
    ("resid_mid", None, "get_act_patch_resid_mid"),
    ("attn_out", None, "get_act_patch_attn_out"),
    ("mlp_out", None, "get_act_patch_mlp_out"),
    ("z", ("layer", "pos", "head"), "get_act_patch_attn_head_out_by_pos"),
    ("q", ("layer", "pos", "head"), "get_act_patch_attn_head_q_by_pos"),
    ("k", ("layer", "pos", "head"), "get_act_patch_attn_head_k_by_pos"),
    ("v", ("layer", "pos", "head"), "get_act_patch_attn_head_v_by_pos"),
    ("z", ("layer", "head"), "get_act_patch_attn_head_out_all_pos"),
    ("q", ("layer", "head"), "get_act_patch_attn_head_q_all_pos"),
    ("k", ("layer", "head"), "get_act_patch_attn_head_k_all_pos"),
    ("v", ("layer", "head"), "get_act_patch_attn_head_v_all_pos"),
    ("pattern", ("layer", "head"), "get_act_patch_attn_head_pattern_all_pos"),
    ("pattern", ("layer", "head", "pos"), "get_act_patch_attn_head_pattern_by_pos"),
]

# on the real model (2 layers, 8 heads, 4 key/value heads), a subset that covers every hook kind
REAL_CASES = [TL_CASES[i] for i in (0, 1, 2, 3, 4, 6, 11, 12)]


def _pair(d_vocab: int, batch: int = 2, pos: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, d_vocab, (batch, pos), generator=g)
    return clean, corrupted


def _tl_reference(model, fn_name, clean, corrupted, metric, clean_cache=None):
    from transformer_lens import patching as tlp

    if clean_cache is None:
        _, clean_cache = model.run_with_cache(clean)
    return getattr(tlp, fn_name)(model, corrupted, clean_cache, metric)


# ---------------------------------------------------------------------------------------------------
# activation patching == TransformerLens
# ---------------------------------------------------------------------------------------------------
def test_activation_patch_equals_transformer_lens(tiny_model):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, pos=3)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    gqa = model.cfg.n_key_value_heads is not None
    for hook, by, fn in TL_CASES:
        if hook == "resid_mid" and model.cfg.parallel_attn_mlp:
            continue
        if not gqa and hook in ("q", "k", "v") and "pos" in by:  # full per-head-position set on the GQA model
            continue
        ref = getattr(tlp, fn)(model, corrupted, cache, metric)
        res = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by)
        assert res.values.shape == ref.shape, (hook, by)
        torch.testing.assert_close(res.values, ref.float(), atol=ATOL, rtol=0)
        assert res.values.std() > 0  # the sweep is not trivially constant


def test_every_strategy_equals_transformer_lens(tiny_model):
    """Every strategy, asked for through the public ``strategy=`` (with position groups, so that the
    suffix passes start after position 0), gives TransformerLens's numbers for every hook kind on the
    three families; ``"auto"`` resolves to the most economical one the run allows."""
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, pos=9, seed=23)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    assert sl.patching.choose_strategy(model, last_position_metric=True, n_pos=9).name == "last_query"
    assert sl.patching.choose_strategy(model, last_position_metric=False, n_pos=9).name == "suffix"
    for hook, by, fn in TL_CASES:
        if hook == "resid_mid" and model.cfg.parallel_attn_mlp:
            continue
        ref = getattr(tlp, fn)(model, corrupted, cache, metric)
        for name in sl.patching.STRATEGIES:
            res = sl.patching.activation_patch(
                model, clean, corrupted, metric, hook, by=by,
                strategy=sl.patching.Strategy(name, position_groups=3),
            )
            torch.testing.assert_close(res.values, ref.float(), atol=ATOL, rtol=0, msg=f"{name} {hook} {by}")


def test_strategy_the_run_does_not_allow_is_refused_with_the_reason(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=24)

    def opaque(logits):  # reads every position: no last-query block
        return logits.mean()

    with pytest.raises(sl.errors.ConfigError, match="last position"):
        sl.patching.activation_patch(model, clean, corrupted, opaque, "resid_pre", strategy="last_query")
    with pytest.raises(sl.errors.ConfigError, match="expected 'auto' or one of"):
        sl.patching.activation_patch(model, clean, corrupted, opaque, "resid_pre", strategy="fast")
    with pytest.raises(sl.errors.ConfigError, match="position_groups"):
        sl.patching.Strategy("suffix", position_groups=0)
    # an opaque metric over every position: "full", "prefix" and "suffix" give TransformerLens's numbers
    ref = _tl_reference(model, "get_act_patch_resid_pre", clean, corrupted, opaque)
    for name in ("full", "prefix", "suffix", "auto"):
        res = sl.patching.activation_patch(model, clean, corrupted, opaque, "resid_pre", strategy=name)
        torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0, msg=name)
    # a position-specific steering vector: passes cover every position
    mask = torch.tensor([False, True, False, False, False, False])
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_post"], positions=mask)
    limits = sl.patching.choose_strategy(model, last_position_metric=True, positional=True, n_pos=6)
    assert limits.name == "prefix"
    with pytest.raises(sl.errors.ConfigError, match="position-specific"):
        sl.patching.steering_patch(steered, clean, sl.patching.logit_diff(1, 2), strategy="last_query")


def test_resid_post_and_block_every_match_generic_tl(tiny_model):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=3)
    metric = sl.patching.logprob(4)
    _, cache = model.run_with_cache(clean)
    ref = tlp.generic_activation_patch(
        model, corrupted, cache, metric, tlp.layer_pos_patch_setter, "resid_post", ("layer", "pos")
    )
    res = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_post")
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0)
    every = tlp.get_act_patch_block_every(model, corrupted, cache, metric)
    ours = torch.stack(
        [
            sl.patching.activation_patch(model, clean, corrupted, metric, h).values
            for h in ("resid_pre", "attn_out", "mlp_out")
        ]
    )
    torch.testing.assert_close(ours, every, atol=ATOL, rtol=0)


def test_prefix_sharing_and_chunking_do_not_change_values(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, batch=3, pos=4, seed=2)
    metric = sl.patching.logit_diff(1, 2)
    a = sl.patching.activation_patch(model, clean, corrupted, metric, "z", by=("layer", "pos", "head"))
    b = sl.patching.activation_patch(
        model, clean, corrupted, metric, "z", by=("layer", "pos", "head"), strategy="full", max_batch=3
    )
    torch.testing.assert_close(a.values, b.values, atol=ATOL, rtol=0)


def test_position_grouped_passes_equal_transformer_lens(monkeypatch):
    """Large by-position sweeps run in passes over positions >= p0 against cached keys/values; sites
    local to their position (z, pattern, resid_mid, attn_out, q ...) run their own block on p0..p1 only."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching import activation

    model = sl.random_model("llama", n_layers=3, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    clean, corrupted = _pair(53, pos=16, seed=14)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    calls = []
    run = activation._Runner.run
    # this model is small enough that the sweep would choose one pass per layer: ask for 4
    strategy = sl.patching.Strategy(position_groups=4)  # passes by position group

    def spy(self, layer, n, hooks, p0=0, p1=None):
        calls.append((p0, p1 is not None and self.local_ok(layer, p1)))
        return run(self, layer, n, hooks, p0=p0, p1=p1)

    cases = [
        ("z", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_out_by_pos),
        ("q", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_q_by_pos),
        ("v", ("layer", "pos", "head"), tlp.get_act_patch_attn_head_v_by_pos),
        ("pattern", ("layer", "head", "pos"), tlp.get_act_patch_attn_head_pattern_by_pos),
        ("resid_mid", None, tlp.get_act_patch_resid_mid),
        ("attn_out", None, tlp.get_act_patch_attn_out),
        ("mlp_out", None, tlp.get_act_patch_mlp_out),
        ("resid_pre", None, tlp.get_act_patch_resid_pre),
    ]
    activation._Runner.run = spy
    try:
        results = [
            sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, strategy=strategy).values
            for hook, by, _ in cases
        ]
    finally:
        activation._Runner.run = run
    assert any(p0 > 0 for p0, _ in calls)  # some passes started after position 0
    assert any(local for _, local in calls)  # and some ran their block on p0..p1 only
    for (hook, _, tl_fn), values in zip(cases, results, strict=True):
        torch.testing.assert_close(
            values, tl_fn(model, corrupted, cache, metric), atol=ATOL, rtol=0, msg=hook
        )
    # last block: z sites before the last position cannot reach the last logits; only the last position runs
    # (they are patched inside the last block's single-query call, against the corrupted keys/values)
    from steer_lens.patching._last_query import _LastBlock

    deferred, defer_last = [], _LastBlock.defer_last

    def spy_last(self, name, n, mask, src, pos_dim, p0, derive=""):
        deferred.append((p0, derive))
        return defer_last(self, name, n, mask, src, pos_dim, p0, derive)

    kv_calls, qkv = [], _LastBlock._qkv
    _LastBlock.defer_last = spy_last
    _LastBlock._qkv = lambda self, x: kv_calls.append(x.shape) or qkv(self, x)
    try:
        last = sl.patching.activation_patch(
            model, clean, corrupted, metric, "z", by=("layer", "pos", "head"), layers=[2]
        )
    finally:
        _LastBlock.defer_last, _LastBlock._qkv = defer_last, qkv
    assert deferred and all(p0 == 15 and derive == "corrupted" for p0, derive in deferred)
    assert all(shape[0] <= 2 * clean.shape[0] for shape in kv_calls)  # clean/corrupted rows only
    torch.testing.assert_close(
        last.values[0, :15], torch.full((15, 4), last.corrupted_metric), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(last.values, results[0][2:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_suffix_passes_with_a_metric_of_every_position_equal_transformer_lens(monkeypatch, family):
    """A plain function of the whole logits (here a position-weighted log-probability, so the earlier
    positions' logits count) runs suffix passes: positions < p0 take the corrupted run's logits (a
    causal model cannot change them) and values equal TransformerLens's for every by-position kind,
    rotary (llama) and learned (gpt2) positions, position-local sites included."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching import activation

    model = sl.random_model(family, n_layers=3, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=2)
    clean, corrupted = _pair(53, pos=12, seed=31)
    weights = torch.linspace(1.0, 2.0, 12)

    def every_position(logits):  # opaque to the sweep: reads all positions and the whole vocabulary
        lp = logits.log_softmax(-1)[..., 3]
        return (lp * weights.to(lp.device)).mean()

    _, cache = model.run_with_cache(clean)
    calls, run = [], activation._Runner.run

    def spy(self, layer, n, hooks, p0=0, p1=None):
        calls.append((p0, p1 is not None and self.local_ok(layer, p1)))
        return run(self, layer, n, hooks, p0=p0, p1=p1)

    monkeypatch.setattr(activation._Runner, "run", spy)
    strategy = sl.patching.Strategy("suffix", position_groups=4)
    for hook, by, fn in [TL_CASES[i] for i in (0, 1, 3, 4, 5, 7, 13)]:
        res = sl.patching.activation_patch(model, clean, corrupted, every_position, hook, by=by, strategy=strategy)
        ref = getattr(tlp, fn)(model, corrupted, cache, every_position)
        torch.testing.assert_close(res.values, ref.float(), atol=ATOL, rtol=0, msg=f"{family} {hook} {by}")
        assert res.values.std() > 0
    assert any(p0 > 0 for p0, _ in calls) and any(local for _, local in calls)
    # "auto" picks the suffix passes for such a metric
    assert sl.patching.choose_strategy(model, last_position_metric=False, n_pos=12).name == "suffix"


def _spy_last_query(activation):
    """Counts of the last-query pieces: keys/values computed apart, merged last-block calls."""
    from steer_lens.patching._last_query import _LastBlock

    counts = {"kv": 0, "flush_rows": []}
    kv, last_position = _LastBlock._qkv, _LastBlock._last_position

    def spy_kv(self, x):
        counts["kv"] += 1
        assert x.shape[1] <= self.tokens.shape[1] - 1  # never the last position's keys
        return kv(self, x)

    def spy_last(self, x, keys, values, n):
        counts["flush_rows"].append(x.shape[0])
        assert x.shape[1] == 1 and keys.shape[1] == self.tokens.shape[1] - 1  # one query, T-1 cached keys
        return last_position(self, x, keys, values, n)

    def restore():
        _LastBlock._qkv, _LastBlock._last_position = kv, last_position

    _LastBlock._qkv, _LastBlock._last_position = spy_kv, spy_last
    return counts, restore


LAST_QUERY_CASES = [
    TL_CASES[i] for i in (0, 2, 4, 5, 6, 7, 13)
]  # resid_pre, attn_out, z/q/k/v by pos, pattern


def test_last_block_query_only_equals_transformer_lens(tiny_model):
    """Position-grouped sweeps run the last block on the last position's query only (keys/values of the
    other positions computed apart, passes of earlier blocks merged into one last-block call): values
    still equal TransformerLens's for every hook kind, on the three families."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching import activation

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, pos=12, seed=21)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    counts, restore = _spy_last_query(activation)
    try:
        results = [
            sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by).values
            for hook, by, _ in LAST_QUERY_CASES
        ]
    finally:
        restore()
    assert counts["kv"] > 0 and max(counts["flush_rows"]) > 2 * 12  # several passes in one last-block call
    for (hook, _, fn), values in zip(LAST_QUERY_CASES, results, strict=True):
        torch.testing.assert_close(
            values, getattr(tlp, fn)(model, corrupted, cache, metric), atol=ATOL, rtol=0, msg=hook
        )
    # a vector in the last block (its hooks run in the keys/values computation too) and noising
    steered = _steered(model)
    _, base_cache = model.run_with_cache(clean)
    with model.hooks(fwd_hooks=steered.fwd_hooks()):
        ref = tlp.get_act_patch_resid_pre(model, clean, base_cache, metric)
        ref_k = tlp.get_act_patch_attn_head_k_by_pos(model, clean, base_cache, metric)
    counts, restore = _spy_last_query(activation)
    try:
        noi = sl.patching.steering_patch(steered, clean, metric, "resid_pre", mode="noise")
        noi_k = sl.patching.steering_patch(
            steered, clean, metric, "k", by=("layer", "pos", "head"), mode="noise"
        )
    finally:
        restore()
    assert counts["kv"] > 0
    torch.testing.assert_close(noi.values, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(noi_k.values, ref_k, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_last_block_flushes_and_one_layer_equal_transformer_lens(monkeypatch, n_layers):
    """The merged last-block calls with a tiny flush size (each flush re-adds the clean rows its
    in-call patches read from) and on a one-layer model (block 0 is the last block: no fused first
    pass), with position groups: values equal TransformerLens's."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching._last_query import _LastBlock

    model = sl.random_model("llama", n_layers=n_layers, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=3)
    clean, corrupted = _pair(53, pos=10, seed=8)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    strategy = sl.patching.Strategy(position_groups=3)  # passes by position group
    flushes, flush = [], _LastBlock.flush

    def spy(self):
        flushes.append([e.clean for e in self._pending])
        return flush(self)

    monkeypatch.setattr(_LastBlock, "flush", spy)
    for hook, by, fn in [TL_CASES[0], TL_CASES[4], TL_CASES[7]]:  # resid_pre, z, v by position
        res = sl.patching.activation_patch(
            model, clean, corrupted, metric, hook, by=by, memory_budget=1 << 16, strategy=strategy
        )
        torch.testing.assert_close(
            res.values, getattr(tlp, fn)(model, corrupted, cache, metric), atol=ATOL, rtol=0, msg=hook
        )
    assert sum(1 for f in flushes if f) > 3 * 2  # several flushes per sweep
    assert sum(1 for f in flushes if f and not any(f)) > 0  # ... also without the clean run's rows


@pytest.mark.parametrize("case", [0, 6, 7, 8, 10, 11], ids=lambda i: "-".join([TL_CASES[i][0], *(TL_CASES[i][1] or ())]))
def test_last_block_keys_values_come_from_clean_and_corrupted_rows(monkeypatch, case):
    """Sites in the last block whose patch acts before its keys/values position by position
    (resid_pre, k, v) or after them (z): the flush computes keys/values for the clean and corrupted
    rows only and mixes the patched rows' from them; values equal TransformerLens's (grouped-query
    attention: 2 key/value heads for 4 query heads)."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching._last_query import _LastBlock

    hook, by, fn = TL_CASES[case]
    model = sl.random_model(
        "llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=4, n_key_value_heads=2
    )
    clean, corrupted = _pair(53, pos=7, seed=2)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    rows, qkv = [], _LastBlock._qkv
    monkeypatch.setattr(_LastBlock, "_qkv", lambda self, x: rows.append(x.shape[0]) or qkv(self, x))
    res = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, layers=[1])
    assert rows and max(rows) <= 2 * clean.shape[0]  # no keys/values computed for patched copies
    ref = getattr(tlp, fn)(model, corrupted, cache, metric)
    torch.testing.assert_close(res.values[0], ref[1], atol=ATOL, rtol=0)


ARCH_VARIANTS = {
    # q/k norm after hook_k (Qwen3, Gemma 3, OLMo 2): the key caches must hold the normalised keys
    "qk_norm_gqa": dict(use_qk_norm=True, n_key_value_heads=2),
    "local_attention": dict(use_local_attn=True, window_size=3, attn_types=["local", "global", "local"]),
    "softcaps": dict(attn_scores_soft_cap=5.0, output_logits_soft_cap=10.0),
    "norm_before_and_after": dict(use_normalization_before_and_after=True),
    "partial_adjacent_rotary": dict(rotary_dim=4, rotary_adjacent_pairs=True),
}


@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
def test_architecture_variants_equal_transformer_lens(variant):
    """Llama-family variants whose attention differs where the suffix passes and the last-query mode
    reuse keys/values through TransformerLens's cache (a q/k norm after ``hook_k``, sliding-window
    attention, soft caps, Gemma-2-style norms, partial/adjacent rotary), with position groups so that
    passes start after position 0: values equal TransformerLens's."""
    import steer_lens as sl

    model = sl.random_model(
        "llama", n_layers=3, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=3, **ARCH_VARIANTS[variant]
    )
    clean, corrupted = _pair(53, pos=10, seed=1)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    for i in (0, 4, 6, 10):  # resid_pre; z, k by position; k over all positions
        hook, by, fn = TL_CASES[i]
        ref = _tl_reference(model, fn, clean, corrupted, metric, cache)
        for name in sl.patching.STRATEGIES:  # every strategy, passes by position group
            strategy = sl.patching.Strategy(name, position_groups=3)
            res = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, strategy=strategy)
            torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0, msg=f"{name} {hook}")


@pytest.mark.real_model
def test_real_model_last_block_query_only(real_model, stories):
    """The same on the real model (grouped-query attention: 4 key/value heads), 24-token story prompts."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching import activation

    model = real_model
    toks = [t[:24] for t in (model.to_tokens(s)[0] for s in stories) if t.shape[0] >= 24][:4]
    clean, corrupted = torch.stack(toks[:2]), torch.stack(toks[2:])
    metric = sl.patching.logit_diff(clean[:, -1], corrupted[:, -1])
    _, cache = model.run_with_cache(clean)
    counts, restore = _spy_last_query(activation)
    try:
        res = {
            hook: sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by).values
            for hook, by, _ in LAST_QUERY_CASES[:1] + LAST_QUERY_CASES[4:6]
        }
    finally:
        restore()
    assert counts["kv"] > 0
    for hook, _by, fn in LAST_QUERY_CASES[:1] + LAST_QUERY_CASES[4:6]:
        torch.testing.assert_close(
            res[hook], getattr(tlp, fn)(model, corrupted, cache, metric), atol=ATOL, rtol=0, msg=hook
        )


def test_properties_self_patch_and_whole_layer(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=4)
    metric = sl.patching.logit_diff(1, 2)
    same = sl.patching.activation_patch(model, corrupted, corrupted, metric, "resid_pre")
    torch.testing.assert_close(
        same.values, torch.full_like(same.values, same.corrupted_metric), atol=ATOL, rtol=0
    )
    # patching the whole residual stream at layer 0 reproduces the clean run
    whole = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_pre", by=("layer",))
    assert whole.values.shape == (model.cfg.n_layers,)
    assert abs(float(whole.values[0]) - whole.clean_metric) < ATOL
    norm = whole.normalized()
    assert abs(float(norm[0]) - 1.0) < 1e-4


def test_tl_style_metrics_and_batch_metrics_agree(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=5)
    correct, wrong = torch.tensor([3, 5]), torch.tensor([7, 9])

    def tl_metric(logits):  # reduces over the batch, as TransformerLens metrics do
        last = logits[:, -1]
        return (last[torch.arange(2), correct] - last[torch.arange(2), wrong]).mean()

    def per_batch_metric(logits):  # returns [batch]
        last = logits[:, -1]
        return last[torch.arange(2), correct] - last[torch.arange(2), wrong]

    ours = sl.patching.logit_diff(correct, wrong)
    a = sl.patching.activation_patch(model, clean, corrupted, tl_metric, "attn_out")
    b = sl.patching.activation_patch(model, clean, corrupted, per_batch_metric, "attn_out")
    c = sl.patching.activation_patch(model, clean, corrupted, ours, "attn_out")
    torch.testing.assert_close(a.values, c.values, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.values, c.values, atol=ATOL, rtol=0)


def test_positions_heads_layers_restrict_the_sweep(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=6)
    metric = sl.patching.logit_diff(1, 2)
    full = sl.patching.activation_patch(model, clean, corrupted, metric, "z", by=("layer", "pos", "head"))
    part = sl.patching.activation_patch(
        model,
        clean,
        corrupted,
        metric,
        "z",
        by=("layer", "pos", "head"),
        layers=[1],
        positions=[0, 4],
        heads=[2],
    )
    torch.testing.assert_close(part.values, full.values[1:2][:, [0, 4]][:, :, [2]], atol=ATOL, rtol=0)
    assert part.labels["layer"] == ["1"] and part.labels["head"] == ["2"]


@pytest.mark.parametrize("groups", [None, 3])
def test_restricted_sweeps_equal_rows_of_the_full_sweep(groups):
    """Layer and position subsets change which passes exist (no block-0 pass inside the clean/corrupted
    pass, first position group starting after 0, last block alone): the values are still the full
    sweep's rows, with one pass per layer or position groups."""
    import steer_lens as sl

    strategy = sl.patching.Strategy(position_groups=groups)  # None: the sweep's own choice
    model = sl.random_model("llama", n_layers=3, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    clean, corrupted = _pair(53, pos=14, seed=5)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    for hook, by in [("resid_pre", None), ("z", ("layer", "pos", "head")), ("k", ("layer", "pos", "head"))]:
        full = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, strategy=strategy).values
        for layers in ([1], [0, 2], [2]):
            part = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, layers=layers, strategy=strategy)
            torch.testing.assert_close(part.values, full[layers], atol=ATOL, rtol=0, msg=f"{hook} {layers}")
        part = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, positions=[3, 7, 13], strategy=strategy)
        torch.testing.assert_close(part.values, full[:, [3, 7, 13]], atol=ATOL, rtol=0, msg=hook)


def test_align_patches_shifted_positions():
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = sl.random_model("gpt2", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    clean, corrupted = _pair(53, pos=6, seed=7)
    longer = torch.cat([clean[:, :1], clean], 1)  # a clean run one token longer
    align = [0, 2, 3, 4, 5, 6]  # clean position patched into each corrupted position
    metric = sl.patching.logprob(3)
    _, cache = model.run_with_cache(longer)
    aligned = {f"blocks.{i}.hook_attn_out": cache[f"blocks.{i}.hook_attn_out"][:, align] for i in range(2)}
    ref = tlp.generic_activation_patch(
        model, corrupted, aligned, metric, tlp.layer_pos_patch_setter, "attn_out", ("layer", "pos")
    )
    res = sl.patching.activation_patch(model, longer, corrupted, metric, "attn_out", align=align)
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0)
    with pytest.raises(sl.errors.ShapeMismatchError, match="align"):
        sl.patching.activation_patch(model, longer, corrupted, metric, "resid_pre", align=[0, 1])
    with pytest.raises(sl.errors.ConfigError, match="align"):
        sl.patching.activation_patch(model, longer, corrupted, metric, "pattern", align=align)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    import steer_lens as sl
    from steer_lens.errors import ConfigError, HookNameError, MetricError, ShapeMismatchError

    model = sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    neox = sl.random_model("neox", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    clean, corrupted = _pair(53)
    metric = sl.patching.logit_diff(1, 2)
    ap = sl.patching.activation_patch
    with pytest.raises(ShapeMismatchError, match="same length"):
        ap(model, clean, corrupted[:, :-1], metric)
    with pytest.raises(ShapeMismatchError, match="batch"):
        ap(model, clean[:1], corrupted, metric)
    with pytest.raises(HookNameError, match="expected one of"):
        ap(model, clean, corrupted, metric, "resid_prex")
    with pytest.raises(HookNameError, match="not a hook point"):
        ap(neox, clean, corrupted, metric, "resid_mid")  # parallel attention has no resid_mid
    with pytest.raises(ConfigError, match="key/value heads"):
        ap(model, clean, corrupted, metric, "k", by=("layer", "head"), heads=[3])  # 2 KV heads
    with pytest.raises(ConfigError, match="heads"):
        ap(model, clean, corrupted, metric, "z", by=("layer", "head"), heads=[4])
    with pytest.raises(ConfigError, match="layers"):
        ap(model, clean, corrupted, metric, layers=[2])
    with pytest.raises(ConfigError, match="by"):
        ap(model, clean, corrupted, metric, "resid_pre", by=("pos", "layer"))
    with pytest.raises(ConfigError, match="by"):
        ap(model, clean, corrupted, metric, "resid_pre", by=("layer", "head"))
    with pytest.raises(MetricError, match="shape"):
        ap(model, clean, corrupted, lambda logits: logits[:, -1, :3])
    with pytest.raises(MetricError, match="NaN or inf"):
        ap(model, clean, corrupted, lambda logits: logits[:, -1, 0].mean() * float("nan"))
    with pytest.raises(ConfigError, match="max_batch"):
        ap(model, clean, corrupted, metric, max_batch=1)


def test_exception_in_metric_leaves_model_pristine():
    import steer_lens as sl

    model = sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    clean, corrupted = _pair(53)
    before = model(corrupted)
    calls = {"n": 0}

    def bad(logits):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        return logits[:, -1, 0].mean()

    with pytest.raises(RuntimeError, match="boom"):
        sl.patching.activation_patch(model, clean, corrupted, bad)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
    assert torch.equal(model(corrupted), before)


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def test_metric_factories_closed_forms():
    import steer_lens as sl

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g)
    ld = sl.patching.logit_diff(torch.tensor([1, 2, 3]), 4)
    torch.testing.assert_close(
        ld.per_sequence(logits), logits[:, -1, [1, 2, 3]].diagonal() - logits[:, -1, 4]
    )
    assert ld(logits).ndim == 0
    # targets tile over stacked copies of the batch
    torch.testing.assert_close(
        ld.per_sequence(torch.cat([logits, logits])), ld.per_sequence(logits).repeat(2)
    )
    lp = sl.patching.logprob(5, pos=1)
    torch.testing.assert_close(lp.per_sequence(logits), logits[:, 1].log_softmax(-1)[:, 5])
    kl = sl.patching.kl_to(logits)
    assert kl.per_sequence(logits).dtype == torch.float64
    torch.testing.assert_close(
        kl.per_sequence(logits), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    other = torch.randn(3, 4, 11, generator=g)
    p = logits[:, -1].double().softmax(-1)
    q = other[:, -1].double().log_softmax(-1)
    torch.testing.assert_close(kl.per_sequence(other), (p * (p.log() - q)).sum(-1))
    kl_all = sl.patching.kl_to(logits, pos=None)
    assert (kl_all.per_sequence(other) > 0).all()
    pc = sl.patching.prob_change([2, 7, 7], reference_logits=logits)
    torch.testing.assert_close(
        pc.per_sequence(logits), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    mass = sl.patching.prob_change([2, 7]).per_sequence(other)
    torch.testing.assert_close(mass, other[:, -1].double().softmax(-1)[:, [2, 7]].sum(-1))
    with pytest.raises(sl.errors.ShapeMismatchError):
        sl.patching.logit_diff(torch.tensor([1, 2]), 3).per_sequence(logits)  # 2 targets, 3 sequences


# ---------------------------------------------------------------------------------------------------
# steering patch
# ---------------------------------------------------------------------------------------------------
def _steered(model, hook="blocks.1.hook_resid_pre", norm=2.0):
    import steer_lens as sl

    return sl.SteeredTransformer(model, hooks=[hook], init="random", init_norm=norm, seed=0)


def test_steering_patch_denoise_and_noise_equal_tl(tiny_model):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    steered = _steered(model)
    tokens, _ = _pair(model.cfg.d_vocab, seed=8)
    metric = sl.patching.logprob(3)
    _, steered_cache = steered.run_with_cache(tokens)
    _, base_cache = model.run_with_cache(tokens)
    den = sl.patching.steering_patch(steered, tokens, metric, "resid_post")
    ref = tlp.generic_activation_patch(
        model, tokens, steered_cache, metric, tlp.layer_pos_patch_setter, "resid_post", ("layer", "pos")
    )
    torch.testing.assert_close(den.values, ref, atol=ATOL, rtol=0)
    assert den.values[0].sub(den.corrupted_metric).abs().max() < ATOL  # layer 0 is before the vector
    with model.hooks(fwd_hooks=steered.fwd_hooks()):
        ref_noise = tlp.get_act_patch_attn_head_out_by_pos(model, tokens, base_cache, metric)
    noi = sl.patching.steering_patch(steered, tokens, metric, "z", by=("layer", "pos", "head"), mode="noise")
    torch.testing.assert_close(noi.values, ref_noise, atol=ATOL, rtol=0)
    assert noi.kind == "noise" and abs(noi.corrupted_metric - den.clean_metric) < ATOL
    # removing the vector everywhere at its own hook gives the base run back
    whole = sl.patching.steering_patch(steered, tokens, metric, "resid_pre", by=("layer",), mode="noise")
    assert abs(float(whole.values[1]) - whole.clean_metric) < ATOL


@pytest.mark.parametrize("positions", ["all", "mask"])
def test_activation_patch_on_steered_model_equals_tl(tiny_model, positions):
    """`activation_patch` on a SteeredTransformer runs both inputs steered. With a vector in the last
    block (its hook fires in the clean rows, the corrupted rows and every copy of the fused passes),
    and with a position-specific vector (no suffix passes), values equal TransformerLens's with the
    steering hooks installed."""
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    last = model.cfg.n_layers - 1
    if positions == "mask":
        positions = torch.arange(12) % 3 == 0
    steered = sl.SteeredTransformer(
        model, hooks=[f"blocks.{last}.hook_resid_pre"], init="random", init_norm=3.0, seed=1, positions=positions
    )
    clean, corrupted = _pair(model.cfg.d_vocab, pos=12, seed=31)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    with model.hooks(fwd_hooks=steered.fwd_hooks()):
        _, cache = model.run_with_cache(clean)
        refs = [getattr(tlp, fn)(model, corrupted, cache, metric) for _, _, fn in (TL_CASES[0], TL_CASES[6])]
    for (hook, by, _), ref in zip((TL_CASES[0], TL_CASES[6]), refs, strict=True):  # resid_pre, k by pos
        res = sl.patching.activation_patch(steered, clean, corrupted, metric, hook, by=by)
        torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0, msg=hook)
    plain = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_pre")
    assert (plain.values - refs[0]).abs().max() > 1e-3  # the vector matters here


@pytest.mark.parametrize("mask_ndim", [1, 2])
def test_steering_patch_with_position_masks_equals_tl(mask_ndim):
    """Vectors on some positions only: no suffix passes (absolute positions); a per-sequence [batch, pos]
    mask is tiled over the stacked copies of each pass."""
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    tokens, _ = _pair(53, pos=16, seed=15)
    mask = torch.arange(16) < 9
    if mask_ndim == 2:
        mask = torch.stack([mask, torch.arange(16) >= 4])
    steered = sl.SteeredTransformer(
        model, hooks=["blocks.1.hook_resid_pre"], init="random", init_norm=3.0, positions=mask
    )
    metric = sl.patching.logprob(3)
    _, base_cache = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=steered.fwd_hooks()):
        ref = tlp.get_act_patch_attn_head_out_by_pos(model, tokens, base_cache, metric)
    res = sl.patching.steering_patch(steered, tokens, metric, "z", by=("layer", "pos", "head"), mode="noise")
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0)
    one = sl.patching.steering_patch(
        steered, tokens, metric, "z", by=("layer", "pos", "head"), mode="noise", max_batch=tokens.shape[0]
    )  # one copy per pass: the mask is never tiled
    torch.testing.assert_close(res.values, one.values, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# attribution patching
# ---------------------------------------------------------------------------------------------------
def _tl_attribution(model, clean, corrupted, metric, hook_filter):
    """Reference: TransformerLens caches of the clean and corrupted runs and backward hooks (Nanda 2023)."""
    _, clean_cache = model.run_with_cache(clean, names_filter=hook_filter)
    grads, acts = {}, {}

    def fwd(act, hook):
        acts[hook.name] = act.detach()

    def bwd(grad, hook):
        grads[hook.name] = grad.detach()

    model.reset_hooks()
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        model.add_hook(hook_filter, fwd, "fwd")
        model.add_hook(hook_filter, bwd, "bwd")
        try:
            metric(model(corrupted)).backward()
        finally:
            model.reset_hooks()
            model.zero_grad(set_to_none=True)
    return {n: (clean_cache[n] - acts[n]) * grads[n] for n in acts}


def test_attribution_patch_equals_tl_backward_hooks(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=9)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    prods = _tl_attribution(
        model, clean, corrupted, metric, lambda n: n.endswith(("hook_resid_pre", "hook_z"))
    )
    L = model.cfg.n_layers
    res = sl.patching.attribution_patch(model, clean, corrupted, metric, "resid_pre")
    ref = torch.stack([prods[f"blocks.{i}.hook_resid_pre"].sum((0, -1)) for i in range(L)])
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=1e-4)
    res = sl.patching.attribution_patch(model, clean, corrupted, metric, "z", by=("layer", "head"))
    ref = torch.stack([prods[f"blocks.{i}.attn.hook_z"].sum((0, 1, 3)) for i in range(L)])
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=1e-4)
    res = sl.patching.attribution_patch(model, clean, corrupted, metric, "z", by=("layer", "pos", "head"))
    ref = torch.stack([prods[f"blocks.{i}.attn.hook_z"].sum((0, 3)) for i in range(L)])
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=1e-4)
    assert res.kind == "attribution"
    zero = sl.patching.attribution_patch(
        model, corrupted, corrupted, metric, "pattern", by=("layer", "head", "pos")
    )
    assert zero.values.abs().max() == 0


def test_attribution_is_exact_for_tiny_differences():
    """First order is exact in the limit: a clean run that differs by a tiny vector at one hook."""
    import steer_lens as sl

    model = sl.random_model(
        "gpt2", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1, dtype=torch.float64
    )
    tokens, _ = _pair(53, seed=10)
    steered = _steered(model, "blocks.0.hook_resid_post", norm=1e-4)
    metric = sl.patching.logprob(3)
    va = sl.patching.vector_attribution(steered, tokens, metric)
    assert va.values.shape == (1, 2, 6)
    assert math.isclose(float(va.values.sum()), va.total_effect, rel_tol=1e-3)
    vb = sl.patching.vector_attribution(steered, tokens, metric, at="base")
    assert math.isclose(float(vb.values.sum()), vb.total_effect, rel_tol=1e-3)
    # steered run as "clean" and base as "corrupted": attribution of the whole vector at layer 1
    exact = sl.patching.steering_patch(steered, tokens, metric, "resid_pre", by=("layer",), layers=[1])
    assert math.isclose(float(exact.effect[0]), va.total_effect, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# path patching
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "hook"),
    [
        ("neox", "blocks.1.hook_resid_pre"),
        ("llama", "blocks.1.hook_resid_mid"),
        ("gpt2", "blocks.1.hook_attn_out"),
    ],
)
def test_path_patch_paths_add_up_in_the_linear_regime(family, hook):
    """In the last block these are all the paths there are, so tiny vectors' paths sum to the total."""
    import steer_lens as sl

    model = sl.random_model(
        family, n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1, dtype=torch.float64
    )
    tokens, _ = _pair(53, seed=11)
    steered = _steered(model, hook, norm=1e-4)
    res = sl.patching.path_patch(steered, tokens, sl.patching.logit_diff(1, 2))
    assert abs(res.additivity - 1) < 1e-3
    assert math.isclose(res.effects["all_paths"], res.total_effect, rel_tol=1e-3)
    if res.block is not None:
        assert math.isclose(res.variants["attn_to_both"], res.total_effect, rel_tol=1e-9, abs_tol=1e-15)


def test_path_patch_structure_and_exact_cases():
    import steer_lens as sl

    model = sl.random_model("llama", n_layers=3, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    tokens, _ = _pair(53, seed=12)
    metric = sl.patching.logit_diff(1, 2)
    last = _steered(model, "blocks.2.hook_resid_post", norm=3.0)
    r = sl.patching.path_patch(last, tokens, metric)
    assert set(r.effects) == {"direct", "all_paths", "frozen_patterns"} and r.block is None and not r.variants
    assert math.isclose(r.effects["direct"], r.total_effect, rel_tol=1e-5)
    st = _steered(model, "blocks.1.hook_resid_pre", norm=3.0)
    r = sl.patching.path_patch(st, tokens, metric)
    assert r.head_effects.shape == (2, 4)
    assert {"mlp 1", "mlp 2", "head 1.0", "head 2.3", "direct"} <= set(r.effects)
    assert math.isclose(r.variants["attn_to_both"], r.total_effect, rel_tol=1e-5, abs_tol=1e-6)
    for name in (
        "skip_attention",
        "skip_layer",
        "attn_to_residual",
        "attn_to_mlp",
        "knockout head 0",
        "only head 3",
    ):
        assert name in r.variants
    df = r.to_pandas()
    assert {"group", "name", "effect", "fraction"} <= set(df.columns)
    assert type(r.plot()).__name__ == "Figure" and type(r.plot(variants=True)).__name__ == "Figure"
    assert "PathPatchResult" in r._repr_html_()
    with pytest.raises(sl.errors.ConfigError):
        sl.patching.path_patch(model, tokens, metric)


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
def test_patch_result_views(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=13)
    metric = sl.patching.logit_diff(1, 2)
    for hook, by in [("resid_pre", None), ("z", ("layer", "pos", "head")), ("mlp_out", ("layer",))]:
        res = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by)
        fig = res.plot()
        assert type(fig).__name__ == "Figure"
        df = res.to_pandas()
        assert len(df) == res.values.numel()
        assert df["value"].tolist() == pytest.approx(res.values.reshape(-1).tolist())
        assert "PatchResult" in res._repr_html_()
        assert len(res.top(3)) == min(3, res.values.numel())
        if "pos" in res.axes:
            assert "<" in str(res.token_view())  # circuitsvis HTML
        else:
            with pytest.raises(sl.errors.ConfigError):
                res.token_view()
    with pytest.raises(AttributeError):  # frozen
        res.hook = "x"


# ---------------------------------------------------------------------------------------------------
# the real model (grouped-query attention)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_model_equals_transformer_lens(real_model):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = real_model
    clean = model.to_tokens(["Lily had a little dog", "Lily had a little cat"])
    corrupted = model.to_tokens(["Lily had a little cat", "Lily had a little dog"])
    assert clean.shape == corrupted.shape
    dog, cat = int(clean[0, 5]), int(corrupted[0, 5])
    assert model.to_string([dog]) == "dog" and model.to_string([cat]) == "cat"
    metric = sl.patching.logit_diff(clean[:, 5], corrupted[:, 5])  # per-sequence targets
    _, cache = model.run_with_cache(clean)
    assert cache["blocks.0.attn.hook_k"].shape[2] == model.cfg.n_key_value_heads == 4
    for hook, by, fn in REAL_CASES:
        ref = getattr(tlp, fn)(model, corrupted, cache, metric)
        res = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by)
        assert res.values.shape == ref.shape, (hook, by)
        torch.testing.assert_close(res.values, ref.float(), atol=ATOL, rtol=0)
    assert res.labels["layer"] == ["0", "1"]
    first = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_pre")
    assert first.labels["pos"][5] == "5: cat"  # positions are labelled with the corrupted tokens


@pytest.mark.real_model
def test_real_model_attribution_ranks_sites(real_model):
    from scipy.stats import spearmanr

    import steer_lens as sl

    model = real_model
    clean = model.to_tokens(["Lily had a little dog", "Lily had a little cat"])
    corrupted = model.to_tokens(["Lily had a little cat", "Lily had a little dog"])
    metric = sl.patching.logit_diff(clean[:, 5], corrupted[:, 5])
    exact = sl.patching.activation_patch(model, clean, corrupted, metric, "z", by=("layer", "pos", "head"))
    est = sl.patching.attribution_patch(model, clean, corrupted, metric, "z", by=("layer", "pos", "head"))
    rho = spearmanr(exact.effect.reshape(-1), est.values.reshape(-1))[0]
    assert rho > 0.5


def test_column_metric_equals_full_metric_and_bad_ids(tiny_model):
    """logit_diff declares the two columns it reads; on those columns it gives the same values."""
    import steer_lens as sl
    from steer_lens.errors import ConfigError, MetricError

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, 53, generator=g)
    metric = sl.patching.logit_diff(torch.tensor([9, 2, 9]), torch.tensor([4, 40, 2]))
    assert metric.columns.tolist() == [2, 4, 9, 40]
    sub = logits[..., metric.columns]
    torch.testing.assert_close(
        metric.on_columns.per_sequence(sub), metric.per_sequence(logits), rtol=0, atol=0
    )
    with pytest.raises(ConfigError, match="columns and on_columns"):
        sl.patching.Metric(lambda x: x[:, -1, 0], name="m", units="logits", columns=torch.tensor([0]))
    clean, corrupted = _pair(tiny_model.cfg.d_vocab, seed=8)
    with pytest.raises(MetricError, match="outside the vocabulary"):
        sl.patching.activation_patch(tiny_model, clean, corrupted, sl.patching.logit_diff(10**6, 1))


# ---------------------------------------------------------------------------------------------------
# sites before the first differing token
# ---------------------------------------------------------------------------------------------------
def _minimal_pair(d_vocab: int, *, batch: int = 2, pos: int = 7, first_diff: int = 4, seed: int = 31):
    """Clean/corrupted rows equal before ``first_diff`` (row 0 differs there, row 1 one later)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    corrupted = clean.clone()
    corrupted[0, first_diff:] = torch.randint(0, d_vocab, (pos - first_diff,), generator=g)
    corrupted[1, first_diff + 1] = (clean[1, first_diff + 1] + 1) % d_vocab
    assert (clean[:, first_diff] != corrupted[:, first_diff]).any()
    return clean, corrupted


def test_minimal_pairs_skip_the_shared_prefix_and_equal_transformer_lens(tiny_model, monkeypatch):
    """Clean and corrupted prompts that share a prefix (a minimal pair): the sites before the first
    differing position are not run (their patched run is the corrupted run) and every hook kind, every
    strategy and a restricted, unordered ``positions=`` still give TransformerLens's numbers."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching import activation as act

    model = tiny_model
    clean, corrupted = _minimal_pair(model.cfg.d_vocab)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    _, cache = model.run_with_cache(clean)
    swept: list[tuple[int, ...]] = []
    inner = act._sweep

    def recording(model, plan, *args, **kwargs):
        swept.append(plan.index.get("pos", ()))
        return inner(model, plan, *args, **kwargs)

    monkeypatch.setattr(act, "_sweep", recording)
    for hook, by, fn in TL_CASES:
        if hook == "resid_mid" and model.cfg.parallel_attn_mlp:
            continue
        ref = getattr(tlp, fn)(model, corrupted, cache, metric).float()
        for name in sl.patching.STRATEGIES:
            swept.clear()
            res = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, strategy=name)
            torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0, msg=f"{name} {hook} {by}")
            if by is None or "pos" in by:
                assert swept == [tuple(range(7)) if name == "full" else (4, 5, 6)], (name, hook, by)
                if name != "full":  # the skipped sites hold the corrupted metric itself
                    skipped = res.values.movedim(res.axes.index("pos"), 1)[:, :4]
                    assert torch.equal(skipped, torch.full_like(skipped, res.corrupted_metric))
    swept.clear()
    res = sl.patching.activation_patch(model, clean, corrupted, metric, "resid_pre", positions=[6, 1, 4, 2])
    assert swept == [(6, 4)]
    ref = tlp.get_act_patch_resid_pre(model, corrupted, cache, metric).float()[:, [6, 1, 4, 2]]
    torch.testing.assert_close(res.values, ref, atol=ATOL, rtol=0)
    assert res.labels["pos"][1].startswith("1")


def test_identical_inputs_are_swept_and_shared_prefix_counts_every_row():
    from steer_lens.patching.activation import _shared_prefix

    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 9, 4], [1, 8, 3, 4]])
    assert _shared_prefix(a, b) == 1  # row 1 differs at position 1
    assert _shared_prefix(a, a) == 4
    assert _shared_prefix(a, torch.tensor([[0, 2, 3, 4], [1, 2, 3, 4]])) == 0
