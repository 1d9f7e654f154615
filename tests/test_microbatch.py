"""Micro-batches with gradient accumulation in rl() and sft(), and the skipped reference forward.

The reference for every gradient is the full-batch loss written out here from the papers' formulas
(Sinii et al. 2025's policy loss ``-(1/N) sum_i A_i sum_t log pi(y_it)`` plus the k3 KL and entropy
terms, normalised by the generated-token count ``N`` of the whole batch; SFT's mean cross-entropy
over the target tokens of the whole batch), differentiated with ``torch.autograd.grad``.
"""

from __future__ import annotations

import pytest
import torch

HOOK = "blocks.1.hook_resid_pre"
PROMPT_LENS = [5, 3, 4, 2, 5]
COMP_LENS = [6, 2, 4, 1, 5]  # generated tokens kept (incl. EOS): micro-batches get unequal counts


@pytest.fixture(scope="module")
def model64():
    import steer_lens as sl

    return sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1,
                           dtype=torch.float64)


def _steered64(model, seed: int = 0):
    import steer_lens as sl

    steered = sl.SteeredTransformer(model, [HOOK])
    steered.vectors.to(torch.float64)
    steered.vectors.set_(HOOK, torch.randn(32, generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64) * 0.5)
    return steered


def _generation():
    """Left-padded prompts of different lengths + completions ending at different places (by hand)."""
    from steer_lens.generation import Generation

    g = torch.Generator().manual_seed(0)
    n, p_len, new = len(PROMPT_LENS), max(PROMPT_LENS), max(COMP_LENS)
    tokens = torch.zeros(n, p_len + new, dtype=torch.long)
    attn = torch.zeros(n, p_len + new, dtype=torch.long)
    cmask = torch.zeros(n, new, dtype=torch.bool)
    for i, (pl, cl) in enumerate(zip(PROMPT_LENS, COMP_LENS, strict=True)):
        tokens[i, p_len - pl : p_len + new] = torch.randint(3, 53, (pl + new,), generator=g)
        attn[i, p_len - pl : p_len + cl] = 1
        cmask[i, :cl] = True
    return Generation(tokens=tokens, attention_mask=attn, completion_mask=cmask, prompt_len=p_len,
                      prompts=None, completions=None)


def _rl_state(steered, config):
    """An RLState whose first batch of rollouts is the hand-made generation (fixed advantages)."""
    from steer_lens.train.rl import RLState, Rollout, get_advantage
    from steer_lens.train.rl.rollout import reference_logprobs

    gen = _generation()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.25], dtype=torch.float64)
    ro = Rollout(generation=gen, rewards=adv.clone(), advantages=adv,
                 ref_logp=reference_logprobs(steered, gen, config) if config.needs_reference else None,
                 sample_seconds=1.0)
    state = RLState(steered=steered, items=[], texts=[], order=[0] * 8, reward=lambda p, c: None,
                    estimator=get_advantage("rloo").make(config), config=config)
    state.rollout, state.rollout_index = ro, 0
    return state


def _full_batch_rl_loss(steered, config):
    """The policy loss of the whole batch, transcribed from the formula (on-policy: rho = 1)."""
    gen = _generation()
    p = gen.prompt_len
    lengths = torch.full((gen.tokens.shape[0],), p)
    logits = steered(gen.tokens, attention_mask=gen.attention_mask, prompt_lengths=lengths, grad=True)
    logp_all = (logits[:, p - 1 : -1] / config.temperature).log_softmax(-1)
    logp = logp_all.gather(-1, gen.tokens[:, p:, None])[..., 0]
    with torch.no_grad(), steered.disabled():
        base = steered(gen.tokens, attention_mask=gen.attention_mask, prompt_lengths=lengths)
        ref = (base[:, p - 1 : -1] / config.temperature).log_softmax(-1).gather(-1, gen.tokens[:, p:, None])[..., 0]
    m = gen.completion_mask.to(logp.dtype)
    n = m.sum()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.25], dtype=torch.float64)
    d = ref - logp
    k3 = torch.exp(d) - 1 - d
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return (-(adv[:, None] * logp * m).sum() + config.kl_coef * (k3 * m).sum()
            - config.entropy_coef * (ent * m).sum()) / n


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_rl_accumulated_gradient_equals_full_batch(model64, micro_batch_size):
    from steer_lens.train.rl import RLConfig

    config = RLConfig(kl_coef=0.3, entropy_coef=0.05, temperature=0.7, micro_batch_size=micro_batch_size,
                      group_size=2, progress=False)
    steered = _steered64(model64)
    vec = steered.vectors[HOOK]
    assert vec.dtype == torch.float64
    (expected,) = torch.autograd.grad(_full_batch_rl_loss(steered, config), [vec])

    state = _rl_state(steered, config)
    vec.grad = None
    loss, metrics = state.step(0)
    loss.backward()  # what run_loop does with the returned loss
    torch.testing.assert_close(vec.grad, expected, rtol=1e-6, atol=1e-9)
    assert expected.abs().max() > 1e-3  # a gradient that is not trivially zero

    full = RLConfig(kl_coef=0.3, entropy_coef=0.05, temperature=0.7, group_size=2, progress=False)
    whole_loss, whole_metrics = _rl_state(_steered64(model64), full).step(0)
    torch.testing.assert_close(loss.detach(), whole_loss.detach(), rtol=1e-6, atol=1e-7)
    for k in ("pg_loss", "kl", "entropy", "clip_frac"):
        torch.testing.assert_close(metrics[k], whole_metrics[k], rtol=1e-6, atol=1e-7)  # logp in fp32


