"""SFT and the shared loop: the loss values, masking, relative lrs, checkpoints/resume, NaN guard."""

from __future__ import annotations

import math
import re

import pytest
import torch

HOOK = "blocks.1.hook_resid_pre"
pytestmark = pytest.mark.real_model


@pytest.fixture
def steered(real_model):
    import steer_lens as sl

    return sl.SteeredTransformer(real_model, [HOOK])


def test_promotion_loss_is_cross_entropy_on_completion_only(steered, real_model):
    from steer_lens.train.supervised import _promotion_loss, collate, tokenize_examples

    steered.vectors.set_(HOOK, torch.randn(128, generator=torch.Generator().manual_seed(0)) * 20)
    data = tokenize_examples(steered, [("Once upon a time", " there was a dog."), ("Tom", " ran home.")])
    batch = collate(steered, [(d.prompt, d.completion) for d in data])
    loss = _promotion_loss(steered, batch)
    # independent reference: per example, run unpadded, CE over completion tokens only
    nll, count = 0.0, 0
    for d in data:
        toks = torch.tensor([d.prompt + d.completion])
        logp = steered(toks)[0].log_softmax(-1)
        for t in range(len(d.prompt), toks.shape[1]):
            nll -= float(logp[t - 1, toks[0, t]])
            count += 1
    assert math.isclose(float(loss), nll / count, rel_tol=1e-5)


def test_split_follows_joint_tokenization(steered, real_model):
    """Prompt + completion tokens are exactly the joint text's tokens (no prefix token in between)."""
    from steer_lens.train.supervised import tokenize_examples

    for prompt, completion in [("Once upon a time, there was a", " little girl"), ("Tom", " ran home."),
                               ("", "The dog ran.")]:
        d = tokenize_examples(steered, [(prompt, completion)])[0]
        assert d.prompt + d.completion == real_model.to_tokens(prompt + completion)[0].tolist()
        assert len(d.completion) >= 1


def test_prompt_tokens_are_not_targets(steered):
    """Changing the prompt's *targets* cannot change the loss: only completion tokens count."""
    from steer_lens.train.supervised import collate, tokenize_examples

    data = tokenize_examples(steered, [("Once upon a time", " there was a dog.")])
    b = collate(steered, [(data[0].prompt, data[0].completion)])
    n_prompt = len(data[0].prompt)
    assert not b.target_mask[0, : n_prompt - 1].any()
    assert b.target_mask[0, n_prompt - 1 :].all()
    assert int(b.target_mask.sum()) == len(data[0].completion)


def test_suppression_loss_matches_closed_form(steered):
    from steer_lens.train.supervised import _suppression_loss, collate, tokenize_examples

    data = tokenize_examples(steered, [("Once upon a time", " a dog")], "suppression")
    b = collate(steered, [(data[0].prompt, data[0].completion)])
    loss = _suppression_loss(steered, b)
    toks = b.tokens
    p = steered(toks)[0].softmax(-1)
    n = len(data[0].prompt)
    ref = [-math.log(1 - float(p[t - 1, toks[0, t]])) for t in range(n, toks.shape[1])]
    assert math.isclose(float(loss), sum(ref) / len(ref), rel_tol=1e-4)


def test_sft_lowers_heldout_loss_and_raises_word_rate(real_model, sentences):
    import steer_lens as sl
    from steer_lens.demo import word_rate
    from steer_lens.train import SFTConfig, heldout_loss, sft

    dog = [s for s in sentences if re.search(r"\bdog\b", s, re.I)]
    train, held = dog[::2] + dog[1::4], dog[3::4]
    s = sl.SteeredTransformer(real_model, [HOOK])
    prompts = ["Once upon a time"] * 48
    with s.disabled():
        base_loss = heldout_loss(s, held)
        base_rate = word_rate(s.sample(prompts, 40, seed=0).completions, "dog")
    result = sft(s, train, SFTConfig(steps=150, progress=False, eval_texts=held, eval_every=50))
    after = heldout_loss(s, held)
    rate = word_rate(s.sample(prompts, 40, seed=0).completions, "dog")
    assert after < base_loss - 0.1, (base_loss, after)
    assert rate > base_rate + 0.25, (base_rate, rate)
    # the logged held-out loss is measured at the start of a step: at step 0 the vector is still zero
    assert math.isclose(float(result.metrics["heldout_loss"][0]), base_loss, rel_tol=1e-5)
    assert torch.isnan(result.metrics["heldout_loss"][1])  # only every eval_every steps
    assert result.losses[-20:].mean() < result.losses[:20].mean()


