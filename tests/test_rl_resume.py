"""Interrupt-anywhere resume for RL (reliability issue, item 7): every algorithm, ``ppo_epochs`` 1 and 2.

A run interrupted at any step (inside the update, or while a reward is scored) and resumed from its
checkpoint must end bit for bit where an uninterrupted run ends: same vector, same per-step metrics.
Before the run state was checkpointed, ``reinforce`` restarted its moving baseline and ``ppo_epochs=2``
stopped mid-rollout resampled the rollout with the newer vector.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import IncompatibleVectorError
from steer_lens.train.rl import RLConfig, rl

HOOK = "blocks.1.hook_resid_pre"
PROMPTS = torch.tensor([[1, 5, 9], [1, 6, 8], [1, 7, 7]])
TIMING = {"tokens_per_s", "sample_s", "score_s", "reference_s"}
# `steer_lens.train.rl` the attribute is the function `rl`; the module is reached by its full name
trainer = importlib.import_module("steer_lens.train.rl.trainer")


@pytest.fixture(scope="module")
def tiny_llama():
    return sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=32, seed=1)


def _reward(prompts, completions):
    # a reward with spread inside groups, so every estimator gives non-zero advantages
    return torch.tensor([float(sum(int(t) % 3 == 0 for t in c.split())) for c in completions])


def _cfg(algorithm, ppo_epochs, **kw):
    base = dict(steps=6, group_size=2, prompts_per_step=2, max_new_tokens=4, progress=False, lr=0.3)
    return RLConfig(**{**base, **kw}, algorithm=algorithm, ppo_epochs=ppo_epochs)


def _same_history(a, b):
    assert set(a.metrics) == set(b.metrics)
    for k in a.metrics:
        if k in TIMING:
            continue
        x, y = a.metrics[k].tolist(), b.metrics[k].tolist()
        assert all((math.isnan(p) and math.isnan(q)) or p == q for p, q in zip(x, y, strict=True)), k


@pytest.mark.parametrize("ppo_epochs", [1, 2])
@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "reinforce"])
def test_interrupted_rl_resumes_bit_exactly(tiny_llama, tmp_path, monkeypatch, algorithm, ppo_epochs):
    straight = sl.SteeredTransformer(tiny_llama, [HOOK])
    ref = rl(straight, PROMPTS, _reward, _cfg(algorithm, ppo_epochs))
    assert ref.metrics["grad_norm"].abs().sum() > 0  # the vector moves, so a wrong resume shows

    real_loss = trainer.policy_loss
    for stop in (1, 3, 4):  # interrupt inside the update of step `stop` (3: mid-rollout for ppo_epochs=2)
        calls = {"n": 0, "stop": stop}

        def interrupting(*a, calls=calls, **k):
            calls["n"] += 1
            if calls["n"] == calls["stop"] + 1:
                raise KeyboardInterrupt
            return real_loss(*a, **k)

        ck = tmp_path / f"{algorithm}-{ppo_epochs}-{stop}"
        run = sl.SteeredTransformer(tiny_llama, [HOOK])
        monkeypatch.setattr(trainer, "policy_loss", interrupting)
        with pytest.raises(KeyboardInterrupt):
            rl(run, PROMPTS, _reward, _cfg(algorithm, ppo_epochs, checkpoint_dir=str(ck)))
        monkeypatch.setattr(trainer, "policy_loss", real_loss)
        again = sl.SteeredTransformer(tiny_llama, [HOOK])
        res = rl(again, PROMPTS, _reward, _cfg(algorithm, ppo_epochs, checkpoint_dir=str(ck), resume=True))
        assert torch.equal(again.vectors[HOOK], straight.vectors[HOOK]), (algorithm, ppo_epochs, stop)
        _same_history(res, ref)


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo"])
def test_interrupt_while_scoring_keeps_the_baseline(tiny_llama, tmp_path, algorithm):
    straight = sl.SteeredTransformer(tiny_llama, [HOOK])
    rl(straight, PROMPTS, _reward, _cfg(algorithm, 1))
    calls = {"n": 0}

    def stops_at_third(prompts, completions):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return _reward(prompts, completions)

    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        rl(sl.SteeredTransformer(tiny_llama, [HOOK]), PROMPTS, stops_at_third, _cfg(algorithm, 1, checkpoint_dir=str(ck)))
    again = sl.SteeredTransformer(tiny_llama, [HOOK])
    rl(again, PROMPTS, _reward, _cfg(algorithm, 1, checkpoint_dir=str(ck), resume=True))
    assert torch.equal(again.vectors[HOOK], straight.vectors[HOOK])


def test_checkpoint_without_run_state_is_refused(tiny_llama, tmp_path):
    ck = tmp_path / "ck"
    rl(sl.SteeredTransformer(tiny_llama, [HOOK]), PROMPTS, _reward, _cfg("reinforce", 1, steps=2, checkpoint_dir=str(ck)))
    for sub in ck.glob("step-*"):
        (sub / "run_state.safetensors").unlink()
    with pytest.raises(IncompatibleVectorError, match="no run state"):
        rl(sl.SteeredTransformer(tiny_llama, [HOOK]), PROMPTS, _reward,
           _cfg("reinforce", 1, checkpoint_dir=str(ck), resume=True))
