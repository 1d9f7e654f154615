"""The natural steering vector of a LoRA (Wang, Engels & Clive-Griffin 2025, "Simple Mechanistic
Explanations for Out-Of-Context Reasoning"): the first principal component of its per-token deltas
at a sub-layer output, scaled by their mean norm (see :func:`natural_vector`)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError
from steer_lens.lora.adapter import LoraAdapter
from steer_lens.lora.comparison import Texts, collect_texts
from steer_lens.models import HookedModel

__all__ = ["natural_vector"]


# ---------------------------------------------------------------------------------------------------
# natural vector (Wang, Engels & Clive-Griffin 2025)
# ---------------------------------------------------------------------------------------------------
# Read in JoshEngels/OOCR-Interp, the script that defines ``save_first_pca_vector`` and
# ``load_vector_and_evaluate`` (its path is not recorded by the code index used; it is the script that
# loads ``/workspace/OOCR-Interp/sweep/locations/...``). Lines of that file:
#   l.18-22   perform_pca: sklearn ``PCA(n_components=4).fit_transform`` of the deltas -> centred PCA
#   l.111-167 get_output_diffs: forward hooks on ``language_model.layers.{L}.mlp`` (the HF MLP module,
#             i.e. before Gemma-3's post_feedforward_layernorm); ``diff = lora_out - base_out`` (l.167)
#   l.190     ``avg_length = diff.norm(dim=-1).mean()``: mean per-token delta norm
#   l.205     ``first_pca_vector = pca.components_[0]`` (unit; sklearn's sign, no orientation)
#   l.208     returns ``pca.explained_variance_ratio_[0]``
#   l.223     UnconditionalHook adds the vector at every position of the MLP output
#   l.230     ``pca_vector = pca_vector * avg_length``
def _post_norm_reason(model: HookedModel) -> str | None:
    """Why this model's ``hook_attn_out`` / ``hook_mlp_out`` come after a norm (``None``: they do not)."""
    cfg = model.cfg
    if getattr(cfg, "use_normalization_before_and_after", False):
        return "use_normalization_before_and_after (Gemma-2/3: ln1_post / ln2_post after attention and MLP)"
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - other TransformerLens versions
        return None
    if getattr(cfg, "original_architecture", None) in set(POST_NORM_ARCHITECTURES):
        return f"{cfg.original_architecture} normalises each sub-layer's output before its hook"
    return None


def _pc1_times_mean_norm(
    D: Float[Tensor, "n_tokens d_model"],
) -> tuple[Float[Tensor, " d_model"], float, float]:
    """``(pc1 · mean_t ‖Δ_t‖, explained-variance ratio of PC1, mean_t ‖Δ_t‖)`` of one site's deltas.

    PC1 is the top eigenvector of the *centred* covariance (as sklearn's PCA in the paper's code),
    signed so that ``pc1 · mean Δ >= 0``. When the centred variance is zero (all Δ_t equal, or one
    token) PC1 is undefined: the mean's direction is used and the ratio is ``nan``.
    """
    D = D.double()
    mu = D.mean(0)
    mean_norm = float(D.norm(dim=1).mean())
    C = (D - mu).T @ (D - mu)
    evals, evecs = torch.linalg.eigh(C)
    total = float(evals.clamp(min=0).sum())
    energy = float((D * D).sum())
    if total <= 1e-12 * max(energy, 1e-300):
        pc1, ratio = (mu / mu.norm() if float(mu.norm()) > 0 else torch.zeros_like(mu)), float("nan")
    else:
        pc1, ratio = evecs[:, -1], float(evals[-1] / total)
        if float(pc1 @ mu) < 0:
            pc1 = -pc1
    return (pc1 * mean_norm).float(), ratio, mean_norm