def test_relative_lr_uses_median_residual_rms(steered, real_model):
    from steer_lens.train import typical_resid_rms

    toks = real_model.to_tokens("Once upon a time there was a dog. Tom ran home to his mom.")
    rms = typical_resid_rms(steered, toks)[HOOK]
    _, cache = real_model.run_with_cache(toks)
    norms = cache[HOOK][:, 1:].norm(dim=-1).reshape(-1)  # BOS left out
    assert math.isclose(rms, float(norms.median()) / math.sqrt(128), rel_tol=1e-5)


def test_max_norm_bounds_the_vector(steered):
    from steer_lens.train import SFTConfig, sft

    sft(steered, ["The dog ran to the park."] * 4, SFTConfig(steps=20, lr=0.3, max_norm=5.0, progress=False))
    assert float(steered.vectors[HOOK].norm()) <= 5.0 + 1e-4


def test_resume_equals_uninterrupted_run(real_model, tmp_path):
    import steer_lens as sl
    from steer_lens.train import SFTConfig, sft

    data = ["The dog ran.", "A big dog barked at the cat.", "Lily saw a dog.", "The dog was happy."]
    a = sl.SteeredTransformer(real_model, [HOOK])
    sft(a, data, SFTConfig(steps=10, batch_size=2, progress=False))
    b = sl.SteeredTransformer(real_model, [HOOK])
    ck = str(tmp_path / "ck")
    sft(b, data, SFTConfig(steps=5, batch_size=2, progress=False, checkpoint_dir=ck))
    c = sl.SteeredTransformer(real_model, [HOOK])  # fresh vector: everything comes from the checkpoint
    res = sft(c, data, SFTConfig(steps=10, batch_size=2, progress=False, checkpoint_dir=ck, resume=True))
    assert torch.equal(a.vectors[HOOK], c.vectors[HOOK])
    assert res.steps == 10


