"""Analyses: norms/cosines, persistence, combination gain, transfer."""

from __future__ import annotations

import math

import pytest
import torch

import steer_lens as sl
from steer_lens import analysis as A
from steer_lens.errors import ConfigError, HookNameError, IncompatibleVectorError, MetricError
from steer_lens.vectors import GatedVectors

H0, H1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
D = 32


@pytest.fixture(scope="module")
def tiny():
    return sl.random_model("llama", n_layers=3, d_model=D, n_heads=4, d_vocab=50, n_ctx=32, seed=3)


def _steered(model, hooks=(H0, H1)):
    g = torch.Generator().manual_seed(0)
    return sl.SteeredTransformer(model, list(hooks), init={h: torch.randn(D, generator=g) * 2 for h in hooks})


def _patch_tokens(monkeypatch, steered):
    def to_tokens(text, prepend_bos=True):
        ids = [int(t) for t in text.split()]
        return torch.tensor(([1] if prepend_bos else []) + ids)

    monkeypatch.setattr(steered, "to_tokens", to_tokens)


def test_vector_stats(tiny):
    s = _steered(tiny)
    st = A.vector_stats(s)
    v0, v1 = s.vectors[H0].detach(), s.vectors[H1].detach()
    torch.testing.assert_close(st.norms, torch.stack([v0.norm(), v1.norm()]))
    torch.testing.assert_close(st.cosines[0, 1], torch.nn.functional.cosine_similarity(v0, v1, dim=0))
    torch.testing.assert_close(st.cosines.diagonal(), torch.ones(2))
    assert st.resid_norms is None and st.plot() is not None
    assert list(st.to_pandas()["hook"]) == [H0, H1]


def test_only_hooks_matches_a_single_vector_model(tiny):
    s = _steered(tiny)
    single = sl.SteeredTransformer(tiny, [H1], init=s.vectors[H1].detach())
    toks = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with s.only_hooks([H1]):
        torch.testing.assert_close(s(toks), single(toks))
    assert not torch.allclose(s(toks), single(toks))  # restored: both vectors act again
    with pytest.raises(HookNameError):
        with s.only_hooks(["blocks.2.hook_resid_pre"]):
            pass


def test_persistence_closed_form_at_source_and_nan_before(tiny, monkeypatch):
    s = _steered(tiny)
    _patch_tokens(monkeypatch, s)
    p = A.persistence(s, ["5 6 7 8 9", "10 11 12"])
    assert p.points[0] == H0 and p.points[-1] == "blocks.2.hook_resid_post"
    j0, j1 = p.points.index(H0), p.points.index(H1)
    # at the source, Δh = v exactly
    torch.testing.assert_close(p.cos_vector[0, j0], torch.tensor(1.0))
    torch.testing.assert_close(p.cos_mean_shift[1, j1], torch.tensor(1.0))
    torch.testing.assert_close(p.norm_ratio[1, j1], torch.tensor(1.0))
    assert math.isnan(float(p.cos_vector[1, j0]))  # H0 precedes H1's source
    # a later point against a hand computation
    j = p.points.index("blocks.1.hook_resid_post")
    toks = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad(), s.disabled():
        _, base = s.run_with_cache(toks)
    with torch.no_grad(), s.only_hooks([H0]):
        _, st = s.run_with_cache(toks)
    dh = (st["blocks.1.hook_resid_post"] - base["blocks.1.hook_resid_post"])[0, 1:]
    ref = torch.nn.functional.cosine_similarity(dh, s.vectors[H0].detach()[None], dim=-1)
    p1 = A.persistence(s, "5 6 7 8 9", sources=[H0])
    torch.testing.assert_close(p1.cos_vector[0, j], ref.mean(), atol=1e-5, rtol=1e-5)
    assert len(p.to_pandas()) > 0 and p.plot() is not None


