"""Advantage estimators for RL of steering vectors, registered by name.

An advantage estimator turns one step's rewards, grouped ``[groups, k]`` (row ``g`` holds the ``k``
completions of one prompt), into advantages of the same shape. :func:`~steer_lens.train.rl.rl` looks
the estimator up by ``RLConfig.algorithm`` in a small registry (the pattern of sae-lens's
``registry.py``), and the ``steer-lens train rl --algorithm`` choices are the registry's names, so a
new estimator is one decorated function:

.. code-block:: python

    from steer_lens.train.rl import register_advantage

    @register_advantage("mean_centred")
    def mean_centred(rewards):  # [groups, k] -> [groups, k]
        return rewards - rewards.mean(-1, keepdim=True)

A stateful estimator (one that carries something from step to step, as REINFORCE's moving-average
baseline) is a class: it is instantiated once per run with the :class:`~steer_lens.train.rl.RLConfig`
and called once per batch of rollouts.

Built in:

* ``"rloo"`` (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` (leave-one-out);
* ``"grpo"`` (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)``, 0
  for a group whose rewards are all equal;
* ``"reinforce"`` (Williams 1992): ``A_i = r_i - b`` with a moving-average baseline
  ``b <- decay * b + (1 - decay) * mean(r)`` (``b`` starts at the first batch's mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError

__all__ = [
    "AdvantageEstimator",
    "AdvantageSpec",
    "Reinforce",
    "advantage_names",
    "estimator_state",
    "get_advantage",
    "grpo_advantages",
    "register_advantage",
    "reinforce_advantages",
    "rloo_advantages",
    "unregister_advantage",
]


@runtime_checkable
class AdvantageEstimator(Protocol):
    """What an estimator is: ``f(rewards [groups, k]) -> advantages [groups, k]`` (reward units or unitless)."""

    def __call__(self, rewards: Float[Tensor, "groups k"]) -> Float[Tensor, "groups k"]: ...


@dataclass(frozen=True)
class AdvantageSpec:
    """One registered estimator.

    Attributes:
        name: the name ``RLConfig.algorithm`` and the CLI's ``--algorithm`` use.
        factory: ``factory(config) -> AdvantageEstimator``, called once per run (a fresh state).
        min_group_size: the smallest ``group_size`` the estimator accepts (2 for group baselines).
        description: one line for the CLI help.
    """

    name: str
    factory: Callable[[Any], AdvantageEstimator]
    min_group_size: int
    description: str

    def make(self, config: Any) -> AdvantageEstimator:
        """A fresh estimator for one run with ``config`` (an :class:`~steer_lens.train.rl.RLConfig`)."""
        return self.factory(config)


_REGISTRY: dict[str, AdvantageSpec] = {}


def register_advantage(
    name: str, *, min_group_size: int = 2, description: str | None = None, replace: bool = False
) -> Callable[[Any], Any]:
    """Decorator registering an advantage estimator under ``name``.

    Decorate a function ``f(rewards [groups, k]) -> [groups, k]`` (stateless), or a class whose
    ``__init__(config)`` takes the :class:`~steer_lens.train.rl.RLConfig` and whose instances are
    estimators (stateful: one instance per run). The decorated object is returned unchanged.

    Args:
        name: the algorithm name (``RLConfig(algorithm=name)``, ``--algorithm name``).
        min_group_size: the smallest ``group_size`` it accepts (``RLConfig`` checks it).
        description: one line for the CLI help (default: the first line of the docstring).
        replace: allow re-registering an existing name.

    Raises:
        ConfigError: ``name`` is taken (and ``replace`` is False), or ``min_group_size < 1``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_advantage: expected a non-empty name, got {name!r}.")
    if name in _REGISTRY and not replace:
        raise ConfigError(
            f"register_advantage: {name!r} is already registered ({sorted(_REGISTRY)}). "
            "Fix: choose another name, or pass replace=True."
        )
    if not (isinstance(min_group_size, int) and min_group_size >= 1):
        raise ConfigError(f"register_advantage: min_group_size: expected an int >= 1, got {min_group_size!r}.")

    def decorate(obj: Any) -> Any:
        factory = obj if isinstance(obj, type) else (lambda config: obj)
        doc = description or ((obj.__doc__ or name).strip().splitlines() or [name])[0]
        _REGISTRY[name] = AdvantageSpec(name, factory, min_group_size, doc)
        return obj

    return decorate


def unregister_advantage(name: str) -> None:
    """Remove the estimator registered as ``name`` (e.g. one a notebook or test added).

    Raises:
        ConfigError: no estimator of that name.
    """
    get_advantage(name)
    del _REGISTRY[name]


def get_advantage(name: str) -> AdvantageSpec:
    """The registered estimator called ``name``.

    Raises:
        ConfigError: no estimator of that name (the message lists the registered ones).
    """
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(
            f"algorithm: expected one of {advantage_names()}, got {name!r}. "
            "Fix: use a registered name, or register one with steer_lens.train.rl.register_advantage."
        )
    return spec


