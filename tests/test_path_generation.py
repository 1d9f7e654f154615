"""Path-patching variants scored on sampled answers (Sinii et al. 2025), against independent references.

References: :func:`~steer_lens.patching.path_patch`'s variant runs (its own caches, tested against the
paper's layer in ``test_path_variants_sinii.py``); the steered and base models' own greedy decoding
(``steered.generate``); a closed form (``skip_layer`` of a vector just before the last block is the base
model with the vector added after that block); the Wilson interval's formula; and, for the multi-group
combinations, the paper's ``group`` / ``inverse_group`` patch transcribed by hand on ``hook_z`` (union of the
groups' query-head slices of the pre-``o_proj`` attention output, ``head_patched_path/llama/transformers.py``
``insert_patch`` L56-63 applied to each slice).
"""

from __future__ import annotations

import math

import pytest
import torch

HOOK = "blocks.1.hook_mlp_out"  # the vector just before the last block (the paper's pre-last vector)
ATOL = 1e-9


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _setup(n_layers=3, n_heads=4, hook=HOOK, **kw):
    import steer_lens as sl

    model = sl.random_model("llama", n_layers=n_layers, d_model=8 * n_heads, n_heads=n_heads, d_vocab=53, n_ctx=40,
                            seed=1, dtype=torch.float64, **kw)
    steered = sl.SteeredTransformer(model, hooks=[hook], init="random", init_norm=4.0, seed=0)
    tokens = torch.randint(0, 53, (3, 6), generator=torch.Generator().manual_seed(5))
    return model, steered, tokens


def _first_token_is(tok: int):
    return lambda prompts, completions: torch.tensor([float(c.split()[0] == str(tok)) for c in completions])


def _metric(logits):
    return (logits[:, -1, 1] - logits[:, -1, 2]).mean()


def _ids(res, variant):
    return torch.tensor([[int(t) for t in c.split()] for c in res.completions[variant]])


def test_patched_logits_equal_path_patch_for_every_variant():
    """Teacher-forced patched model (the stacked run) == path_patch's variant runs, all 60 variants."""
    import steer_lens as sl
    from steer_lens.patching.path_generation import patched_logits

    model, steered, tokens = _setup()
    res = sl.patching.path_patch(steered, tokens, _metric, variants="full", group_sets=[(0, 1)])
    base = float(_metric(model(tokens)))
    assert len(res.variants) == 4 * 2 * 3 + (4 + 2 + 2) * 2 + 2 + 2 * 2 + 2 + 5
    for v, ref in [*res.variants.items(), ("base", 0.0), ("steered", res.total_effect)]:
        got = float(_metric(patched_logits(steered, tokens, v))) - base
        assert math.isclose(got, ref, rel_tol=1e-9, abs_tol=ATOL), (v, got, ref)


@pytest.mark.parametrize("max_batch", [96, 12])
def test_cached_decoding_equals_teacher_forced_patched_model(max_batch):
    """The logits of every decoding step (KV cache, three copies, prompts prefilled once per sample set,
    chunked) == the patched model teacher-forced on the final tokens; the first step == path_patch's."""
    from steer_lens.patching.path_generation import patched_logits, path_variant_accuracy

    _, steered, tokens = _setup()
    vs = ["base", "steered", "skip_attention", "skip_layer", "attn_to_residual", "attn_to_mlp", "knockout v all heads",
          "only q head 1", "only k kv-head 1", "knockout head 2 -> residual", "only head 0 -> mlp", "only groups 0+1"]
    res = path_variant_accuracy(steered, tokens, _first_token_is(7), variants=vs, n_samples=2, max_new_tokens=5,
                                seed=3, keep_logits=True, max_batch=max_batch)
    plen = tokens.shape[1]
    for v in vs:
        new = _ids(res, v)
        full = torch.cat([tokens.repeat_interleave(2, 0), new], 1)
        ref = patched_logits(steered, full, v)[:, plen - 1 : -1]
        got = torch.cat(list(res.step_logits[v]), 0)
        torch.testing.assert_close(got, ref[:, : got.shape[1]], atol=1e-10, rtol=1e-9)


def test_greedy_steered_and_base_equal_the_models_own_decoding():
    import steer_lens as sl
    from steer_lens.patching.path_generation import path_variant_accuracy

    model, steered, tokens = _setup()
    res = path_variant_accuracy(steered, tokens, _first_token_is(7), variants=["steered", "attn_to_both", "base"],
                                do_sample=False, n_samples=1, max_new_tokens=6)
    own = steered.generate(tokens, max_new_tokens=6, do_sample=False)[:, tokens.shape[1]:]
    assert torch.equal(_ids(res, "steered"), own) and torch.equal(_ids(res, "attn_to_both"), own)
    with steered.disabled():
        own_base = steered.generate(tokens, max_new_tokens=6, do_sample=False)[:, tokens.shape[1]:]
    assert torch.equal(_ids(res, "base"), own_base) and not torch.equal(own, own_base)
    # skip_layer of a vector just before the last block (S - B = v): the base model with v added after it
    v = steered.vectors[HOOK].detach()
    after = sl.SteeredTransformer(model, hooks=["blocks.2.hook_resid_post"])
    after.vectors["blocks.2.hook_resid_post"].data.copy_(v)
    skip = path_variant_accuracy(steered, tokens, _first_token_is(7), variants=["skip_layer"], do_sample=False,
                                 n_samples=1, max_new_tokens=6)
    assert torch.equal(_ids(skip, "skip_layer"), after.generate(tokens, max_new_tokens=6, do_sample=False)[:, 6:])