def test_pair_gain_closed_form():
    assert A.pair_gain(0.2, 0.4, 0.7, 0.9) == pytest.approx(0.6)
    assert math.isnan(A.pair_gain(0.2, 0.4, 0.5, 0.4))


def test_combination_gain_with_known_accuracies(tiny):
    hooks = [H0, H1, "blocks.2.hook_resid_pre"]
    s = _steered(tiny, hooks)
    weights = {H0: 0.1, H1: 0.2, "blocks.2.hook_resid_pre": 0.4}

    def evaluate(st):  # which vectors are on, seen through the hooks the wrapper installs
        if not st.enabled:
            return 0.0
        on = [h for h, _ in st.fwd_hooks()]
        return sum(weights[h] for h in on) + (0.05 if len(on) == 3 else 0.0)

    g = A.combination_gain(s, evaluate)
    torch.testing.assert_close(g.single, torch.tensor([0.1, 0.2, 0.4]))
    assert g.all == pytest.approx(0.75) and g.base == 0.0
    assert float(g.gain[0, 1]) == pytest.approx((0.3 - 0.2) / (0.75 - 0.2))
    assert float(g.gain[1, 2]) == pytest.approx((0.6 - 0.4) / (0.75 - 0.4))
    assert len(g.to_pandas()) == 3 and g.plot() is not None
    with pytest.raises(ConfigError):
        A.combination_gain(_steered(tiny, [H0]), evaluate)
    with pytest.raises(MetricError):
        A.combination_gain(s, lambda st: float("nan"))


def test_combination_gain_with_a_jointly_trained_reference(tiny):
    # Sinii et al.: singles and pairs from isolated vectors, acc_all from the jointly trained model
    hooks = [H0, H1]
    isolated, joint = _steered(tiny, hooks), _steered(tiny, hooks)
    calls = []

    def evaluate(st):
        calls.append(st)
        if st is joint:
            return 0.9                                       # the joint run is better than any combination
        return 0.0 if not st.enabled else {1: 0.2, 2: 0.5}[len(st.fwd_hooks())]

    g = A.combination_gain(isolated, evaluate, joint=joint)
    assert g.all == 0.9 and sum(c is joint for c in calls) == 1
    assert float(g.gain[0, 1]) == pytest.approx((0.5 - 0.2) / (0.9 - 0.2))      # the paper's formula
    g2 = A.combination_gain(isolated, evaluate, joint=0.8)
    assert g2.all == 0.8 and float(g2.gain[0, 1]) == pytest.approx((0.5 - 0.2) / (0.8 - 0.2))
    n_calls = len(calls)
    for bad in (float("nan"), float("inf")):            # (wrong types are caught by the signature)
        with pytest.raises(ConfigError, match="joint"):
            A.combination_gain(isolated, evaluate, joint=bad)
    assert len(calls) == n_calls                             # refused before any evaluation


def test_transfer_to_model_with_same_width(tiny):
    other = sl.random_model("llama", n_layers=3, d_model=D, n_heads=4, d_vocab=50, n_ctx=32, seed=9)
    s = _steered(tiny, [H1])
    toks = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(2))

    def evaluate(st):
        return float(st(toks)[..., 7].mean().detach())

    t = A.transfer(s, other, evaluate)
    with torch.no_grad():
        ref = sl.SteeredTransformer(other, [H1], init=s.vectors[H1].detach())
        want = float(ref(toks)[..., 7].mean()) - float(other(toks)[..., 7].mean())
    assert t.target_effect == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert t.source_effect != 0 and math.isfinite(t.transfer_ratio)
    assert t.plot() is not None
    narrow = sl.random_model("llama", n_layers=2, d_model=16, n_heads=4, d_vocab=50, n_ctx=32)
    with pytest.raises(IncompatibleVectorError):
        A.transfer(s, narrow, evaluate)


