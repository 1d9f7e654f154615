"""Training steering vectors: supervised (:func:`sft`) and reinforcement learning (:func:`rl`).

:mod:`steer_lens.train.side_effects` measures what trained vectors do to the model's own samples
(KL to the base model, distinct-2, repeat rate); :func:`sft` reports it and can penalise the KL.

Every objective runs on one optimisation loop (:mod:`steer_lens.train.loop`): AdamW over the vectors
only, learning rates relative to each hook's residual scale, checkpoints, resume and a NaN guard.
"""

from __future__ import annotations

from steer_lens.train import distributed, rewards, side_effects
from steer_lens.train.loop import OptimConfig, TrainResult, typical_resid_rms
from steer_lens.train.recompute import recompute_blocks
from steer_lens.train.rl import RLConfig, register_advantage, rl  # binds rl over the package name
from steer_lens.train.side_effects import SideEffects, SideEffectWarning
from steer_lens.train.supervised import SFTConfig, SFTResult, heldout_loss, sft

__all__ = [
    "OptimConfig",
    "RLConfig",
    "SFTConfig",
    "SFTResult",
    "SideEffectWarning",
    "SideEffects",
    "TrainResult",
    "distributed",
    "heldout_loss",
    "register_advantage",
    "recompute_blocks",
    "rewards",
    "rl",
    "sft",
    "side_effects",
    "typical_resid_rms",
]
