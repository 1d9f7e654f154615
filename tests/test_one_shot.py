"""One-shot steering (Dunefsky & Cohan 2025) against a transcription of the paper's ``steering_opt.py``."""

from __future__ import annotations

import pytest
import torch


def _paper_completion_loss(logits, completion_tokens, prompt_len, *, is_src, temperature=0.7, eps=1e-6):
    # steering_opt.py, optimize_completion.get_completion_loss (do_one_minus=True), transcribed
    probs = torch.nn.functional.softmax(logits * temperature, dim=-1)
    cur_loss = 0
    for completion_token_idx in range(0, len(completion_tokens)):
        completion_token = completion_tokens[completion_token_idx]
        prompt_token_idx = prompt_len + completion_token_idx - 1
        if is_src:
            target_prob = torch.log(1 - probs[prompt_token_idx, completion_token] + eps)
        else:
            target_prob = torch.log(probs[prompt_token_idx, completion_token] + eps)
        cur_loss -= target_prob
    return cur_loss


@pytest.mark.parametrize("suppress", [False, True])
def test_completion_loss_equals_the_papers_formula(suppress):
    from steer_lens.train.one_shot import completion_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=g) * 3
    completion = torch.tensor([4, 17, 17, 2])
    ours = completion_loss(logits, completion, 5, suppress=suppress)
    ref = _paper_completion_loss(logits, completion.tolist(), 5, is_src=suppress)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # normalize_token_length divides by the token count
    mean = completion_loss(logits, completion, 5, suppress=suppress, normalize_token_length=True)
    torch.testing.assert_close(mean, ref / 4, rtol=1e-6, atol=1e-6)


def _paper_optimize(model, hook, prompt, dst, src, vector, iters, lr=0.01, temperature=0.7, eps=1e-6):
    """optimize_completion's loop for one datapoint (TransformerLens path, token=None), transcribed."""
    vector = vector.detach().clone().requires_grad_(True)
    get_tokens = lambda p: model.to_tokens(p).tolist()[0]
    prompt_len = len(get_tokens(prompt))
    optimizer = torch.optim.Adam([vector], lr=lr)

    def loss_of(completion, is_src):
        toks = get_tokens(prompt + completion)[prompt_len:]

        def hook_fn(x, hook):
            return x + vector

        with model.hooks(fwd_hooks=[(hook, hook_fn)]):
            logits = model(prompt + completion)[0]
        return _paper_completion_loss(logits, toks, prompt_len, is_src=is_src, temperature=temperature, eps=eps)

    n = 0
    while n <= iters:  # "if max_iters is not None and iters > max_iters: break"
        optimizer.zero_grad()
        for c in src:
            loss_of(c, True).backward()
        for c in dst:
            loss_of(c, False).backward()
        optimizer.step()
        n += 1
    return vector.detach()


@pytest.mark.real_model
def test_one_shot_equals_the_papers_optimisation_loop(real_model):
    import steer_lens as sl
    from steer_lens.train.one_shot import OneShotConfig, OneShotExample, one_shot

    hook = "blocks.1.hook_resid_pre"
    prompt, dst, src = "Once upon a time, there was a ", ["dog"], ["girl"]
    s = sl.SteeredTransformer(real_model, [hook])
    for c in dst + src:  # the paper's slice tokens(prompt + c)[len(tokens(prompt)):] is valid here
        full, p = s.to_tokens(prompt + c), s.to_tokens(prompt)
        assert torch.equal(full[: p.shape[0]], p)
    cfg = OneShotConfig(max_iters=4, seed=3)
    res = one_shot(s, [OneShotExample(prompt=prompt, promote=dst, suppress=src)], cfg)
    g = torch.Generator().manual_seed(3)
    init = torch.randn(real_model.cfg.d_model, generator=g)
    ref = _paper_optimize(real_model, hook, prompt, dst, src, init / init.norm(), iters=4)
    torch.testing.assert_close(s.vectors[hook].detach(), ref, rtol=1e-4, atol=1e-5)
    assert res.iters == 5 and len(res.losses) == 5
    assert res.losses[-1] < res.losses[0]