@torch.no_grad()
def natural_vector(model: HookedModel, lora: LoraAdapter, texts: Texts, *, batch_size: int = 16) -> Any:
    """The LoRA's *natural steering vector* of Wang et al. 2025: ``pc1(Δ) · mean_t ‖Δ_t‖`` per site.

    At each sub-layer output hook the adapter changes (``blocks.L.hook_mlp_out`` for an MLP LoRA,
    ``blocks.L.hook_attn_out`` for attention), the per-token deltas ``Δ_t = out_LoRA − out_base``
    (``Float[Tensor, "n_tokens d_model"]``, residual-stream units, every real token of ``texts``
    including BOS, as :func:`mean_delta_vector` collects them) give

        v = pc1 · (1/n) Σ_t ‖Δ_t‖₂

    where ``pc1`` is the unit first principal component of the **centred** deltas (top eigenvector of
    ``Σ_t (Δ_t − Δ̄)(Δ_t − Δ̄)ᵀ``, float64), as sklearn's ``PCA`` in the paper's code. The paper adds
    ``v`` at every position of the MLP output. PC1's sign is arbitrary (the paper keeps sklearn's
    sign and does not orient it); here it is chosen so that ``v`` points the way of the mean delta,
    ``v · Δ̄ >= 0``. If the centred variance is zero (every Δ_t equal, or a single token) PC1 is
    undefined and the mean delta's direction is used. A site whose deltas are all zero gets ``v = 0``.

    Paper: Wang, Engels & Clive-Griffin 2025, "Simple Mechanistic Explanations for Out-Of-Context
    Reasoning"; code JoshEngels/OOCR-Interp, the script defining ``save_first_pca_vector``: centred
    sklearn PCA l.18-22, mean delta norm l.190, ``pca.components_[0]`` l.205, explained variance
    l.208, ``pca_vector * avg_length`` l.230, added at every position of the MLP output l.223
    (deltas at the HF ``mlp`` module, l.111-167). The paper computes the deltas on one text; pass one
    text to do the same.

    Args:
        model: the base ``HookedTransformer``.
        lora: the adapter (:func:`~steer_lens.lora.load_adapter`).
        texts: texts (BOS is prepended) or token ids, as :func:`compare`.
        batch_size: texts per forward pass.

    Returns:
        A :class:`~steer_lens.SteeredTransformer` on ``model`` with ``positions="all"`` and one vector
        ``Float[Tensor, "d_model"]`` per changed site; ``training_config`` records ``source``
        (``"lora.natural_vector"``), ``modules``, ``n_tokens``, ``explained_variance`` (PC1's share of
        the centred variance per site, ``nan`` where PC1 is undefined), ``mean_delta_norm`` per site,
        ``centred=True`` and ``sign="mean delta"``.

    Raises:
        ConfigError: the model writes its sub-layer outputs through a norm (Gemma-2/3's
            ``ln1_post``/``ln2_post``, OLMo-2 post-norm): the paper takes and adds the vector before that
            norm, and TransformerLens has no hook point there.
        As :func:`compare` otherwise (EmptyInputError, SequenceTooLongError, ShapeMismatchError, ...).
    """
    from steer_lens.steering import SteeredTransformer

    reason = _post_norm_reason(model)
    if reason is not None:
        raise ConfigError(
            f"natural_vector: this model's hook_attn_out / hook_mlp_out come after a norm ({reason}). "
            "The paper takes the LoRA deltas at the MLP module's output, before the post-MLP norm, and "
            "adds the vector there; TransformerLens has no hook point between the MLP and that norm. "
            "Fix: use a model without post-sub-layer norms, or use mean_delta_vector / compare, which "
            "work at the hooks TransformerLens has."
        )
    c = collect_texts(model, lora, texts, batch_size, resid=False)
    vectors: dict[str, Tensor] = {}
    ratios: dict[str, float] = {}
    norms: dict[str, float] = {}
    for s, d in c.deltas.items():
        vectors[s], ratios[s], norms[s] = _pc1_times_mean_norm(torch.cat(d))
    steered = SteeredTransformer(model, hooks=list(vectors), init=vectors)
    steered.training_config = {
        "source": "lora.natural_vector",
        "modules": lora.names,
        "n_tokens": int(c.n_real),
        "explained_variance": ratios,
        "mean_delta_norm": norms,
        "centred": True,
        "sign": "mean delta",
    }
    return steered
