"""Low-rank shared vectors and token-wise gated vectors: values, training, save/load."""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl
from steer_lens.analysis import gate_values
from steer_lens.errors import ConfigError, IncompatibleVectorError
from steer_lens.vectors import GatedVectors, LowRankVectors, vector_kinds

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
D = 32


@pytest.fixture(scope="module")
def tiny():
    return sl.random_model("llama", n_layers=2, d_model=D, n_heads=4, d_vocab=50, n_ctx=32, seed=2)


def _tokens():
    return torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def test_kinds_registered():
    kinds = vector_kinds()
    assert kinds["lowrank"] is LowRankVectors and kinds["gated"] is GatedVectors


def test_lowrank_is_a_times_b_and_starts_at_zero():
    v = LowRankVectors(HOOKS, D, rank=3, seed=0)
    for h in HOOKS:
        assert torch.equal(v.direction(h), torch.zeros(D))
    torch.testing.assert_close(v.basis @ v.basis.T, torch.eye(3), atol=1e-5, rtol=0)
    with torch.no_grad():
        v.coef[HOOKS[0].replace(".", "__")].copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(v.direction(HOOKS[0]), torch.tensor([1.0, 2.0, 3.0]) @ v.basis)
    # both factors get gradients once A != 0
    v.direction(HOOKS[0]).sum().backward()
    assert v.basis.grad is not None and v.basis.grad.abs().sum() > 0


def test_lowrank_init_from_vectors_exact_when_rank_suffices():
    g = torch.Generator().manual_seed(1)
    init = {h: torch.randn(D, generator=g) for h in HOOKS}
    v = LowRankVectors(HOOKS, D, rank=2, init=init)
    for h in HOOKS:
        torch.testing.assert_close(v.direction(h), init[h], atol=1e-5, rtol=1e-5)
    v1 = LowRankVectors(HOOKS, D, rank=1, init=init)  # best rank-1 approximation
    resid = torch.stack([v1.direction(h) - init[h] for h in HOOKS])
    s = torch.linalg.svdvals(torch.stack([init[h] for h in HOOKS]))
    torch.testing.assert_close(resid.norm(), s[1], rtol=1e-4, atol=1e-5)
    with pytest.raises((ConfigError, TypeError)):
        LowRankVectors(HOOKS, D, rank=0)
    with pytest.raises(ConfigError):
        LowRankVectors(HOOKS, D, init="random")


def test_lowrank_set_and_clamp():
    v = LowRankVectors(HOOKS, D, rank=D)
    target = torch.randn(D)
    v.set_(HOOKS[1], target)
    torch.testing.assert_close(v.direction(HOOKS[1]), target, atol=1e-4, rtol=1e-4)
    v.clamp_norm_(1.0)
    assert float(v.direction(HOOKS[1]).detach().norm()) <= 1.0 + 1e-5
    assert v.norms()[HOOKS[0]] == 0.0


def test_lowrank_lr_groups_cover_all_parameters():
    v = LowRankVectors(HOOKS, D, rank=4)
    groups = v.lr_groups({h: 2.0 for h in HOOKS})
    params = [p for ps, _ in groups for p in ps]
    assert {id(p) for p in params} == {id(p) for p in v.parameters()}
    assert groups[0][1] == pytest.approx(2.0 * (D / 4) ** 0.5)


def test_gated_starts_as_plain_vector(tiny):
    init = {h: torch.randn(D) for h in HOOKS}
    plain = sl.SteeredTransformer(tiny, HOOKS, init=init)
    gated = sl.SteeredTransformer(tiny, HOOKS, vectors=GatedVectors(HOOKS, D, init=init))
    toks = _tokens()
    torch.testing.assert_close(gated(toks), plain(toks), atol=1e-5, rtol=1e-5)
    linear = sl.SteeredTransformer(tiny, HOOKS, vectors=GatedVectors(HOOKS, D, init=init, gate="linear"))
    torch.testing.assert_close(linear(toks), plain(toks), atol=1e-5, rtol=1e-5)


