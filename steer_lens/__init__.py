"""steer_lens: learned steering vectors for transformer language models.

Train steering vectors (supervised or by reinforcement learning) as parameters at TransformerLens hook
points, then read them: logit lens, activation/attribution/path patching, SAE features, and
comparison with LoRA fine-tunes.

The top level is short on purpose: the wrapper, the vector kinds, the hook grammar and model loading
are here; each capability is a subpackage reached as ``sl.train``, ``sl.lens``, ``sl.patching``,
``sl.sae``, ``sl.lora``, ``sl.analysis``, ``sl.metrics``. Importing the package does nothing but
import: submodules that need optional dependencies (``sae``, ``lora``) and the heavier analyses load
on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from steer_lens.errors import SteerLensError
from steer_lens.hook_sites import HookSite
from steer_lens.models import load_model, model_info, random_model
from steer_lens.steering import SteeredTransformer
from steer_lens.tokens import WordTokens, word_tokens
from steer_lens.vectors import GatedVectors, LowRankVectors, SteeringVectors

__version__ = "0.1.0"

__all__ = [
    "GatedVectors",
    "HookSite",
    "LowRankVectors",
    "SteerLensError",
    "SteeredTransformer",
    "SteeringVectors",
    "WordTokens",
    "__version__",
    "analysis",
    "errors",
    "export",
    "lens",
    "load_model",
    "lora",
    "metrics",
    "model_info",
    "patching",
    "random_model",
    "recipes",
    "sae",
    "train",
    "vectors",
    "word_tokens",
]

_LAZY = {"export", "train", "lens", "patching", "sae", "lora", "analysis", "errors", "metrics", "plotting", "recipes", "cli"}

if TYPE_CHECKING:  # pragma: no cover
    from steer_lens import analysis, errors, export, lens, lora, metrics, patching, recipes, sae, train


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"steer_lens.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'steer_lens' has no attribute {name!r}")
