"""Steering vectors as parameters: the base class, its parameterisations, their registry and file I/O.

Layers (nothing here imports upward: no wrapper, no analysis):

* :mod:`~steer_lens.vectors.base` - :class:`SteeringVectors`, one fp32 tensor per hook point;
* :mod:`~steer_lens.vectors.lowrank` - :class:`LowRankVectors`, all hooks in one rank-``r`` basis;
* :mod:`~steer_lens.vectors.gated` - :class:`GatedVectors`, a per-token gate on each vector;
* :mod:`~steer_lens.vectors.ablate` - :class:`AblateAddVectors`, ablate the direction then add it back;
* :mod:`~steer_lens.vectors.selected` - :class:`SelectedVectors`, one vector per variable, chosen per token;
* :mod:`~steer_lens.vectors.registry` - ``kind`` name -> class, for loading saved folders;
* :mod:`~steer_lens.vectors.io` - atomic safetensors / JSON writes used by every save.
"""

from __future__ import annotations

from steer_lens.vectors.ablate import AblateAddVectors
from steer_lens.vectors.base import SteeringVectors
from steer_lens.vectors.gated import GatedVectors
from steer_lens.vectors.lowrank import LowRankVectors
from steer_lens.vectors.registry import register_kind, vector_kinds
from steer_lens.vectors.selected import SelectedVectors, selection_index

__all__ = [
    "AblateAddVectors",
    "GatedVectors",
    "LowRankVectors",
    "SelectedVectors",
    "SteeringVectors",
    "register_kind",
    "selection_index",
    "vector_kinds",
]
