"""vector_logit_lens / direction_lens with mode="cosine" (Sinii et al. 2025's vector logit lens).

The reference is written here independently: ``torch.nn.functional.cosine_similarity(W_U.T, v)`` and
its top-k, and the paper's own formula (normalised unembedding rows times the normalised vector,
``steering_reasoning/metrics/logit_lens.py`` lines 328-331).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _steered(model, scale: float = 1.0, seed: int = 0):
    import steer_lens as sl

    hooks = [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", "blocks.0.hook_resid_pre"]
    g = torch.Generator().manual_seed(seed)
    init = {h: torch.randn(model.cfg.d_model, generator=g) for h in hooks}
    return sl.SteeredTransformer(model, hooks, init=init, scale=scale), init


def test_cosine_ranking_equals_cosine_similarity_topk(tiny_model):
    import steer_lens as sl

    steered, init = _steered(tiny_model, scale=1.7)
    lens = sl.lens.vector_logit_lens(steered, k=10, mode="cosine")
    W_U = tiny_model.W_U.detach().float()
    assert lens.mode == "cosine"
    for h, v in init.items():
        v = v * 1.7
        ref = F.cosine_similarity(W_U.T, v[None], dim=-1)
        ts = lens[h]
        assert ts.unit == "cosine"
        torch.testing.assert_close(ts.scores, ref, atol=1e-5, rtol=1e-5)
        assert ts.top_ids.tolist() == ref.topk(10).indices.tolist()
        assert ts.bottom_ids.tolist() == (-ref).topk(10).indices.tolist()
        torch.testing.assert_close(ts.dot, W_U.T @ v, atol=1e-4, rtol=1e-5)
        # the paper's transcription: (W / |W|) @ (v / |v|) with W the [d_vocab, d_model] unembedding rows
        rows = W_U.T
        paper = (rows / rows.norm(dim=-1, keepdim=True)) @ (v / v.norm())
        torch.testing.assert_close(ts.scores, paper, atol=1e-5, rtol=1e-5)
        assert float(ts.scores.abs().max()) <= 1.0 + 1e-6


def test_cosine_table_has_dot_column(tiny_model):
    import steer_lens as sl

    steered, init = _steered(tiny_model)
    lens = sl.lens.vector_logit_lens(steered, k=5, mode="cosine")
    df = lens.to_pandas()
    assert {"value", "dot", "unit"} <= set(df.columns)
    W_U = tiny_model.W_U.detach().float()
    for _, row in df.iterrows():
        v = init[row["name"]]
        assert row["unit"] == "cosine"
        assert row["dot"] == pytest.approx(float(W_U[:, row["token_id"]] @ v), abs=1e-4)
        assert row["value"] == pytest.approx(float(F.cosine_similarity(W_U[:, row["token_id"]], v, dim=0)),
                                             abs=1e-5)
    assert len(lens.top(3)) == 2 * 2 * 3  # 2 hooks x (top, bottom) x 3
    lens.plot()
    lens._repr_html_()


def test_cosine_is_scale_invariant_and_flips_with_sign(tiny_model):
    import steer_lens as sl

    s1, _ = _steered(tiny_model, scale=1.0)
    s3, _ = _steered(tiny_model, scale=3.0)
    sn, _ = _steered(tiny_model, scale=-2.0)
    a = sl.lens.vector_logit_lens(s1, k=4, mode="cosine")
    b = sl.lens.vector_logit_lens(s3, k=4, mode="cosine")
    c = sl.lens.vector_logit_lens(sn, k=4, mode="cosine")
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.scores, -a.scores, atol=1e-6, rtol=1e-5)
    for h in s1.hook_names:
        assert c[h].top_ids.tolist() == a[h].bottom_ids.tolist()
        torch.testing.assert_close(b[h].dot, 3.0 * a[h].dot, atol=1e-4, rtol=1e-5)


def test_direction_lens_cosine_with_names(tiny_model):
    import steer_lens as sl

    d = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    lens = sl.lens.direction_lens(tiny_model, d, k=3, mode="cosine", names=["a", "b", "c"])
    W_U = tiny_model.W_U.detach().float()
    ref = F.cosine_similarity(W_U.T[None], d[:, None], dim=-1)
    torch.testing.assert_close(lens.scores, ref, atol=1e-5, rtol=1e-5)
    assert [ts.name for ts in lens] == ["a", "b", "c"]


def test_other_modes_unchanged(tiny_model):
    import steer_lens as sl

    steered, init = _steered(tiny_model, scale=0.5)
    raw = sl.lens.vector_logit_lens(steered, k=4, mode="raw")
    W_U = tiny_model.W_U.detach().float()
    for h, v in init.items():
        torch.testing.assert_close(raw[h].scores, (0.5 * v) @ W_U, atol=1e-5, rtol=1e-5)
        assert raw[h].dot is None and raw[h].unit == "logits"
    assert "dot" not in raw.to_pandas().columns


def test_cosine_bad_inputs(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError, ShapeMismatchError

    zero = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"])  # zeros init: no direction
    with pytest.raises(ConfigError, match="zero norm"):
        sl.lens.vector_logit_lens(zero, mode="cosine")
    with pytest.raises(ConfigError, match="zero norm"):
        sl.lens.direction_lens(tiny_model, torch.zeros(tiny_model.cfg.d_model), mode="cosine")
    with pytest.raises(ConfigError, match="mode"):
        sl.lens.vector_logit_lens(zero, mode="cosin")
    with pytest.raises(ConfigError, match="mode"):
        sl.lens.direction_lens(tiny_model, torch.ones(tiny_model.cfg.d_model), mode="effect")
    with pytest.raises(ShapeMismatchError):
        sl.lens.direction_lens(tiny_model, torch.ones(7), mode="cosine")
