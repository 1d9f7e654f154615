"""Top-activating examples of the LoRA-state SAE's latents (Ward et al. 2025's dashboards).

Split out of :mod:`steer_lens.lora.state_sae`; as ``3_lora_sae/3.1_collect_sae_features.py:61-114`` of
jnward/reasoning-lora-interp.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens.errors import ConfigError
from steer_lens.lora.state_sae import LoraActivationState, LoraStateSAE
from steer_lens.sae.features import FeatureTopTokens

__all__ = ["top_activating_examples"]


@torch.no_grad()
def top_activating_examples(
    sae: LoraStateSAE,
    state: LoraActivationState,
    latents: int | list[int] | Int[Tensor, " n_latents"],
    *,
    n: int = 10,
    window: int = 8,
    mode: str = "batch",
) -> FeatureTopTokens:
    """The ``n`` tokens where each latent's activation × ‖W_dec‖ is largest, with their context.

    As the paper's dashboards (``3_lora_sae/3.1_collect_sae_features.py:61-114``: per latent the
    top-``n`` positive activations over all tokens, with the tokens around them); within one latent,
    ranking by activation × ‖W_dec‖ is ranking by activation. Only positive activations are kept.

    Args:
        sae: the trained :class:`LoraStateSAE`.
        state: the :class:`LoraActivationState` to search (its texts give the context).
        latents: latent ids.
        n: examples per latent.
        window: tokens of context on each side.
        mode: ``"batch"`` (the paper's) or ``"threshold"`` (see :meth:`LoraStateSAE.encode`).

    Returns:
        :class:`~steer_lens.sae.FeatureTopTokens` (``.to_pandas()``, ``.token_view(latent)``): per latent
        ``(activation, text, position, token, context)``; the context's other tokens carry their own
        activation of the latent (0 where the state has no row, e.g. BOS).

    Raises:
        ConfigError: a latent outside ``[0, d_sae)``, ``n`` or ``window`` invalid, unknown ``mode``.
        ShapeMismatchError: the state's columns differ from the SAE's.
    """
    feats = [latents] if isinstance(latents, int) else [int(f) for f in
                                                        (latents.tolist() if isinstance(latents, Tensor) else latents)]
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad or not feats:
        raise ConfigError(f"latents: expected ids in [0, {sae.d_sae}), got {feats}.")
    for name, v, lo in (("n", n, 1), ("window", window, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name}: expected an integer >= {lo}, got {v!r}.")
    acts = sae.encode(state, mode=mode)[:, feats]
    top = torch.topk(acts, min(n, acts.shape[0]), dim=0)
    lookup = {tp: i for i, tp in enumerate(zip(state.text.tolist(), state.position.tolist(), strict=True))}
    examples: dict[int, list] = {}
    contexts: dict[int, list] = {}
    for j, f in enumerate(feats):
        ex, ctx = [], []
        for val, row in zip(top.values[:, j].tolist(), top.indices[:, j].tolist(), strict=True):
            if val <= 0:
                break
            ti, pi = int(state.text[row]), int(state.position[row])
            strs = state.str_tokens[ti]
            lo, hi = max(0, pi - window), min(len(strs), pi + window + 1)
            vals = [float(acts[lookup[(ti, q)], j]) if (ti, q) in lookup else 0.0 for q in range(lo, hi)]
            ex.append((float(val), ti, pi, strs[pi], "".join(strs[lo:hi])))
            ctx.append((list(strs[lo:hi]), vals))
        examples[f], contexts[f] = ex, ctx
    return FeatureTopTokens(features=feats, examples=examples, contexts=contexts)
