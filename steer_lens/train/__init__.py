"""Training steering vectors: supervised (:func:`sft`) and reinforcement learning (:func:`rl`).

Every objective runs on one optimisation loop (:mod:`steer_lens.train.loop`): AdamW over the vectors
only, learning rates relative to each hook's residual scale, checkpoints, resume and a NaN guard.
"""

from __future__ import annotations

import importlib

from steer_lens.train.loop import OptimConfig, TrainResult, typical_resid_rms
from steer_lens.train.supervised import SFTConfig, heldout_loss, sft

__all__ = [
    "OptimConfig",
    "RLConfig",
    "SFTConfig",
    "TrainResult",
    "heldout_loss",
    "rewards",
    "rl",
    "sft",
    "typical_resid_rms",
]

_LAZY = {"rl": ("steer_lens.train.rl", "rl"), "RLConfig": ("steer_lens.train.rl", "RLConfig"),
         "rewards": ("steer_lens.train.rewards", None)}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'steer_lens.train' has no attribute {name!r}")
