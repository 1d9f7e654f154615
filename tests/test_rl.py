"""RL of steering vectors: advantages, the policy-gradient loss and its masks, KL, and rl() end to end."""

from __future__ import annotations

import math

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import ConfigError, RewardError
from steer_lens.train.rl import (
    RLConfig,
    completion_logprobs,
    grpo_advantages,
    k3_kl,
    policy_loss,
    reinforce_advantages,
    rl,
    rloo_advantages,
)

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    return sl.random_model(request.param, n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=32, seed=1)


@pytest.fixture(scope="module")
def tiny_llama():
    return sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=32, seed=1)


def _batch(seed: int = 0):
    """Left-padded prompts of different lengths + completions ending at different places."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 3, 4]
    comp_lens = [6, 2, 4]  # generated tokens kept (incl. EOS); the rest is post-EOS padding
    P, T = max(prompt_lens), 6
    tokens = torch.zeros(3, P + T, dtype=torch.long)
    attn = torch.zeros(3, P + T, dtype=torch.long)
    cmask = torch.zeros(3, T, dtype=torch.bool)
    for i, (pl, cl) in enumerate(zip(prompt_lens, comp_lens, strict=True)):
        tokens[i, P - pl : P] = torch.randint(3, 50, (pl,), generator=g)
        tokens[i, P : P + cl] = torch.randint(3, 50, (cl,), generator=g)
        attn[i, P - pl : P + cl] = 1
        cmask[i, :cl] = True
    return tokens, attn, cmask, P, prompt_lens, comp_lens


# -- advantages ---------------------------------------------------------------------------------
def test_rloo_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = rloo_advantages(r)
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(a, expected)
    # A_i = r_i - mean of the others, element by element
    r = torch.tensor([[0.3, -1.0, 2.5]])
    torch.testing.assert_close(a := rloo_advantages(r), torch.tensor([[0.3 - 0.75, -1.0 - 1.4, 2.5 - (-0.35)]]))
    assert abs(float(a.sum())) < 1e-6


def test_grpo_advantages_hand_values_and_zero_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
    a = grpo_advantages(r)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # std 0: exactly zero, no NaN
    with pytest.raises(ConfigError):
        grpo_advantages(torch.ones(2, 1))
    with pytest.raises(ConfigError):
        rloo_advantages(torch.ones(2, 1))


def test_reinforce_baseline():
    a, b = reinforce_advantages(torch.tensor([1.0, 3.0]), None, decay=0.5)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0]))  # first baseline = batch mean 2
    torch.testing.assert_close(b, torch.tensor(2.0))
    a, b = reinforce_advantages(torch.tensor([4.0, 4.0]), b, decay=0.5)
    torch.testing.assert_close(a, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(b, torch.tensor(3.0))


# -- the loss -----------------------------------------------------------------------------------
def _loss_and_grad(steered, tokens, attn, cmask, P, adv, **kw):
    steered.vectors[HOOK].grad = None
    logp, ent = completion_logprobs(steered, tokens, attn, P)
    loss, metrics = policy_loss(logp, adv, cmask, entropy=ent, **kw)
    loss.backward()
    return loss.detach(), steered.vectors[HOOK].grad.clone(), metrics


def test_gradient_equals_hand_reinforce_estimate(tiny):
    """grad L = -(1/N) sum_i A_i sum_t grad log p(y_it), each sequence run alone without padding."""
    steered = sl.SteeredTransformer(tiny, [HOOK], init="random", init_norm=3.0, seed=0)
    tokens, attn, cmask, P, pls, cls = _batch()
    adv = torch.tensor([0.7, -1.3, 0.4])
    _, grad, _ = _loss_and_grad(steered, tokens, attn, cmask, P, adv)

    n = sum(cls)
    ref = torch.zeros(32)
    for i, (pl, cl) in enumerate(zip(pls, cls, strict=True)):
        seq = tokens[i, P - pl : P + cl][None]
        v = steered.vectors[HOOK]
        v.grad = None
        logits = steered(seq, grad=True)
        lp = logits[0, pl - 1 : -1].log_softmax(-1).gather(-1, seq[0, pl:, None]).sum()
        lp.backward()
        ref += -adv[i] * v.grad / n
    torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)


def test_zero_advantages_give_zero_gradient(tiny_llama):
    steered = sl.SteeredTransformer(tiny_llama, [HOOK], init="random", init_norm=3.0)
    tokens, attn, cmask, P, *_ = _batch()
    loss, grad, _ = _loss_and_grad(steered, tokens, attn, cmask, P, torch.zeros(3))
    assert float(loss) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_masked_tokens_change_nothing(tiny):
    """Left padding and post-EOS tokens may hold anything: loss and gradient stay identical."""
    steered = sl.SteeredTransformer(tiny, [HOOK], init="random", init_norm=3.0)
    tokens, attn, cmask, P, *_ = _batch()
    adv = torch.tensor([1.0, -0.5, 0.25])
    loss0, grad0, _ = _loss_and_grad(steered, tokens, attn, cmask, P, adv)
    full = torch.cat([attn[:, :P].bool(), cmask], 1)
    perturbed = torch.where(full, tokens, torch.randint(3, 50, tokens.shape, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(perturbed, tokens)
    loss1, grad1, _ = _loss_and_grad(steered, perturbed, attn, cmask, P, adv)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad1, grad0, atol=1e-6, rtol=1e-5)
    # ...while the prompt tokens do matter (they condition the completion) but are never targets:
    logp, _ = completion_logprobs(steered, tokens, attn, P)
    assert logp.shape == cmask.shape


@pytest.mark.parametrize("hooks", [[HOOK], [HOOK, "ln_final.hook_normalized"]])
def test_completion_logprobs_equal_full_logits(tiny, hooks):
    """The scored positions' log-probs equal log_softmax of the whole forward's logits (read at
    ``prompt_len - 1 .. -2``), with the unembedding run on those positions alone (vectors in the blocks)
    and with the whole forward (a vector at the final norm, which that shortcut would skip)."""
    steered = sl.SteeredTransformer(tiny, hooks, init="random", init_norm=3.0, seed=4)
    tokens, attn, cmask, P, *_ = _batch(seed=3)
    flags = [p.requires_grad for p in tiny.parameters()]
    tiny.requires_grad_(True)  # a user's model whose weights require grad (TransformerLens's default)
    try:
        logp, ent = completion_logprobs(steered, tokens, attn, P)
        (logp[cmask].sum() + ent[cmask].sum()).backward()
        assert all(p.grad is None for p in tiny.parameters())  # gradients reach the vectors only
        assert all(steered.vectors[h].grad is not None for h in hooks)
    finally:
        for p, f in zip(tiny.parameters(), flags, strict=True):
            p.requires_grad_(f)
    full = steered(tokens, attention_mask=attn, prompt_lengths=torch.full((3,), P))[:, P - 1 : -1].log_softmax(-1)
    ref = full.gather(-1, tokens[:, P:, None])[..., 0]
    torch.testing.assert_close(logp[cmask], ref[cmask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[cmask], -(full.exp() * full).sum(-1)[cmask], atol=1e-5, rtol=1e-5)
    from steer_lens.train.scored import unembeds_apart

    assert unembeds_apart(steered) == (len(hooks) == 1)


def _groups(device, seed: int = 3, d_vocab: int = 50):
    """3 left-padded prompts (lengths 5, 3, 4) x 3 samples, completions of 1..6 tokens, then padding."""
    g = torch.Generator().manual_seed(seed)
    P, T = 5, 6
    toks = torch.zeros(9, P + T, dtype=torch.long)
    attn = torch.zeros_like(toks)
    for i, pl in enumerate([5, 3, 4]):
        prompt = torch.randint(3, d_vocab, (pl,), generator=g)
        for j in range(3):
            r, cl = 3 * i + j, int(torch.randint(1, T + 1, (1,), generator=g))
            toks[r, P - pl : P] = prompt
            toks[r, P : P + cl] = torch.randint(3, d_vocab, (cl,), generator=g)
            attn[r, P - pl : P + cl] = 1
    return toks.to(device), attn.to(device), P


@pytest.mark.parametrize("setup", ["plain", "generated", "prompt", "gated"])
def test_shared_prompts_give_the_full_forwards_logprobs_and_gradients(tiny_model, setup):
    """Groups of rows with one prompt (RL's samples): each distinct prompt runs once, the completions on
    its cached keys and values (`share_prompts=True`); log-probs, entropies and the vectors' gradients
    equal the full forward's (`share_prompts=False`), for position masks that depend on where the
    prompt ends and for a kind that reads the pass's tokens; the prompt pass sees 3 rows, not 9."""
    from steer_lens.vectors import GatedVectors

    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    kw = {"generated": dict(positions="generated"), "prompt": dict(positions="prompt")}.get(setup, {})
    if setup == "gated":
        vec = GatedVectors(hooks, int(tiny_model.cfg.d_model), init="random", init_norm=2.0)
        with torch.no_grad():
            for p in vec.gate_w.values():
                p.normal_()
        kw = dict(vectors=vec)
    else:
        kw.update(init="random", init_norm=3.0, seed=4)
    steered = sl.SteeredTransformer(tiny_model, hooks, **kw)
    tokens, attn, P = _groups(steered.device, d_vocab=int(tiny_model.cfg.d_vocab))
    cmask = attn[:, P:].bool()
    seen: list[tuple[int, ...]] = []
    out = {}
    for share in (True, False):
        seen.clear()
        with tiny_model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: seen.append(tuple(a.shape[:2])))]):
            logp, ent = completion_logprobs(steered, tokens, attn, P, share_prompts=share)
        (logp[cmask].sum() + 0.1 * ent[cmask].sum()).backward()
        out[share] = (logp.detach(), ent.detach(), [v.grad.clone() for v in steered.vectors.parameters()])
        steered.vectors.zero_grad(set_to_none=True)
        assert seen == ([(3, P), (9, 5)] if share else [(9, P + 6)])  # 3 distinct prompts, then 9 x (6 - 1)
    (lp, en, gr), (lp0, en0, gr0) = out[True], out[False]
    torch.testing.assert_close(lp[cmask], lp0[cmask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(en[cmask], en0[cmask], atol=1e-5, rtol=1e-5)
    assert all(g0.abs().max() > 0 for g0 in gr0)
    for g, g0 in zip(gr, gr0, strict=True):
        torch.testing.assert_close(g, g0, atol=1e-5, rtol=1e-4)


def test_shared_prompts_fall_back_to_the_full_forward(tiny_llama):
    """Nothing shared, an explicit position mask (rows of the full batch) or a vector at the final norm:
    `shared_prompt_logits` returns None and `completion_logprobs` runs the full forward."""
    from steer_lens.train.scored import shared_prompt_logits

    tokens, attn, P = _groups("cpu")
    steered = sl.SteeredTransformer(tiny_llama, [HOOK], init="random", init_norm=3.0, seed=4)
    assert shared_prompt_logits(steered, tokens, attn, P) is not None
    assert shared_prompt_logits(steered, tokens[::3], attn[::3], P) is None  # one row per prompt
    mask = torch.zeros(tokens.shape[1], dtype=torch.bool)
    mask[P:] = True
    assert shared_prompt_logits(sl.SteeredTransformer(tiny_llama, [HOOK], positions=mask), tokens, attn, P) is None
    final = sl.SteeredTransformer(tiny_llama, [HOOK, "ln_final.hook_normalized"], init="random", init_norm=3.0)
    assert shared_prompt_logits(final, tokens, attn, P) is None
    full = final(tokens, attention_mask=attn, prompt_lengths=torch.full((9,), P))[:, P - 1 : -1].log_softmax(-1)
    logp, _ = completion_logprobs(final, tokens, attn, P)
    torch.testing.assert_close(logp, full.gather(-1, tokens[:, P:, None])[..., 0], atol=1e-5, rtol=1e-5)


def test_kl_estimator_nonnegative_and_zero_for_zero_vector(tiny_llama):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(1000))
    tokens, attn, cmask, P, *_ = _batch()
    steered = sl.SteeredTransformer(tiny_llama, [HOOK])  # zero vector
    logp, _ = completion_logprobs(steered, tokens, attn, P)
    with torch.no_grad(), steered.disabled():
        ref, _ = completion_logprobs(steered, tokens, attn, P, with_entropy=False)
    _, m = policy_loss(logp, torch.ones(3), cmask, ref_logp=ref)
    assert float(m["kl"]) == 0.0
    steered.vectors.set_(HOOK, torch.randn(32) * 5)
    logp, _ = completion_logprobs(steered, tokens, attn, P)
    _, m = policy_loss(logp, torch.ones(3), cmask, ref_logp=ref)
    assert float(m["kl"]) > 0


def test_kl_and_entropy_terms_enter_the_loss(tiny_llama):
    steered = sl.SteeredTransformer(tiny_llama, [HOOK], init="random", init_norm=3.0)
    tokens, attn, cmask, P, *_ = _batch()
    logp, ent = completion_logprobs(steered, tokens, attn, P)
    ref = logp.detach() - 0.1
    adv = torch.zeros(3)
    loss, m = policy_loss(logp, adv, cmask, ref_logp=ref, entropy=ent, kl_coef=2.0, entropy_coef=0.5)
    torch.testing.assert_close(loss, 2.0 * m["kl"] - 0.5 * m["entropy"])
    torch.testing.assert_close(m["kl"], torch.tensor(math.exp(-0.1) - 1 + 0.1), rtol=1e-4, atol=1e-6)


def test_ppo_ratio_clipping(tiny_llama):
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.25, 0.5]]))  # ratio 2 at t=0 (clipped for A > 0), 1 at t=1
    loss, m = policy_loss(logp, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), old_logp=old)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5]]))  # clipped token: no gradient
    torch.testing.assert_close(m["clip_frac"], torch.tensor(0.5))


