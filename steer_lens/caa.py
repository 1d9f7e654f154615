"""Contrastive activation addition (CAA): a steering vector as a difference of mean activations.

``v_h = mean_{x in positive} a_h(x) - mean_{x in negative} a_h(x)`` at each hook ``h``. Rimsky et al.
2024, "Steering Llama 2 via Contrastive Activation Addition", take the activation at the answer token
(the last token); ActAdd-style concept vectors (Turner et al. 2023) average over tokens. Pass the
result as ``init=`` to :class:`~steer_lens.SteeredTransformer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.models import check_hook_names

__all__ = ["difference_of_means"]


@torch.no_grad()
def difference_of_means(
    model,
    hooks: Sequence[str] | str,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    position: Literal["mean", "last"] = "mean",
) -> dict[str, Float[Tensor, " d_model"]]:
    """Difference of mean activations between two sets of prompts at each hook (the CAA vector).

    ``v_h = mean_{x in positive} a_h(x) - mean_{x in negative} a_h(x)``, where ``a_h(x)`` is the
    activation at hook ``h`` averaged over the prompt's tokens (``position="mean"``, as in ActAdd-style
    concept vectors; BOS excluded) or taken at its last token (``position="last"``, as in contrastive
    activation addition, Rimsky et al. 2024, where the answer letter is last).

    Args:
        model: the model (unsteered).
        hooks: hook name(s).
        positive, negative: prompt texts (non-empty lists).
        position: ``"mean"`` or ``"last"``.

    Returns:
        ``{hook_name: vector [d_model]}`` in fp32, ready for ``SteeredTransformer(..., init=...)``.

    Raises:
        EmptyInputError: an empty prompt list.
        HookNameError: unknown hook.
        ConfigError: bad ``position``.
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    if not positive or not negative:
        raise EmptyInputError("difference_of_means needs at least one positive and one negative prompt.")
    if position not in ("mean", "last"):
        raise ConfigError(f"position: expected 'mean' or 'last', got {position!r}.")
    check_hook_names(model, list(hooks))

    def mean_act(texts: Sequence[str]) -> dict[str, Tensor]:
        sums = {h: torch.zeros(int(model.cfg.d_model), dtype=torch.float64) for h in hooks}
        for t in texts:
            toks = model.to_tokens(t, prepend_bos=True)
            _, cache = model.run_with_cache(toks, names_filter=list(hooks))
            for h in hooks:
                a = cache[h][0].double().cpu()
                a = a[-1] if position == "last" else (a[1:].mean(0) if a.shape[0] > 1 else a[0])
                sums[h] += a
        return {h: s / len(texts) for h, s in sums.items()}

    pos, neg = mean_act(positive), mean_act(negative)
    return {h: (pos[h] - neg[h]).float() for h in hooks}
