"""Patching hook names: a full hook name (``get_act_name`` output) means that layer only; the
``get_act_patch_block_every`` equivalent; which hooks of a steering patch see the vector (issue 16,
items 3 and 6)."""

from __future__ import annotations

import warnings

import pytest
import torch

ATOL = 1e-5


def _pair(d_vocab: int, batch: int = 2, pos: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, d_vocab, (batch, pos), generator=g)
    return clean, corrupted


def _get_act_name(kind: str, layer: int | None = None) -> str:
    with warnings.catch_warnings():  # transformer_lens.utils is deprecated in favour of .utilities
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens.utils import get_act_name

    return get_act_name(kind, layer)


@pytest.mark.parametrize(
    "kind,layer,by",
    [
        ("resid_pre", 1, None),
        ("attn_out", 1, None),
        ("z", 0, ("layer", "pos", "head")),
        ("mlp_out", 0, ("layer",)),
    ],
)
def test_full_hook_name_sweeps_that_layer_only(tiny_model, kind, layer, by):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab)
    metric = sl.patching.logit_diff(3, 7)
    name = _get_act_name(kind, layer)
    one = sl.patching.activation_patch(model, clean, corrupted, metric, name, by=by)
    every = sl.patching.activation_patch(model, clean, corrupted, metric, kind, by=by)
    assert one.values.shape == (1, *every.values.shape[1:]), name
    assert one.labels["layer"] == [str(layer)] and one.hook == kind
    torch.testing.assert_close(one.values[0], every.values[layer], atol=ATOL, rtol=0)
    # the same as asking for the kind with layers=[layer], and as that layer's row alone
    also = sl.patching.activation_patch(model, clean, corrupted, metric, name, by=by, layers=[layer])
    torch.testing.assert_close(also.values, one.values, atol=0, rtol=0)


def test_full_hook_name_equals_transformer_lens_row(tiny_model):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=4)
    metric = sl.patching.logprob(5)
    _, cache = model.run_with_cache(clean)
    ref = tlp.get_act_patch_resid_pre(model, corrupted, cache, metric)  # [n_layers, pos]
    for layer in range(model.cfg.n_layers):
        res = sl.patching.activation_patch(model, clean, corrupted, metric, f"blocks.{layer}.hook_resid_pre")
        torch.testing.assert_close(res.values[0], ref[layer].float(), atol=ATOL, rtol=0)


def test_hook_tails_still_mean_every_layer(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab)
    metric = sl.patching.logit_diff(3, 7)
    ref = sl.patching.activation_patch(model, clean, corrupted, metric, "z")
    for name in ("attn.hook_z", "hook_z", _get_act_name("z")):
        res = sl.patching.activation_patch(model, clean, corrupted, metric, name)
        assert res.values.shape[0] == model.cfg.n_layers
        torch.testing.assert_close(res.values, ref.values, atol=0, rtol=0)


def test_bad_full_hook_names_are_refused(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab)
    metric = sl.patching.logit_diff(3, 7)
    with pytest.raises(sl.errors.ConfigError, match="names layer 1 only"):
        sl.patching.activation_patch(model, clean, corrupted, metric, "blocks.1.hook_resid_pre", layers=[0])
    with pytest.raises(sl.errors.ConfigError, match="names layer 9"):
        sl.patching.activation_patch(model, clean, corrupted, metric, "blocks.9.hook_resid_pre")
    for bad in ("blocks.0.hook_nothing", "blocks.0.hook_z", "blocks.x.hook_resid_pre"):
        with pytest.raises(sl.errors.HookNameError, match="get_act_name"):
            sl.patching.activation_patch(model, clean, corrupted, metric, bad)


def test_attribution_and_steering_patch_take_full_hook_names(tiny_model):
    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=2)
    metric = sl.patching.logit_diff(3, 7)
    every = sl.patching.attribution_patch(model, clean, corrupted, metric, "resid_pre")
    one = sl.patching.attribution_patch(model, clean, corrupted, metric, "blocks.1.hook_resid_pre")
    assert one.values.shape[0] == 1
    torch.testing.assert_close(one.values[0], every.values[1], atol=ATOL, rtol=0)
    steered = sl.SteeredTransformer(
        model, hooks=["blocks.1.hook_resid_pre"], init="random", init_norm=2.0, seed=0
    )
    s_every = sl.patching.steering_patch(steered, clean, metric, "resid_post")
    s_one = sl.patching.steering_patch(steered, clean, metric, "blocks.1.hook_resid_post")
    torch.testing.assert_close(s_one.values[0], s_every.values[1], atol=ATOL, rtol=0)


def test_block_every_equals_transformer_lens(tiny_model):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = tiny_model
    clean, corrupted = _pair(model.cfg.d_vocab, seed=3)
    metric = sl.patching.logprob(4)
    _, cache = model.run_with_cache(clean)
    ref = tlp.get_act_patch_block_every(model, corrupted, cache, metric)  # [3, n_layers, pos]
    res = sl.patching.activation_patch_block_every(model, clean, corrupted, metric)
    assert res.values.shape == ref.shape and res.axes == ("hook", "layer", "pos")
    assert res.labels["hook"] == ["resid_pre", "attn_out", "mlp_out"]
    torch.testing.assert_close(res.values, ref.float(), atol=ATOL, rtol=0)
    assert res.values.std() > 0
    res.plot(), res.to_pandas(), res.top(3)  # the stacked result works with the views
    with pytest.raises(sl.errors.ConfigError, match="one shape"):
        sl.patching.activation_patch_block_every(model, clean, corrupted, metric, hooks=("resid_pre", "z"))


