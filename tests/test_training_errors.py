"""Any exception in a training step keeps the last good state (issue 15, item 6).

Reference: the same loop run for exactly the completed steps (``steps=3``): an exception in step 4
must leave the vectors and the checkpoint equal to that run's, bit for bit (deterministic CPU run).
"""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import RewardError
from steer_lens.train.loop import OptimConfig, run_loop

HOOK = "blocks.0.hook_resid_post"


def _steered():
    model = sl.random_model("llama", n_layers=1, d_model=16, n_heads=2, d_vocab=23, seed=1)
    return sl.SteeredTransformer(model, hooks=[HOOK])


def _step_fn(steered, fail_at: int | None, error: BaseException):
    target = torch.linspace(-1, 1, 16)

    def step_fn(step: int):
        if step == fail_at:
            raise error
        v = steered.vectors.direction(HOOK)
        return ((v - target) ** 2).sum(), {}

    return step_fn


@pytest.mark.parametrize("error", [RewardError("reward returned a string"), OSError("disk full"), KeyboardInterrupt()],
                         ids=["RewardError", "OSError", "KeyboardInterrupt"])
def test_an_error_mid_run_keeps_the_last_good_state_and_checkpoint(tmp_path, error):
    ref = _steered()
    cfg = dict(lr=0.1, lr_units="absolute", progress=False, warmup_steps=0)
    run_loop(ref, _step_fn(ref, None, error), OptimConfig(steps=3, **cfg), resid_rms={HOOK: 1.0})

    steered = _steered()
    ck = tmp_path / "ck"
    with pytest.raises(type(error)):
        run_loop(steered, _step_fn(steered, 3, error), OptimConfig(steps=10, checkpoint_dir=str(ck), **cfg),
                 resid_rms={HOOK: 1.0})
    assert torch.equal(steered.vectors.direction(HOOK), ref.vectors.direction(HOOK))  # after step 3
    latest = sl.vectors.io.read_json(ck / "latest.json")
    assert latest["step"] == 3
    saved = sl.SteeredTransformer.load(ck / latest["folder"] / "vectors", steered.model)
    assert torch.equal(saved.vectors.direction(HOOK), ref.vectors.direction(HOOK))
    # and the run resumes from it to the same end as an uninterrupted one
    resumed = _steered()
    run_loop(resumed, _step_fn(resumed, None, error),
             OptimConfig(steps=6, checkpoint_dir=str(ck), resume=True, **cfg), resid_rms={HOOK: 1.0})
    straight = _steered()
    run_loop(straight, _step_fn(straight, None, error), OptimConfig(steps=6, **cfg), resid_rms={HOOK: 1.0})
    assert torch.equal(resumed.vectors.direction(HOOK), straight.vectors.direction(HOOK))