def test_sampling_is_reproducible_and_shares_draws_across_variants():
    from steer_lens.patching.path_generation import path_variant_accuracy

    _, steered, tokens = _setup()
    kw = dict(variants=["steered", "attn_to_both", "skip_attention"], n_samples=3, max_new_tokens=6, temperature=1.5)
    a = path_variant_accuracy(steered, tokens, _first_token_is(7), seed=11, **kw)
    b = path_variant_accuracy(steered, tokens, _first_token_is(7), seed=11, **kw)
    c = path_variant_accuracy(steered, tokens, _first_token_is(7), seed=12, **kw)
    assert a.completions == b.completions and torch.equal(a.rewards, b.rewards)
    assert a.completions["steered"] != c.completions["steered"]
    # equal logits + shared draws = equal answers; the samples of one prompt differ
    assert a.completions["steered"] == a.completions["attn_to_both"]
    assert len(set(a.completions["steered"][:3])) > 1


def test_accuracy_counts_and_wilson_interval():
    from steer_lens.patching.path_generation import path_variant_accuracy, wilson_interval

    _, steered, tokens = _setup()
    res = path_variant_accuracy(steered, tokens, lambda p, c: torch.tensor([float(int(x.split()[0]) % 2) for x in c]),
                                variants=["base", "steered"], n_samples=4, max_new_tokens=2, seed=0)
    for i, v in enumerate(res.variants):
        firsts = torch.tensor([int(x.split()[0]) % 2 for x in res.completions[v]], dtype=torch.float64)
        k, n = float(firsts.sum()), 12
        assert res.accuracy[i] == k / n and torch.equal(res.per_prompt[i], firsts.view(3, 4).mean(1))
        p, z = k / n, 1.959963984540054
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert math.isclose(res.ci_low[i], max(0.0, centre - half), abs_tol=1e-12)
        assert math.isclose(res.ci_high[i], min(1.0, centre + half), abs_tol=1e-12)
    lo, hi = wilson_interval(torch.tensor([0, 10]), 10)
    assert abs(lo[0]) < 1e-12 and 0.2 < hi[0] < 0.35 and abs(hi[1] - 1) < 1e-12 and 0.65 < lo[1] < 0.8  # 95%: [0, 0.278], [0.722, 1]
    df = res.to_pandas()
    assert list(df.variant) == ["base", "steered"] and {"ci_low", "ci_high", "vs_base", "correct", "n"} <= set(df)
    assert res.plot().data[0].error_y.array is not None and "PathVariantAccuracy" in res._repr_html_()


def test_multi_group_variants_equal_the_papers_group_patch_by_hand():
    """``knockout groups a+b`` / ``only groups a+b`` (group3_and ..., inverse_group7_and1_and ...) == the
    pre-o_proj attention output with the groups' query-head slices taken from the other run."""
    import steer_lens as sl
    from steer_lens.patching.path_generation import group_combinations

    model, steered, tokens = _setup(n_layers=2, n_heads=6, hook="blocks.0.hook_mlp_out", n_key_value_heads=3)
    assert group_combinations((2,), 3) == [(0, 2), (1, 2), (2,)]
    assert group_combinations((2, 0), 3) == [(0, 2), (0, 1, 2), (0, 2)]
    sets = [(0, 2), (0, 1, 2)]
    v = sl.patching.path_patch(steered, tokens, _metric, variants=True, group_sets=sets).variants
    base = float(_metric(model(tokens)))
    z = "blocks.1.attn.hook_z"
    _, cb = model.run_with_cache(tokens, names_filter=[z])
    _, cs = steered.run_with_cache(tokens, names_filter=[z])
    for gs in sets:
        cols = [h for g in gs for h in (2 * g, 2 * g + 1)]  # 2 query heads per key-value head
        knock, only = cs[z].clone(), cb[z].clone()
        knock[:, :, cols], only[:, :, cols] = cb[z][:, :, cols], cs[z][:, :, cols]
        for kind, patched in (("knockout", knock), ("only", only)):
            with model.hooks(fwd_hooks=[(z, lambda act, hook, p=patched: p)]):
                ref = float(_metric(steered(tokens))) - base
            name = f"{kind} groups {'+'.join(map(str, gs))}"
            assert math.isclose(v[name], ref, rel_tol=1e-9, abs_tol=ATOL), (name, v[name], ref)
    assert math.isclose(v["only groups 0+1+2"], v["attn_to_both"], rel_tol=1e-9, abs_tol=ATOL)  # every group
    assert math.isclose(v["knockout groups 0+1+2"], v["skip_attention"], rel_tol=1e-9, abs_tol=ATOL)


def test_errors_before_anything_runs():
    import steer_lens as sl
    from steer_lens.patching.path_generation import group_combinations, path_variant_accuracy

    _, steered, tokens = _setup()
    r = _first_token_is(7)
    for bad in ({"variants": ["nope"]}, {"variants": ["base", "base"]}, {"variants": ["only groups 0+5"]},
                {"n_samples": 0}, {"temperature": 0.0}, {"max_batch": 2}, {"hook": "blocks.2.hook_mlp_out"}):
        with pytest.raises(sl.errors.ConfigError):
            path_variant_accuracy(steered, tokens, r, **bad)
    with pytest.raises(sl.errors.ConfigError):
        group_combinations((3,), 2)
    with pytest.raises(sl.errors.ConfigError):
        sl.patching.path_patch(steered, tokens, _metric, group_sets=[(0, 2)])
    with pytest.raises(sl.errors.SequenceTooLongError):
        path_variant_accuracy(steered, tokens, r, max_new_tokens=40)
    _, last, _ = _setup(hook="blocks.2.hook_mlp_out")
    with pytest.raises(sl.errors.ConfigError, match="no block reads"):
        path_variant_accuracy(last, tokens, r)