def test_copy_vectors_keeps_kind_and_maps_hooks():
    v = GatedVectors([H1], D, init="random", init_norm=1.0)
    with torch.no_grad():
        next(iter(v.gate_w.values())).normal_()
    c = A.copy_vectors(v, {H1: H0})
    assert isinstance(c, GatedVectors) and c.hook_names == (H0,)
    torch.testing.assert_close(c.direction(H0), v.direction(H1))
    torch.testing.assert_close(c.gate_w[H0.replace(".", "__")], v.gate_w[H1.replace(".", "__")])


def test_gate_values_equal_the_gate_of_the_unsteered_activation(tiny, monkeypatch):
    v = GatedVectors([H0], D, init="random", init_norm=2.0)
    with torch.no_grad():
        next(iter(v.gate_w.values())).normal_()
    s = sl.SteeredTransformer(tiny, [H0], vectors=v)
    _patch_tokens(monkeypatch, s)
    gv = A.gate_values(s, ["5 6 7 8", "9 10"])
    with torch.no_grad(), s.disabled():
        _, cache = s.run_with_cache(torch.tensor([[1, 9, 10]]))
    torch.testing.assert_close(gv.of_text(1), v.gate_of(H0, cache[H0])[0].detach())
    assert gv.str_tokens[1] == ["1", "9", "10"] and torch.isnan(gv.gates[H0][1, 0])
    assert len(gv.top(3)) == 3 and gv.plot().data and gv.token_view() is not None


def test_analysis_results_share_one_protocol(tiny, monkeypatch):
    import pandas as pd

    from steer_lens.results import Result

    s = _steered(tiny)
    _patch_tokens(monkeypatch, s)
    g = A.combination_gain(s, lambda st: len(st.fwd_hooks()) / 2)
    results = [A.vector_stats(s, "5 6 7"), A.persistence(s, "5 6 7"), g]
    for r in results:
        assert isinstance(r, Result) and isinstance(r.top(2), pd.DataFrame) and len(r.top(2)) <= 2
        assert "<table" in r._repr_html_() and r.plot().data
        with pytest.raises(ConfigError, match="per-token"):
            r.token_view()
    with pytest.raises(ConfigError, match="k"):
        g.top(0)


def test_persistence_diff_vector_against_isolated_references(tiny, monkeypatch):
    """Sinii et al.'s Diff-Vector: cos(Δh_p(t), r_p) against the vector trained in isolation for p —
    checked against a hand computation; a reference equal to the source vector reproduces cos_vector."""
    s = _steered(tiny)
    _patch_tokens(monkeypatch, s)
    later = "blocks.1.hook_resid_post"
    r = torch.randn(int(s.cfg.d_model), generator=torch.Generator().manual_seed(4))
    p = A.persistence(s, "5 6 7 8 9", sources=[H0], references={later: r, H0: s.vectors[H0].detach()})
    j, j0 = p.points.index(later), p.points.index(H0)
    toks = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad(), s.disabled():
        _, base = s.run_with_cache(toks)
    with torch.no_grad(), s.only_hooks([H0]):
        _, st = s.run_with_cache(toks)
    dh = (st[later] - base[later])[0, 1:]
    ref = torch.nn.functional.cosine_similarity(dh, r[None], dim=-1).mean()
    torch.testing.assert_close(p.cos_reference[0, j], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.cos_reference[0, j0], p.cos_vector[0, j0])
    others = [k for k, q in enumerate(p.points) if q not in (later, H0)]
    assert torch.isnan(p.cos_reference[0, others]).all()
    assert "cos_reference" in p.to_pandas().columns
    assert A.persistence(s, "5 6 7 8 9", sources=[H0]).cos_reference is None
    with pytest.raises(HookNameError):
        A.persistence(s, "5 6 7 8 9", references={"blocks.0.attn.hook_z": r})
    with pytest.raises(sl.errors.ShapeMismatchError):
        A.persistence(s, "5 6 7 8 9", references={later: torch.ones(3)})