def advantage_names() -> list[str]:
    """The registered estimator names, in registration order (``rloo``, ``grpo``, ``reinforce`` first)."""
    return list(_REGISTRY)


def _need_pairs(fn: str, rewards: Tensor) -> int:
    k = rewards.shape[-1]
    if k < 2:
        raise ConfigError(f"{fn}: each group needs k >= 2 completions, got k={k}.")
    return k


@register_advantage("rloo", description="leave-one-out baseline (Ahmadian et al. 2024)")
def rloo_advantages(rewards: Float[Tensor, "groups k"]) -> Float[Tensor, "groups k"]:
    """RLOO advantages: ``A_i = r_i - mean_{j != i} r_j`` within each group (Ahmadian et al. 2024).

    Args:
        rewards: ``[groups, k]`` rewards, one row per prompt, ``k >= 2`` completions each.

    Returns:
        ``[groups, k]`` advantages (in reward units); they sum to 0 in each group.

    Raises:
        ConfigError: ``k < 2``.
    """
    k = _need_pairs("rloo_advantages", rewards)
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


@register_advantage("grpo", description="group mean and std (Shao et al. 2024, GRPO)")
def grpo_advantages(rewards: Float[Tensor, "groups k"], eps: float = 1e-4) -> Float[Tensor, "groups k"]:
    """GRPO advantages: ``(r_i - mean) / (std + eps)`` within each group (Shao et al. 2024).

    ``std`` is the unbiased standard deviation of the group (as in TRL's GRPO); a group whose rewards
    are all equal (``std = 0``) gets advantages exactly 0.

    Args:
        rewards: ``[groups, k]``, ``k >= 2``.
        eps: added to the std.

    Returns:
        ``[groups, k]`` advantages (unitless).

    Raises:
        ConfigError: ``k < 2``.
    """
    _need_pairs("grpo_advantages", rewards)
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    adv = (rewards - mean) / (std + eps)
    return torch.where(std > 0, adv, torch.zeros_like(adv))


def reinforce_advantages(
    rewards: Float[Tensor, " batch"], baseline: Float[Tensor, ""] | None, decay: float = 0.9
) -> tuple[Float[Tensor, " batch"], Float[Tensor, ""]]:
    """REINFORCE with a moving-average baseline: ``A_i = r_i - b`` (Williams 1992).

    Args:
        rewards: ``[batch]`` rewards of this step.
        baseline: the running baseline ``b`` (``None`` at the first step: ``b`` = this batch's mean).
        decay: ``b_new = decay * b + (1 - decay) * mean(rewards)``.

    Returns:
        ``(advantages [batch], new baseline)``; the advantages use the baseline *before* this batch.
    """
    mean = rewards.mean()
    b = mean if baseline is None else baseline
    return rewards - b, decay * b + (1 - decay) * mean


@register_advantage("reinforce", min_group_size=1,
                    description="moving-average baseline (Williams 1992, REINFORCE)")
class Reinforce:
    """The stateful ``"reinforce"`` estimator: :func:`reinforce_advantages` with its baseline kept per run.

    Args:
        config: the :class:`~steer_lens.train.rl.RLConfig` (its ``baseline_decay``).

    Attributes:
        baseline: the running baseline ``b`` (``None`` before the first batch).
    """

    def __init__(self, config: Any) -> None:
        self.decay = float(config.baseline_decay)
        self.baseline: Tensor | None = None

    def state_dict(self) -> dict[str, Tensor | None]:
        """The baseline (saved with RL checkpoints, so a resumed run continues with it)."""
        return {"baseline": None if self.baseline is None else self.baseline.detach().clone()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Restore :meth:`state_dict`'s baseline."""
        b = state.get("baseline")
        self.baseline = None if b is None else b.clone()

    def __call__(self, rewards: Float[Tensor, "groups k"]) -> Float[Tensor, "groups k"]:
        """Advantages of one batch (all groups share the baseline); updates the baseline."""
        adv, self.baseline = reinforce_advantages(rewards.reshape(-1), self.baseline, self.decay)
        return adv.view_as(rewards)


def estimator_state(estimator: Any) -> dict[str, Tensor | None] | None:
    """A copy of a stateful estimator's state (its ``state_dict()``), or ``None`` for a stateless one.

    A stateful estimator (a class registered with :func:`register_advantage`) that defines
    ``state_dict()`` / ``load_state_dict(state)`` (tensor or ``None`` values) is checkpointed with
    :func:`~steer_lens.train.rl.rl`'s runs and resumed exactly; without them its state starts afresh
    on ``resume=True``.
    """
    if not hasattr(estimator, "state_dict") or not hasattr(estimator, "load_state_dict"):
        return None
    return {k: None if v is None else v.detach().clone() for k, v in estimator.state_dict().items()}