# -- rl() end to end on a tiny model ----------------------------------------------------------
def _reward_has_7(prompts, completions):
    return torch.tensor([float(" 7 " in f" {c} ") for c in completions])


def _cfg(**kw):
    base = dict(steps=3, group_size=2, prompts_per_step=2, max_new_tokens=4, progress=False, lr=0.1)
    base.update(kw)
    return RLConfig(**base)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "reinforce"])
def test_rl_runs_and_is_reproducible(tiny_llama, algorithm):
    prompts = torch.tensor([[1, 5, 9], [1, 6, 8], [1, 7, 7]])
    out = []
    for _ in range(2):
        steered = sl.SteeredTransformer(tiny_llama, [HOOK])
        res = rl(steered, prompts, _reward_has_7, _cfg(algorithm=algorithm))
        out.append((steered.vectors[HOOK].detach().clone(), res))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    res = out[0][1]
    for k in ("loss", "reward", "kl", "entropy", "tokens_per_s", "grad_norm", f"norm/{HOOK}"):
        assert res.metrics[k].shape == (3,)
    assert res.metrics["kl"][0] == 0  # zero vector at the first step
    assert len(res.last_completions) == 4
    assert res.plot() is not None


def test_rl_ppo_epochs_reuse_rollouts(tiny_llama):
    steered = sl.SteeredTransformer(tiny_llama, [HOOK])
    res = rl(steered, torch.tensor([[1, 5, 9]]), _reward_has_7, _cfg(ppo_epochs=2, steps=4))
    r = res.metrics["reward"]
    assert r[0] == r[1] and r[2] == r[3]  # two steps per batch of rollouts
    assert res.metrics["clip_frac"][0] == 0  # first epoch: on-policy, ratio 1