def _run_rl(model, micro_batch_size, **kw):
    import steer_lens as sl
    from steer_lens.train.rl import RLConfig, rl

    prompts = torch.tensor([[1, 5, 9], [1, 6, 8], [1, 7, 7]])
    steered = sl.SteeredTransformer(model, [HOOK])
    config = RLConfig(steps=4, group_size=2, prompts_per_step=2, max_new_tokens=5, progress=False, lr=0.1,
                      micro_batch_size=micro_batch_size, **kw)
    res = rl(steered, prompts, lambda p, c: torch.tensor([float(" 7 " in f" {x} ") for x in c]), config)
    return steered.vectors[HOOK].detach().clone(), res


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_rl_run_with_micro_batches_matches_whole_batches(tiny_model, micro_batch_size):
    kw = dict(kl_coef=0.2, entropy_coef=0.01, ppo_epochs=2)  # PPO epochs: old log-probs gathered per chunk
    base_vec, base = _run_rl(tiny_model, None, **kw)
    vec, res = _run_rl(tiny_model, micro_batch_size, **kw)
    # fp32 log-probs: summing in another order moves the last bits; Adam's first steps (~lr per
    # coordinate whatever the gradient's size) carry that to ~1e-6 on coordinates with tiny gradients
    torch.testing.assert_close(vec, base_vec, rtol=1e-4, atol=1e-5)
    for k in ("loss", "grad_norm", "kl", "entropy", "clip_frac", "reward"):
        torch.testing.assert_close(res.metrics[k], base.metrics[k], rtol=1e-4, atol=1e-6)
    assert base.metrics["clip_frac"][1] >= 0 and not torch.equal(base_vec, torch.zeros_like(base_vec))


def _count_no_grad_forwards(model, prompt_width):
    """Count forwards of ``model`` without gradient over more than the prompt (a hook on the embedding).

    That leaves out the sampling steps (the prompt, then one token at a time with the KV cache)."""
    calls = []

    def pre_hook(module, args):
        tokens = args[0]
        if not torch.is_grad_enabled() and tokens.shape[-1] > prompt_width:
            calls.append(tokens.shape[0])

    return calls, model.embed.register_forward_pre_hook(pre_hook)


def test_reference_forward_skipped_when_no_kl_is_needed(tiny_llama_fixture):
    model = tiny_llama_fixture
    counts, metrics = {}, {}
    for name, kw in {"off": dict(log_kl=False), "logged": {}, "penalised": dict(kl_coef=0.1, log_kl=False),
                     "logged_mb1": dict(micro_batch_size=1)}.items():
        calls, handle = _count_no_grad_forwards(model, 3)
        try:
            _, res = _run_rl(model, kw.pop("micro_batch_size", None), **kw)
        finally:
            handle.remove()
        counts[name], metrics[name] = calls, res.metrics
    rollouts = 4  # steps with ppo_epochs=1; 2 prompts x 2 completions each
    # the reference forwards are the only ones the three runs differ by: one per batch of rollouts
    assert len(counts["logged"]) - len(counts["off"]) == rollouts
    assert len(counts["penalised"]) == len(counts["logged"])
    # in micro-batches of 1 row: 4 one-row reference forwards per batch of rollouts
    assert len(counts["logged_mb1"]) - len(counts["off"]) == 4 * rollouts
    assert counts["logged_mb1"].count(1) >= 4 * rollouts
    assert "kl" not in metrics["off"] and "kl" in metrics["logged"] and "kl" in metrics["penalised"]
    assert torch.isfinite(metrics["logged"]["kl"]).all()


@pytest.fixture(scope="module")
def tiny_llama_fixture():
    import steer_lens as sl

    return sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)


@pytest.mark.parametrize("bad", [0, -2, True])
def test_bad_micro_batch_size_is_a_config_error(bad):
    from steer_lens.errors import ConfigError
    from steer_lens.train import SFTConfig
    from steer_lens.train.rl import RLConfig

    with pytest.raises(ConfigError, match=r"micro_batch_size.*Fix"):
        RLConfig(micro_batch_size=bad)
    with pytest.raises(ConfigError, match=r"micro_batch_size.*Fix"):
        SFTConfig(micro_batch_size=bad)


