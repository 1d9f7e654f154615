"""Training steering vectors: supervised (:func:`sft`) and reinforcement learning (:func:`rl`).

Every objective runs on one optimisation loop (:mod:`steer_lens.train.loop`): AdamW over the vectors
only, learning rates relative to each hook's residual scale, checkpoints, resume and a NaN guard.
"""

from __future__ import annotations

from steer_lens.train import rewards
from steer_lens.train.loop import OptimConfig, TrainResult, typical_resid_rms
from steer_lens.train.rl import RLConfig, register_advantage, rl  # binds rl over the package name
from steer_lens.train.supervised import SFTConfig, heldout_loss, sft

__all__ = [
    "OptimConfig",
    "RLConfig",
    "SFTConfig",
    "TrainResult",
    "heldout_loss",
    "register_advantage",
    "rewards",
    "rl",
    "sft",
    "typical_resid_rms",
]