def test_rl_resume_matches_uninterrupted(tiny_llama, tmp_path):
    prompts = torch.tensor([[1, 5, 9], [1, 6, 8]])
    a = sl.SteeredTransformer(tiny_llama, [HOOK])
    rl(a, prompts, _reward_has_7, _cfg(steps=4))
    b = sl.SteeredTransformer(tiny_llama, [HOOK])
    ck = str(tmp_path / "ck")
    rl(b, prompts, _reward_has_7, _cfg(steps=2, checkpoint_dir=ck, checkpoint_every=1))
    c = sl.SteeredTransformer(tiny_llama, [HOOK])
    rl(c, prompts, _reward_has_7, _cfg(steps=4, checkpoint_dir=ck, checkpoint_every=1, resume=True))
    torch.testing.assert_close(c.vectors[HOOK], a.vectors[HOOK], rtol=1e-6, atol=1e-7)


def test_rl_heldout_loss_metric(tiny_llama):
    # texts for a tokenizer-less model are not possible; heldout is covered on the real model.
    steered = sl.SteeredTransformer(tiny_llama, [HOOK])
    res = rl(steered, torch.tensor([[1, 5, 9]]), _reward_has_7, _cfg(steps=2))
    assert "heldout_loss" not in res.metrics


def test_rl_reward_errors_surface(tiny_llama):
    steered = sl.SteeredTransformer(tiny_llama, [HOOK])
    before = steered.vectors[HOOK].detach().clone()

    def bad(prompts, completions):
        return torch.full((len(completions),), float("nan"))

    with pytest.raises(RewardError, match="bad"):
        rl(steered, torch.tensor([[1, 5, 9]]), bad, _cfg())
    assert torch.equal(steered.vectors[HOOK].detach(), before)


