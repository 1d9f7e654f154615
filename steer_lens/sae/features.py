"""A steering vector in an SAE's feature space, and views of single features.

* :func:`vector_features`: which SAE features the vector points along: cosine with every decoder
  direction, the encoder's (linear) pre-activation of the vector, and its best k-sparse
  reconstruction from decoder directions by orthogonal matching pursuit (Pati et al. 1993), with the
  residual norm.
* :func:`top_activating_tokens`: the tokens on which features fire most over a corpus (circuitsvis).
* :func:`feature_logit_lens`: a feature's decoder direction read through the unembedding (logit lens,
  nostalgebraist 2020), i.e. which tokens the feature promotes directly.
"""

from __future__ import annotations

import heapq
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import token_strings, unwrap
from steer_lens.errors import ConfigError, HookNameError
from steer_lens.results import Result
from steer_lens.sae import _core
from steer_lens.sae._core import HookMismatchWarning, ModelLike, SAELike
from steer_lens.steering import SteeredTransformer

__all__ = [
    "FeatureLogitLens",
    "FeatureTopTokens",
    "VectorFeatures",
    "feature_logit_lens",
    "top_activating_tokens",
    "vector_features",
]

logger = logging.getLogger(__name__)


def decoder_directions(sae) -> Float[Tensor, "d_sae d_in"]:
    """The SAE's decoder rows as they act on the input space (``rescale_acts_by_decoder_norm`` SAEs
    divide activations by the row norm, so their effective rows are unit vectors)."""
    W = sae.W_dec.detach().float()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        W = W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return W


def encoder_matrix(sae) -> Float[Tensor, "d_in d_sae"]:
    """The linear part of the encoder's pre-activation (``rescale_acts_by_decoder_norm`` included)."""
    W = sae.W_enc.detach().float()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        W = W * sae.W_dec.detach().float().norm(dim=-1)[None, :]
    return W


def steering_vector(steered, hook: str | None, sae_hook_name: str) -> tuple[str, Tensor]:
    """Pick the vector to decompose: ``hook``, else the one at the SAE's hook, else the first."""
    names = list(steered.hook_names)
    if hook is None:
        if sae_hook_name in names:
            hook = sae_hook_name
        else:
            hook = names[0]
            if len(names) > 1:
                logger.info("the steered model has vectors at %s; decomposing %s", names, hook)
    elif hook not in names:
        raise HookNameError(
            f"hook: the steered model has no vector at {hook!r}; its vectors are at {names}."
        )
    v = steered.vectors.direction(hook).detach().float().cpu() * float(steered.scale)
    return hook, v