@pytest.mark.parametrize("bad", [1.5, "4", 0])
def test_micro_batch_size_check_refuses_other_types(bad):
    # the configs' annotations already refuse these under the test suite's runtime type checks;
    # without them (a user's run) this check does
    from steer_lens.errors import ConfigError
    from steer_lens.train.loop import check_micro_batch_size, micro_batches

    with pytest.raises(ConfigError, match=r"micro_batch_size: expected None .* got"):
        check_micro_batch_size(bad)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        micro_batches(4, 0)


def test_micro_batches_cover_the_batch_in_order():
    from steer_lens.train.loop import micro_batches

    assert micro_batches(5, None) == [slice(0, 5)]
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(3, 8) == [slice(0, 3)]


# -- SFT ---------------------------------------------------------------------------------------------
EXAMPLES = [
    {"prompt": "Once upon a time", "completion": " there was a dog.", "suppress": " there was a cat."},
    {"prompt": "Tom", "completion": " ran home to his mom and dad.", "suppress": " cried."},
    {"prompt": "The sun", "completion": " was hot.", "suppress": " was very, very cold that day."},
]


def _full_batch_sft_loss(steered, objective):
    """Mean -log p over the completion tokens (and mean -log(1-p) over the suppress tokens) of the whole batch."""
    from steer_lens.train.supervised import tokenize_examples

    data = tokenize_examples(steered, EXAMPLES, objective)
    terms = {"promotion": [(d.prompt, d.completion) for d in data]}
    if objective == "mixed":
        terms["suppression"] = [(d.suppress_prompt, d.suppress) for d in data]
    total = 0.0
    for name, rows in terms.items():
        s, count = 0.0, 0
        for prompt, target in rows:
            toks = torch.tensor([prompt + target])
            logp = steered(toks, grad=True)[0].log_softmax(-1)
            for t in range(len(prompt), toks.shape[1]):
                lp = logp[t - 1, toks[0, t]]
                s = s - (lp if name == "promotion" else torch.log1p(-lp.exp()))
                count += 1
        total = total + s / count
    return total


@pytest.mark.real_model
@pytest.mark.parametrize("objective", ["promotion", "mixed"])
@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_sft_accumulated_gradient_equals_full_batch(real_model, objective, micro_batch_size):
    import steer_lens as sl
    from steer_lens.train import SFTConfig, sft

    steered = sl.SteeredTransformer(real_model, [HOOK])
    steered.vectors.set_(HOOK, torch.randn(128, generator=torch.Generator().manual_seed(0)) * 5)
    vec = steered.vectors[HOOK]
    (expected,) = torch.autograd.grad(_full_batch_sft_loss(steered, objective), [vec])

    seen = []  # every backward's gradient into the vector: one per micro-batch
    handle = vec.register_hook(lambda g: seen.append(g.detach().clone()))
    try:
        sft(steered, EXAMPLES, SFTConfig(steps=1, batch_size=3, objective=objective, progress=False,
                                         micro_batch_size=micro_batch_size))
    finally:
        handle.remove()
    assert len(seen) == -(-3 // micro_batch_size)
    torch.testing.assert_close(torch.stack(seen).sum(0), expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-3


@pytest.mark.real_model
@pytest.mark.parametrize("objective", ["promotion", "suppression", "mixed"])
def test_sft_run_with_micro_batches_matches_whole_batches(real_model, objective):
    import steer_lens as sl
    from steer_lens.train import SFTConfig, sft

    out = {}
    for mb in (None, 2):
        steered = sl.SteeredTransformer(real_model, [HOOK])
        res = sft(steered, EXAMPLES, SFTConfig(steps=3, batch_size=3, objective=objective, progress=False,
                                              micro_batch_size=mb, lr=0.05))
        out[mb] = (steered.vectors[HOOK].detach().clone(), res.metrics)
    torch.testing.assert_close(out[2][0], out[None][0], rtol=1e-4, atol=1e-5)
    for k in out[None][1]:
        torch.testing.assert_close(out[2][1][k], out[None][1][k], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_accumulate_gradients_sums_losses_and_gradients():
    from steer_lens.train.loop import accumulate_gradients, micro_batches

    w = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    x = torch.arange(10, dtype=torch.float64).reshape(5, 2)

    def chunk_loss(rows):
        return ((x[rows] @ w) ** 2).sum() / 5, {"n": torch.tensor(float(x[rows].shape[0]))}

    loss, metrics = accumulate_gradients(micro_batches(5, 2), chunk_loss)
    loss.backward()
    expected = 2 * (x.T @ (x @ w)) / 5  # gradient of mean_i (x_i . w)^2
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(loss.detach(), ((x @ w) ** 2).mean())
    assert float(metrics["n"]) == 5.0