def test_rl_config_validation():
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(group_size=1)
    RLConfig(group_size=1, algorithm="reinforce")
    with pytest.raises((ConfigError, TypeError)):  # TypeError: jaxtyping/beartype at test time
        RLConfig(algorithm="ppo")
    with pytest.raises(ConfigError, match="kl_coef"):
        RLConfig(kl_coef=-1.0)
    with pytest.raises(ConfigError, match="heldout_texts"):
        RLConfig(heldout_texts="one text")
    assert RLConfig(heldout_texts=["a", "b"]).to_dict()["heldout_texts"] == 2


# -- a newly registered advantage estimator -----------------------------------------------------
@pytest.fixture
def loo_std():
    """The docs' example estimator (docs/rl.md, "Adding an advantage estimator"), registered for one test."""
    from steer_lens.train.rl import register_advantage, unregister_advantage

    calls = []

    @register_advantage("loo_std", min_group_size=3)
    def leave_one_out_std(rewards):
        """leave-one-out baseline over the group's std"""
        k = rewards.shape[-1]
        others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
        adv = (rewards - others) / (rewards.std(-1, keepdim=True) + 1e-4)
        calls.append((rewards.clone(), adv.clone()))
        return adv

    yield calls
    unregister_advantage("loo_std")


def test_registered_estimator_is_used_by_rl_and_matches_its_formula(tiny_llama, loo_std, monkeypatch):
    import importlib

    from steer_lens.cli import build_parser
    from steer_lens.train.rl import advantage_names

    trainer = importlib.import_module("steer_lens.train.rl.trainer")  # sl.train.rl is the function
    seen = []
    real_loss = trainer.policy_loss

    def recording_loss(logp, advantages, mask, **kw):
        seen.append(advantages.detach().clone())
        return real_loss(logp, advantages, mask, **kw)

    monkeypatch.setattr(trainer, "policy_loss", recording_loss)
    prompts = torch.tensor([[1, 5, 9], [1, 6, 8], [1, 7, 7]])
    steered = sl.SteeredTransformer(tiny_llama, [HOOK])

    def reward(prompts, completions):  # distinct rewards so that the std is not 0
        return torch.tensor([float(len(c)) + 0.1 * i for i, c in enumerate(completions)])

    res = sl.train.rl(steered, prompts, reward, _cfg(algorithm="loo_std", group_size=3, steps=4, ppo_epochs=2))
    assert len(loo_std) == 2  # once per batch of rollouts (4 steps, 2 epochs each)
    for r, (rewards, adv) in enumerate(loo_std):
        k = rewards.shape[1]
        for g in range(rewards.shape[0]):
            row = rewards[g].tolist()
            mean = sum(row) / k
            std = math.sqrt(sum((x - mean) ** 2 for x in row) / (k - 1))
            for i in range(k):
                others = (sum(row) - row[i]) / (k - 1)
                assert float(adv[g, i]) == pytest.approx((row[i] - others) / (std + 1e-4), rel=1e-5, abs=1e-6)
        # the loss of both steps on this batch got exactly these advantages, flattened in row order
        for step in (2 * r, 2 * r + 1):
            assert torch.equal(seen[step], adv.reshape(-1))
        torch.testing.assert_close(res.metrics["reward"][2 * r], rewards.mean())
    assert "loo_std" in advantage_names()
    args = build_parser().parse_args(["train", "rl", "--algorithm", "loo_std", "--reward", "contains:dog", "--out", "x"])
    assert args.algorithm == "loo_std"
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(algorithm="loo_std", group_size=2)