def omp(
    target: Float[Tensor, " d"], dictionary: Float[Tensor, "n d"], k: int
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"], Float[Tensor, " k"]]:
    """Orthogonal matching pursuit: greedily pick ``k`` rows of ``dictionary`` whose least-squares
    combination best reconstructs ``target``.

    Returns:
        ``(indices, coefficients, residual_norms)``: chosen rows in order, their least-squares
        coefficients on the *given* rows (so ``target ~ coefficients @ dictionary[indices]``), and the
        residual norm after each step.
    """
    t = target.double()
    D = dictionary.double()
    Dn = D / D.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    chosen: list[int] = []
    res = t.clone()
    norms = []
    coef = torch.zeros(0, dtype=torch.float64)
    for _ in range(min(k, D.shape[0])):
        scores = (Dn @ res).abs()
        if chosen:
            scores[chosen] = -1.0
        chosen.append(int(scores.argmax()))
        A = D[chosen].T  # [d, s]
        coef = torch.linalg.lstsq(A, t[:, None]).solution[:, 0]
        res = t - A @ coef
        norms.append(float(res.norm()))
    return torch.tensor(chosen, dtype=torch.long), coef.float(), torch.tensor(norms)


@dataclass(frozen=True, kw_only=True)
class VectorFeatures(Result):
    """A steering vector expressed in an SAE's features (see :func:`vector_features`).

    Attributes:
        hook: hook point of the vector.
        sae_hook: hook point the SAE reads.
        same_hook: whether they are the same. When not, the static decomposition compares vectors of
            different layers; use :func:`~steer_lens.analysis.activation_shift` for what the vector does at
            the SAE's hook.
        note: a human-readable remark (e.g. about a hook mismatch); empty when none.
        vector_norm: norm of the vector (scale included), residual-stream units.
        cosine: ``[d_sae]`` cosine between the vector and each decoder direction.
        pre_activation: ``[d_sae]`` the encoder's linear pre-activation of the vector, ``v @ W_enc``
            (bias excluded: the change in pre-activation the vector would cause on its own).
        top_cosine, top_pre_activation: ``[k]`` feature ids sorted by descending value.
        sparse_features: ``[k]`` features picked by orthogonal matching pursuit, in order.
        sparse_coefficients: ``[k]`` their coefficients on the decoder directions (``v ~ sum c_i d_i``).
        sparse_residual_norms: ``[k]`` residual norm after 1..k features.
        residual_norm: final residual norm ``||v - sum c_i d_i||``.
    """

    hook: str
    sae_hook: str
    same_hook: bool
    note: str
    vector_norm: float
    cosine: Float[Tensor, " d_sae"] = field(repr=False)
    pre_activation: Float[Tensor, " d_sae"] = field(repr=False)
    top_cosine: Int[Tensor, " k"]
    top_pre_activation: Int[Tensor, " k"]
    sparse_features: Int[Tensor, " k"]
    sparse_coefficients: Float[Tensor, " k"]
    sparse_residual_norms: Float[Tensor, " k"] = field(repr=False)
    residual_norm: float

    @property
    def relative_residual(self) -> float:
        """``residual_norm / vector_norm`` (0: the k features reconstruct the vector exactly)."""
        return self.residual_norm / self.vector_norm if self.vector_norm > 0 else float("nan")

    def to_pandas(self, by: Literal["cosine", "pre_activation", "sparse"] = "cosine"):
        """Table of the top features: ``feature``, ``cosine``, ``pre_activation`` (and for
        ``by="sparse"`` the OMP ``coefficient`` and ``residual_norm`` after adding the feature)."""
        import pandas as pd

        if by == "cosine":
            idx = self.top_cosine
        elif by == "pre_activation":
            idx = self.top_pre_activation
        elif by == "sparse":
            idx = self.sparse_features
        else:
            raise ConfigError(f"by: expected 'cosine', 'pre_activation' or 'sparse', got {by!r}.")
        df = pd.DataFrame({
            "feature": idx.tolist(),
            "cosine": self.cosine[idx].tolist(),
            "pre_activation": self.pre_activation[idx].tolist(),
        })
        if by == "sparse":
            df["coefficient"] = self.sparse_coefficients.tolist()
            df["residual_norm"] = self.sparse_residual_norms.tolist()
        return df

    def plot(self):
        """Top features by cosine (bars) and the OMP residual norm against sparsity (plotly Figure)."""
        from steer_lens import plotting

        idx = self.top_cosine
        cos = plotting.bar(self.cosine[idx], [f"f{i}" for i in idx.tolist()], x_title="feature")
        ks = list(range(1, len(self.sparse_residual_norms) + 1))
        rel = self.sparse_residual_norms / max(self.vector_norm, 1e-12)
        omp = plotting.lines({"residual / ||v||": (ks, rel)}, x_title="features used",
                             y_title="relative residual norm")
        fig = plotting.grid([[cos, omp]], titles=["cosine(vector, decoder direction)", "k-sparse reconstruction (OMP)"],
                            title=f"vector at {self.hook} in SAE features ({self.sae_hook})"
                                  + ("" if self.same_hook else " — different hooks"), height=450, showlegend=False)
        fig.update_yaxes(range=[0, 1.05], row=1, col=2)
        return fig

    def _summary(self) -> str:
        head = f"vector at <code>{self.hook}</code> (norm {self.vector_norm:.3g}), SAE at <code>{self.sae_hook}</code>"
        head += f"; {len(self.sparse_features)}-sparse relative residual {self.relative_residual:.3f}"
        return head + (f"</p><p><b>note:</b> {self.note}" if self.note else "")


@torch.no_grad()
def vector_features(steered: SteeredTransformer, sae: SAELike, k: int = 20, *, hook: str | None = None) -> VectorFeatures:
    """Express a steering vector in an SAE's features.

    Three views of the vector ``v`` (scale included) against the SAE's dictionary:

    1. cosine between ``v`` and each decoder direction ``d_i`` (which features it points along);
    2. the encoder's linear pre-activation ``v @ W_enc`` (how much adding ``v`` raises each feature's
       pre-activation, bias excluded);
    3. the best ``k``-sparse reconstruction ``v ~ sum_i c_i d_i`` by orthogonal matching pursuit, with
       its residual norm (how much of the vector the dictionary cannot express with k features).

    When the vector is not at the SAE's hook the comparison is across layers: a
    :class:`HookMismatchWarning` is issued and ``note`` says so; :func:`~steer_lens.analysis.activation_shift`
    measures what the vector does at the SAE's hook instead.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        sae: a sae-lens SAE or :class:`~steer_lens.sae.TrainedSAE` on the same model.
        k: number of top features in each view (and the sparsity of the reconstruction).
        hook: which of the steered model's vectors (default: the one at the SAE's hook, else the first).

    Returns:
        :class:`VectorFeatures`.

    Raises:
        ConfigError: ``k < 1``. HookNameError: ``hook`` has no vector, or the SAE's hook is not in the
        model. ShapeMismatchError: the SAE's ``d_in`` is not the vector's width.
    """
    sae = _core.as_sae(sae)
    model = unwrap(steered)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k: expected a positive integer, got {k!r}.")
    sae_h = _core.check_sae(model, sae)
    hook, v = steering_vector(steered, hook, sae_h)
    D = decoder_directions(sae).cpu()
    k = min(k, D.shape[0])
    vnorm = float(v.norm())
    cos = (D @ v) / (D.norm(dim=-1) * v.norm()).clamp(min=1e-12)
    pre = v @ encoder_matrix(sae).cpu()
    idx, coef, norms = omp(v, D, k)
    note = ""
    if hook != sae_h:
        note = (
            f"the vector is at {hook!r} but the SAE reads {sae_h!r}: cosines compare directions of "
            "different layers. Use sl.analysis.activation_shift(steered, sae, texts) for the vector's effect "
            "at the SAE's hook."
        )
        warnings.warn(note, HookMismatchWarning, stacklevel=2)
    return VectorFeatures(
        hook=hook, sae_hook=sae_h, same_hook=hook == sae_h, note=note, vector_norm=vnorm,
        cosine=cos, pre_activation=pre,
        top_cosine=torch.topk(cos, k).indices, top_pre_activation=torch.topk(pre, k).indices,
        sparse_features=idx, sparse_coefficients=coef, sparse_residual_norms=norms,
        residual_norm=float(norms[-1]) if len(norms) else vnorm,
    )


# ---------------------------------------------------------------------------------------------------
# feature views
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FeatureTopTokens(Result):
    """Top-activating tokens of features over a corpus (see :func:`top_activating_tokens`).

    Attributes:
        features: the feature ids.
        examples: per feature, a list of ``(activation, text_index, position, token, context)``, sorted
            by descending activation; ``position`` counts from the text's first token (BOS for
            strings), ``context`` is the text around it.
        contexts: per feature and example, ``(tokens, activations)`` of a window around the position,
            for circuitsvis.
    """

    features: list[int]
    examples: dict[int, list[tuple[float, int, int, str, str]]]
    contexts: dict[int, list[tuple[list[str], list[float]]]] = field(repr=False)

    def to_pandas(self):
        """One row per (feature, example): activation, text index, position, token, context."""
        import pandas as pd

        rows = [
            {"feature": f, "rank": r, "activation": a, "text": t, "position": p, "token": tok,
             "context": ctx}
            for f in self.features for r, (a, t, p, tok, ctx) in enumerate(self.examples[f])
        ]
        return pd.DataFrame(rows)

    def token_view(self, feature: int | None = None):
        """circuitsvis ``colored_tokens`` of the top examples' contexts for one feature (the first by
        default), one context per line; returns the circuitsvis object (renders in Jupyter).

        Raises:
            ConfigError: ``feature`` was not analysed.
        """
        from steer_lens.plotting import token_view

        f = self.features[0] if feature is None else feature
        if f not in self.contexts:
            raise ConfigError(f"feature: {f} was not analysed; analysed features: {self.features}.")
        return token_view([toks for toks, _ in self.contexts[f]], [acts for _, acts in self.contexts[f]])

    def plot(self):
        """Bar chart of the top activation per example per feature (plotly Figure)."""
        from steer_lens.plotting import bars

        return bars({f"f{f}": ([e[3] for e in self.examples[f]], [e[0] for e in self.examples[f]])
                     for f in self.features},
                    hovertext={f"f{f}": [e[4] for e in self.examples[f]] for f in self.features},
                    title="top-activating tokens", y_title="feature activation")


@torch.no_grad()
def top_activating_tokens(
    model: ModelLike, sae: SAELike, features: list[int] | Tensor, texts: Any, *, n: int = 10, window: int = 8,
    batch_size: int = 16,
) -> FeatureTopTokens:
    """The ``n`` tokens with the largest activation of each feature over a corpus (the classic feature
    dashboard view, Bricken et al. 2023), streamed (memory ``O(features * n)`` beyond one batch).

    Args:
        model: a HookedTransformer or SteeredTransformer (its base model, vectors off).
        sae: a sae-lens SAE or TrainedSAE.
        features: feature ids.
        texts: corpus (strings or token ids).
        n: examples per feature.
        window: tokens of context on each side of the position.
        batch_size: texts per forward pass.

    Returns:
        :class:`FeatureTopTokens` (``.token_view(f)`` for circuitsvis).

    Raises:
        ConfigError: a feature id outside ``[0, d_sae)``. EmptyInputError: no texts.
    """
    model = unwrap(model)
    sae = _core.as_sae(sae)
    _core.check_nonempty(texts)
    hook = _core.check_sae(model, sae)
    feats = [int(f) for f in (features.tolist() if isinstance(features, Tensor) else features)]
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad or not feats:
        raise ConfigError(f"features: expected ids in [0, {d_sae}), got {feats}.")
    heaps: dict[int, list] = {f: [] for f in feats}
    fidx = torch.tensor(feats)
    text_i = 0
    counter = 0
    for batch in _core.iter_batches(model, texts, batch_size=batch_size):
        x, _ = _core.capture(model.run_with_hooks, batch.tokens, hook,
                       {**_core.run_kwargs(model, hook, batch, stop=True), "return_type": None})
        acts = sae.encode(x.to(sae.dtype))[..., fidx.to(sae.W_dec.device)].float().cpu()
        acts = acts.masked_fill(~batch.count.cpu()[..., None], float("-inf"))
        b, p, nf = acts.shape
        top = torch.topk(acts.reshape(b * p, nf), min(n, b * p), dim=0)
        toks = batch.tokens.cpu()
        pad = (batch.attention_mask.cpu() == 0).sum(1).tolist()  # left padding per row
        for j, f in enumerate(feats):
            for val, flat in zip(top.values[:, j].tolist(), top.indices[:, j].tolist(), strict=True):
                if val <= 0:
                    continue
                bi, pi = divmod(flat, p)
                counter += 1
                o = pad[bi]
                item = (val, counter, text_i + bi, pi - o, bi)
                entry = (item, toks[bi, o:], acts[bi, o:, j])
                if len(heaps[f]) < n:
                    heapq.heappush(heaps[f], entry)
                elif val > heaps[f][0][0][0]:
                    heapq.heapreplace(heaps[f], entry)
        text_i += b
    examples: dict[int, list] = {}
    contexts: dict[int, list] = {}
    pad_mask_val = float("-inf")
    for f in feats:
        ex, ctx = [], []
        for (val, _, ti, pi, _bi), toks, a in sorted(heaps[f], key=lambda e: -e[0][0]):
            lo, hi = max(0, pi - window), min(len(toks), pi + window + 1)
            ids = toks[lo:hi].tolist()
            vals = [0.0 if v == pad_mask_val else float(v) for v in a[lo:hi].tolist()]
            strs = token_strings(model, ids)
            tok_s = strs[pi - lo]
            ex.append((float(val), ti, pi, tok_s, "".join(strs)))
            ctx.append((strs, vals))
        examples[f] = ex
        contexts[f] = ctx
    return FeatureTopTokens(features=feats, examples=examples, contexts=contexts)


@dataclass(frozen=True, kw_only=True)
class FeatureLogitLens(Result):
    """Tokens each feature's decoder direction promotes and suppresses through the unembedding.

    Attributes:
        features: the feature ids.
        mode: ``"raw"`` (``W_U d``) or ``"norm"`` (``W_U ln_final(d)``).
        logits: ``[n_features, d_vocab]`` logit change per unit of feature activation (logits).
        top_tokens, bottom_tokens: per feature, the ``k`` most promoted / suppressed tokens (strings).
    """

    features: list[int]
    mode: str
    logits: Float[Tensor, "n_features d_vocab"] = field(repr=False)
    top_tokens: list[list[str]]
    bottom_tokens: list[list[str]]

    def to_pandas(self):
        """One row per feature: top and bottom tokens."""
        import pandas as pd

        return pd.DataFrame({"feature": self.features,
                             "promotes": [" | ".join(t) for t in self.top_tokens],
                             "suppresses": [" | ".join(t) for t in self.bottom_tokens]})

    def plot(self):
        """Bar chart of the top token's logit per feature (plotly Figure)."""
        from steer_lens.plotting import bar

        return bar(self.logits.max(-1).values, [f"f{f}" for f in self.features],
                   hovertext=[t[0] for t in self.top_tokens], title=f"feature logit lens ({self.mode})",
                   y_title="max logit per unit activation")


@torch.no_grad()
def feature_logit_lens(
    model: ModelLike, sae: SAELike, features: list[int] | Tensor, *, k: int = 10, mode: Literal["raw", "norm"] = "raw"
) -> FeatureLogitLens:
    """Logit lens of features' decoder directions: which tokens each feature directly promotes.

    ``logits_i = W_U d_i`` (``mode="raw"``: the direct effect of one unit of feature ``i`` on the
    logits, ignoring later layers and the final norm; SAE dashboards' "logit weights") or
    ``W_U ln_final(d_i)`` (``"norm"``: the direction as a final residual on its own). Reads the
    directions with :func:`steer_lens.lens.direction_lens` (logit lens, nostalgebraist 2020).

    Args:
        model: a HookedTransformer or SteeredTransformer.
        sae: a sae-lens SAE or TrainedSAE.
        features: feature ids.
        k: tokens to list per feature.
        mode: ``"raw"`` or ``"norm"``.

    Returns:
        :class:`FeatureLogitLens`.

    Raises:
        ConfigError: bad feature ids or mode.
    """
    model = unwrap(model)
    sae = _core.as_sae(sae)
    feats = [int(f) for f in (features.tolist() if isinstance(features, Tensor) else features)]
    d_sae = int(sae.cfg.d_sae)
    if not feats or any(not 0 <= f < d_sae for f in feats):
        raise ConfigError(f"features: expected ids in [0, {d_sae}), got {feats}.")
    D = decoder_directions(sae).cpu()[feats]
    if D.shape[-1] != int(model.cfg.d_model):
        raise ConfigError(
            f"the SAE's d_in={D.shape[-1]} is not the model's d_model={model.cfg.d_model}; the logit lens "
            "needs a residual-stream SAE."
        )
    from steer_lens.lens import direction_lens

    scores = direction_lens(model, D, k=k, mode=mode, names=[str(f) for f in feats])
    return FeatureLogitLens(
        features=feats, mode=mode, logits=torch.stack([s.scores for s in scores]),
        top_tokens=[s.top_tokens for s in scores], bottom_tokens=[s.bottom_tokens for s in scores],
    )