@pytest.mark.real_model
def test_one_shot_target_loss_max_norm_and_output_constraint(real_model):
    import steer_lens as sl
    from steer_lens.train.one_shot import OneShotConfig, OneShotExample, completion_loss, one_shot

    hook = "blocks.1.hook_resid_pre"
    ex = OneShotExample(prompt="Once upon a time, there was a ", promote=["dog"])
    s = sl.SteeredTransformer(real_model, [hook])
    # max_norm: the vector never leaves the ball
    one_shot(s, [ex], OneShotConfig(max_iters=20, lr=0.5, max_norm=2.0, seed=0))
    assert float(s.vectors[hook].detach().norm()) <= 2.0 + 1e-5
    # target loss: stops at the first check at or below it
    res = one_shot(s, [ex], OneShotConfig(max_iters=300, lr=0.2, target_loss=1.0, seed=0))
    assert res.losses[-1] <= 1.0 and all(v > 1.0 for v in res.losses[:-1])
    # output-constrained: a shorter vector whose loss stays near the bound
    before = float(s.vectors[hook].detach().norm())
    res2 = one_shot(s, [ex], OneShotConfig(max_iters=300, lr=0.2, target_loss=1.0, seed=0,
                                           do_output_constr=True, output_constr_lr=0.05))
    assert res2.output_constr_iters > 1 and res2.norm < before
    toks = s.to_tokens(ex.prompt + ex.promote[0])
    plen = s.to_tokens(ex.prompt).shape[0]
    with torch.no_grad():
        loss = completion_loss(s(toks[None])[0], toks[plen:], plen, suppress=False)
    assert float(loss) < 1.5


def test_ablate_then_add_equals_the_papers_hook(tiny_model):
    import steer_lens as sl
    from steer_lens.vectors import AblateAddVectors

    hook = f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    clamp = 1.7
    toks = torch.randint(3, tiny_model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(2))
    abl = -torch.outer(v, v) / (v.norm() ** 2)  # make_abl_mat

    def paper_hook(x, hook):  # make_steering_hook_tflens(clamp * v, matrix=make_abl_mat(v))
        return x + clamp * v + torch.einsum("...n, mn -> ...m", x, abl)

    ref = tiny_model.run_with_hooks(toks, fwd_hooks=[(hook, paper_hook)])
    vectors = AblateAddVectors([hook], tiny_model.cfg.d_model, clamp=clamp, init={hook: v})
    s = sl.SteeredTransformer(tiny_model, [hook], vectors=vectors)
    torch.testing.assert_close(s(toks), ref, rtol=1e-5, atol=1e-5)
    # property: every token ends with exactly clamp * |v| along v
    _, cache = s.run_with_cache(toks, names_filter=hook)
    along = cache[hook] @ (v / v.norm())
    torch.testing.assert_close(along, torch.full_like(along, clamp * float(v.norm())), rtol=1e-5, atol=1e-5)


def test_bad_one_shot_input_is_named(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError
    from steer_lens.train.one_shot import OneShotConfig, OneShotExample, one_shot

    with pytest.raises(ConfigError, match="promote"):
        OneShotExample(prompt="x")
    with pytest.raises(ConfigError, match="temperature"):
        OneShotConfig(temperature=0.0)
    s = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"])
    with pytest.raises(ConfigError, match="one vector"):
        one_shot(s, [OneShotExample(prompt="x", promote=["y"])])


def test_dunefsky2025_recipe_has_the_papers_settings(tiny_model):
    from steer_lens import recipes
    from steer_lens.errors import ConfigError

    r = recipes.dunefsky2025(tiny_model)
    # refusal.ipynb: layer 12 of Gemma-2-2B's 26 -> the same relative depth
    assert r.hooks == (f"blocks.{round(12 / 26 * tiny_model.cfg.n_layers)}.hook_resid_pre",)
    c = r.config
    assert (c.lr, c.max_iters, c.max_norm, c.target_loss, c.target_loss_target_iters) == (0.5, 30, 30.0, 0.01, 1)
    assert (c.temperature, c.eps, c.starting_norm, c.normalize_token_length) == (0.7, 1e-6, 1.0, False)
    assert recipes.dunefsky2025(tiny_model, layer=0).hooks == ("blocks.0.hook_resid_pre",)
    with pytest.raises(ConfigError, match="layer"):
        recipes.dunefsky2025(tiny_model, layer=99)


def test_sinii2025_recipe_has_the_papers_settings(tiny_model):
    from steer_lens import recipes

    r = recipes.sinii2025(tiny_model, steps=100)
    assert r.hooks == tuple(f"blocks.{i}.hook_mlp_out" for i in range(tiny_model.cfg.n_layers))
    c = r.config
    assert (c.algorithm, c.lr, c.lr_units, c.warmup_steps, c.grad_clip, c.kl_coef) == ("rloo", 1e-3, "absolute", 3, 2.0, 0.0)
    assert (c.prompts_per_step, c.group_size, c.temperature, c.tempered_logprobs, c.ppo_epochs) == (16, 16, 1.0, True, 1)
    s = r.steered(tiny_model)
    assert all(float(v.abs().sum()) == 0.0 for _, v in s.vectors.items())  # zero-initialised