def test_interrupted_training_keeps_checkpoint_and_model_pristine(real_model, tmp_path, monkeypatch):
    import importlib

    import steer_lens as sl

    sft_mod = importlib.import_module("steer_lens.train.supervised")
    from steer_lens.train import SFTConfig, sft

    toks = real_model.to_tokens("Once upon a time")
    pristine = real_model(toks)
    s = sl.SteeredTransformer(real_model, [HOOK])
    real_loss = sft_mod._promotion_loss
    calls = []

    def flaky(steered, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(steered, batch)

    monkeypatch.setattr(sft_mod, "_promotion_loss", flaky)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        sft(s, ["The dog ran."] * 3, SFTConfig(steps=10, progress=False, checkpoint_dir=str(ck)))
    assert (ck / "latest.json").exists()
    saved = sl.SteeredTransformer.load(next(ck.glob("step-*")) / "vectors", real_model)
    assert torch.equal(saved.vectors[HOOK], s.vectors[HOOK])  # the last good state (after 3 steps)
    assert float(s.vectors[HOOK].norm()) > 0
    assert torch.equal(real_model(toks), pristine)


def test_nan_guard_restores_last_good_state(steered, monkeypatch):
    import importlib

    sft_mod = importlib.import_module("steer_lens.train.supervised")
    from steer_lens.errors import TrainingDivergedError
    from steer_lens.train import SFTConfig, sft

    real_loss = sft_mod._promotion_loss
    calls, snapshots = [], []

    def poisoned(s, batch):
        calls.append(1)
        snapshots.append(s.vectors[HOOK].detach().clone())
        loss = real_loss(s, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(sft_mod, "_promotion_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="step 2"):
        sft(steered, ["The dog ran."] * 3, SFTConfig(steps=10, progress=False))
    assert torch.equal(steered.vectors[HOOK].detach(), snapshots[2])
    assert torch.isfinite(steered.vectors[HOOK]).all()


def test_training_input_errors(steered):
    from steer_lens.errors import ConfigError, EmptyInputError, SequenceTooLongError
    from steer_lens.train import SFTConfig, sft

    with pytest.raises(EmptyInputError):
        sft(steered, [], SFTConfig(steps=1, progress=False))
    with pytest.raises(EmptyInputError, match="completion"):
        sft(steered, [("Once", "")], SFTConfig(steps=1, progress=False))
    with pytest.raises(SequenceTooLongError):
        sft(steered, ["dog " * 600], SFTConfig(steps=1, progress=False))
    with pytest.raises(ConfigError, match="lr"):
        SFTConfig(lr=-1.0)
    with pytest.raises(Exception, match="objective"):  # ConfigError (TypeCheckError under jaxtyping)
        SFTConfig(objective="demote")
    assert float(steered.vectors[HOOK].abs().sum()) == 0.0


def test_one_shot_mixed_objective_moves_probabilities(steered):
    """Dunefsky & Cohan one-shot mixed steering: promoted text up, suppressed text down."""
    from steer_lens.train import SFTConfig, sft
    from steer_lens.train.data import next_token_logprobs
    from steer_lens.train.supervised import collate, tokenize_examples

    ex = {"prompt": "Once upon a time, there was a", "completion": " dog", "suppress": " little girl"}
    data = tokenize_examples(steered, [ex], "mixed")

    def lp(target):  # the whole forward's log-probs of the target tokens
        b = collate(steered, [target])
        with torch.no_grad():
            return float((next_token_logprobs(steered(b.tokens), b.tokens) * b.target_mask).sum())

    promote, suppress = (data[0].prompt, data[0].completion), (data[0].suppress_prompt, data[0].suppress)
    before = lp(promote), lp(suppress)
    sft(steered, [ex], SFTConfig(steps=30, objective="mixed", progress=False))
    after = lp(promote), lp(suppress)
    assert after[0] > before[0] + 0.5 and after[1] < before[1] - 0.5


@pytest.mark.parametrize("extra", [[], ["ln_final.hook_normalized"]])
def test_target_logprobs_equal_the_whole_forward(tiny_model, extra):
    """The SFT loss unembeds the target positions only (steer_lens.train.scored): its log-probs equal
    log_softmax of the whole forward's logits at those positions, for right-padded chat rows with prompts
    of different lengths; gradients reach the vectors and never the weights; a vector at the final
    norm (which that shortcut would skip) takes the whole forward."""
    import steer_lens as sl
    from steer_lens.train.data import next_token_logprobs
    from steer_lens.train.scored import unembeds_apart
    from steer_lens.train.supervised import _target_logprobs, collate

    hooks = ["blocks.1.hook_resid_pre", *extra]
    steered = sl.SteeredTransformer(tiny_model, hooks, init="random", init_norm=3.0, seed=2)
    b = collate(steered, [([1, 20, 30, 40, 50], [10, 11]), ([1, 40], [41, 42, 43, 44]), ([1, 7, 8], [9])])
    flags = [p.requires_grad for p in tiny_model.parameters()]
    tiny_model.requires_grad_(True)  # a user's model whose weights require grad (TransformerLens's default)
    try:
        with steered.gradients():
            lp = _target_logprobs(steered, b)
        lp.sum().backward()
        assert all(p.grad is None for p in tiny_model.parameters())
        assert all(steered.vectors[h].grad is not None and steered.vectors[h].grad.abs().max() > 0 for h in hooks)
    finally:
        for p, f in zip(tiny_model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    with torch.no_grad():
        full = steered(b.tokens, attention_mask=b.attention_mask, prompt_lengths=b.prompt_lengths)
    ref = next_token_logprobs(full, b.tokens)[b.target_mask]
    assert lp.shape == (7,) and int(b.target_mask.sum()) == 7
    torch.testing.assert_close(lp.detach(), ref, atol=1e-5, rtol=1e-5)
    assert unembeds_apart(steered) == (not extra)