@pytest.mark.real_model
def test_block_every_equals_transformer_lens_on_the_real_model(real_model, stories):
    from transformer_lens import patching as tlp

    import steer_lens as sl

    model = real_model
    clean = model.to_tokens(stories[0])[:, :8]
    corrupted = model.to_tokens(stories[1])[:, :8]
    target = int(clean[0, -1])
    metric = sl.patching.logprob(target)
    _, cache = model.run_with_cache(clean)
    ref = tlp.get_act_patch_block_every(model, corrupted, cache, metric)
    res = sl.patching.activation_patch_block_every(model, clean, corrupted, metric)
    torch.testing.assert_close(res.values, ref.float(), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# steering patch: which hooks see the vector (issue 16, item 3)
# ---------------------------------------------------------------------------------------------------
def test_steering_patch_reports_the_hooks_before_the_vector(tiny_model):
    """``blocks.0.hook_resid_post`` fires before ``blocks.1.hook_resid_pre`` adds the vector: the same
    tensor unhooked, but the earlier hook never sees the vector, so layer 0's row is the baseline."""
    import steer_lens as sl

    model = tiny_model
    vec_hook = "blocks.1.hook_resid_pre"
    steered = sl.SteeredTransformer(model, hooks=[vec_hook], init="random", init_norm=2.0, seed=0)
    tokens, _ = _pair(model.cfg.d_vocab, seed=8)
    metric = sl.patching.logprob(3)
    post = sl.patching.steering_patch(steered, tokens, metric, "resid_post", by=("layer",))
    assert post.vector_hooks == (vec_hook,) and post.before_vector == (0,)
    assert abs(float(post.values[0]) - post.corrupted_metric) < ATOL  # layer 0: steered == base there
    assert abs(float(post.values[1]) - post.clean_metric) < ATOL  # layer 1: the whole steered residual
    assert "before the vector" in repr(post) and vec_hook in repr(post)
    pre = sl.patching.steering_patch(steered, tokens, metric, "resid_pre", by=("layer",))
    assert pre.before_vector == (0,)  # the vector's own hook sees it (the patch runs after the vector)
    assert abs(float(pre.values[1]) - pre.clean_metric) < ATOL
    # what an unhooked forward pass carries is the same at both hooks: the docs' claim, made precise
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache[vec_hook], atol=0, rtol=0)
    # a vector at resid_post of layer 0 is seen by every later hook, resid_pre of layer 1 included
    steered0 = sl.SteeredTransformer(
        model, hooks=["blocks.0.hook_resid_post"], init=steered.vectors[vec_hook].detach()
    )
    pre0 = sl.patching.steering_patch(steered0, tokens, metric, "resid_pre", by=("layer",))
    assert pre0.before_vector == (0,) and abs(float(pre0.values[1]) - pre0.clean_metric) < ATOL
    torch.testing.assert_close(
        torch.tensor(pre0.clean_metric), torch.tensor(pre.clean_metric), atol=ATOL, rtol=0
    )
    # activation patching has no vector sites
    plain = sl.patching.activation_patch(
        model, tokens, _pair(model.cfg.d_vocab, seed=9)[0], metric, "resid_post"
    )
    assert plain.vector_hooks == () and plain.before_vector == ()


def test_steering_patch_does_not_run_the_layers_before_the_vector(tiny_model, monkeypatch):
    """The layers whose hook fires before every vector hook carry equal steered and base activations:
    they are not swept, their values are the baseline exactly, and TransformerLens (which runs them) and
    ``strategy="full"`` (which runs them too) agree with the whole result."""
    from transformer_lens import patching as tlp

    import steer_lens as sl
    from steer_lens.patching import activation as act

    model = tiny_model
    vec_hook = "blocks.1.hook_resid_pre"
    steered = sl.SteeredTransformer(model, hooks=[vec_hook], init="random", init_norm=2.0, seed=0)
    tokens, _ = _pair(model.cfg.d_vocab, seed=8)
    metric = sl.patching.logit_diff(torch.tensor([3, 5]), torch.tensor([7, 9]))
    swept: list[tuple[int, ...]] = []
    inner = act._sweep

    def recording(model, plan, *args, **kwargs):
        swept.append(plan.layers)
        return inner(model, plan, *args, **kwargs)

    monkeypatch.setattr(act, "_sweep", recording)
    _, steered_cache = steered.run_with_cache(tokens)
    ref = tlp.generic_activation_patch(
        model, tokens, steered_cache, metric, tlp.layer_pos_patch_setter, "resid_post", ("layer", "pos")
    )
    den = sl.patching.steering_patch(steered, tokens, metric, "resid_post")
    assert swept == [(1,)] and den.before_vector == (0,)
    assert torch.equal(den.values[0], torch.full_like(den.values[0], den.corrupted_metric))
    torch.testing.assert_close(den.values, ref, atol=ATOL, rtol=0)
    swept.clear()
    full = sl.patching.steering_patch(steered, tokens, metric, "resid_post", strategy="full")
    assert swept == [(0, 1)]
    torch.testing.assert_close(full.values, den.values, atol=ATOL, rtol=0)
    # a vector in block 0: nothing comes before it, every layer is swept
    swept.clear()
    first = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=2.0, seed=0)
    sl.patching.steering_patch(first, tokens, metric, "resid_post", mode="noise")
    assert swept == [(0, 1)]