def test_gate_value_formula_and_gradients(tiny):
    vec = GatedVectors(HOOKS[:1], D, init=torch.ones(D))
    w = torch.randn(D)
    with torch.no_grad():
        vec.gate_w[HOOKS[0].replace(".", "__")].copy_(w)
        vec.gate_b[HOOKS[0].replace(".", "__")].fill_(0.3)
    act = torch.randn(2, 5, D) * 7
    u = act / act.norm(dim=-1, keepdim=True)
    expected = 2 * torch.sigmoid(u @ w + 0.3)
    torch.testing.assert_close(vec.gate_of(HOOKS[0], act), expected)
    torch.testing.assert_close(vec.delta(HOOKS[0], act), expected[..., None] * torch.ones(D))
    steered = sl.SteeredTransformer(tiny, HOOKS[:1], vectors=vec)
    steered(_tokens(), grad=True).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vec.parameters())


def test_gate_values_records_per_token(tiny):
    with pytest.raises(IncompatibleVectorError):
        gate_values(sl.SteeredTransformer(tiny, HOOKS), "x")


@pytest.mark.parametrize("kind", ["lowrank", "gated"])
def test_save_load_roundtrip(tiny, tmp_path, kind):
    if kind == "lowrank":
        vec = LowRankVectors(HOOKS, D, rank=2, init={h: torch.randn(D) for h in HOOKS})
    else:
        vec = GatedVectors(HOOKS, D, init="random", init_norm=2.0)
        with torch.no_grad():
            for p in vec.gate_w.values():
                p.normal_()
    steered = sl.SteeredTransformer(tiny, HOOKS, vectors=vec)
    toks = _tokens()
    before = steered(toks)
    steered.save(tmp_path / "v")
    loaded = sl.SteeredTransformer.load(tmp_path / "v", tiny)
    assert type(loaded.vectors) is type(vec)
    torch.testing.assert_close(loaded(toks), before)


@pytest.mark.parametrize("kind", ["lowrank", "gated"])
def test_sft_trains_both_kinds(tiny, kind):
    vec = LowRankVectors(HOOKS, D, rank=2) if kind == "lowrank" else GatedVectors(HOOKS, D)
    steered = sl.SteeredTransformer(tiny, HOOKS, vectors=vec)
    toks = _tokens()
    with torch.no_grad():
        base = steered(toks)[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None]).mean()
    # SFT on token ids: use the low-level loss as sft() needs a tokenizer
    opt = torch.optim.Adam([p for ps, _ in vec.lr_groups(None) for p in ps], lr=0.05)
    for _ in range(15):
        opt.zero_grad()
        loss = -steered(toks, grad=True)[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None]).mean()
        loss.backward()
        opt.step()
    assert -float(loss.detach()) > float(base) + 0.1


def test_rl_trains_gated_and_lowrank(tiny):
    from steer_lens.train.rl import RLConfig, rl

    def reward(prompts, completions):
        return torch.tensor([float(c.count("7")) for c in completions])

    for vec in (GatedVectors(HOOKS, D), LowRankVectors(HOOKS, D, rank=2)):
        steered = sl.SteeredTransformer(tiny, HOOKS, vectors=vec)
        res = rl(steered, torch.tensor([[1, 5, 9]]), reward,
                 RLConfig(steps=2, group_size=2, prompts_per_step=1, max_new_tokens=3, progress=False))
        assert torch.isfinite(res.metrics["loss"]).all()
        assert any(n > 0 for n in vec.norms().values())


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["lowrank", "gated"])
def test_library_sft_trains_both_kinds_on_real_model(real_model, kind, tmp_path):
    from steer_lens.train import SFTConfig, sft

    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    d = int(real_model.cfg.d_model)
    vec = LowRankVectors(hooks, d, rank=2) if kind == "lowrank" else GatedVectors(hooks, d)
    steered = sl.SteeredTransformer(real_model, hooks, vectors=vec)
    examples = [("Once upon a time", " there was a dog. The dog was happy.")] * 4
    res = sft(steered, examples, SFTConfig(steps=15, batch_size=4, progress=False, lr=0.05))
    assert float(res.losses[-1]) < float(res.losses[0]) - 0.2
    steered.save(tmp_path / "v")
    loaded = sl.SteeredTransformer.load(tmp_path / "v", real_model)
    toks = steered.to_tokens("Once upon a time there was")[None]
    torch.testing.assert_close(loaded(toks), steered(toks))