def test_register_advantage_rejects_a_taken_name_and_unknown_algorithms():
    from steer_lens.train.rl import advantage_names, get_advantage, register_advantage

    assert advantage_names()[:3] == ["rloo", "grpo", "reinforce"]
    assert get_advantage("reinforce").min_group_size == 1
    with pytest.raises(ConfigError, match="already registered"):
        register_advantage("rloo")(lambda rewards: rewards)
    with pytest.raises(ConfigError, match="rloo"):
        get_advantage("ppo")


def test_tempered_rloo_loss_equals_sinii_formula(tiny_llama):
    """Sinii et al. 2025: A = r - mean(others), L = -sum_i A_i sum_t log softmax(logits / T)[y_it] / N.

    The on-policy surrogate has this gradient (its value uses the ratio, 1), so gradients are compared.
    """
    T = 0.7
    steered = sl.SteeredTransformer(tiny_llama, [HOOK], init="random", init_norm=2.0, seed=1)
    v = steered.vectors[HOOK]
    tokens, attn, cmask, P, pls, cls = _batch(3)
    rewards = torch.tensor([1.0, -1.0, 1.0])

    def our_grad(temperature):
        v.grad = None
        adv = rloo_advantages(rewards[None])[0]
        logp, _ = completion_logprobs(steered, tokens, attn, P, with_entropy=False, temperature=temperature)
        policy_loss(logp, adv, cmask)[0].backward()
        return v.grad.clone()

    # the formula, transcribed, each sequence alone (no padding)
    v.grad = None
    n = sum(cls)
    ref = 0.0
    for i, (pl, cl) in enumerate(zip(pls, cls, strict=True)):
        a = rewards[i] - (rewards.sum() - rewards[i]) / (len(rewards) - 1)
        seq = tokens[i, P - pl : P + cl][None]
        lp = (steered(seq, grad=True)[0, pl - 1 : -1] / T).log_softmax(-1).gather(-1, seq[0, pl:, None]).sum()
        ref = ref - a * lp / n
    ref.backward()
    ref_grad = v.grad.clone()
    torch.testing.assert_close(our_grad(T), ref_grad, atol=1e-5, rtol=1e-4)
    # the untempered gradient differs (so the temperature is really applied)
    assert not torch.allclose(our_grad(1.0), ref_grad, atol=1e-4)
    assert RLConfig(temperature=T).logprob_temperature == T
    assert RLConfig(temperature=T, tempered_logprobs=False).logprob_temperature == 1.0


def test_step_time_split_metrics(tiny_llama):
    """`score_s` holds the reward's time (a reward that sleeps 0.05 s), `reference_s` the KL reference
    forward's (0 exactly when kl_coef=0 and log_kl=False skip it); both within the step's wall time."""
    import time as _time

    def slow_reward(prompts, completions):
        _time.sleep(0.05)
        return torch.tensor([float(len(c)) for c in completions])

    prompts = torch.tensor([[1, 5, 9], [1, 6, 8]])
    base = dict(steps=2, group_size=2, prompts_per_step=2, max_new_tokens=3, progress=False)
    for log_kl in (True, False):
        steered = sl.SteeredTransformer(tiny_llama, [HOOK])
        res = rl(steered, prompts, slow_reward, RLConfig(**base, log_kl=log_kl))
        m = res.metrics
        assert (m["score_s"] >= 0.05).all()
        assert ((m["reference_s"] > 0) if log_kl else (m["reference_s"] == 0)).all()
        assert float((m["sample_s"] + m["score_s"] + m["reference_s"]).sum()) <= res.seconds
