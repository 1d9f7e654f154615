"""Where the vectors point and how their writes travel: :func:`vector_stats` and :func:`persistence`.

* :func:`vector_stats` - per-hook vector norms (also relative to the hook's typical residual norm)
  and pairwise cosine similarities between the vectors of different layers.
* :func:`persistence` - add *only* the vector of one hook ``ℓ`` and follow its write through the
  residual stream: at every later residual point ``ℓ'`` the change ``Δh_ℓ'(t)`` (steered minus base,
  per token) is compared with the added vector (``cos(Δh_ℓ'(t), v_ℓ)``) and with its own mean over
  tokens (``cos(Δh_ℓ'(t), mean_t Δh_ℓ')``: does the write stay one fixed direction, or become
  token-dependent?), and its norm with ``||v_ℓ||``.

After "Small Vectors, Big Effects" (Sinii et al. 2025).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.analysis._common import text_tokens
from steer_lens.errors import HookNameError, ShapeMismatchError
from steer_lens.hook_sites import HookSite
from steer_lens.results import Result
from steer_lens.steering import SteeredTransformer
from steer_lens.train.data import TokenIds

__all__ = ["Persistence", "VectorStats", "persistence", "vector_stats"]


@dataclass(frozen=True)
class VectorStats(Result):
    """Norms and pairwise cosines of the vectors of a steered model.

    Attributes:
        hooks: hook names.
        norms: ``[n_hooks]`` L2 norms (residual units).
        cosines: ``[n_hooks, n_hooks]`` cosine similarities.
        resid_norms: ``[n_hooks]`` median per-token residual norm at each hook (base model, on the
            texts given), or ``None`` without texts.
    """

    hooks: list[str]
    norms: Float[Tensor, " n_hooks"]
    cosines: Float[Tensor, "n_hooks n_hooks"]
    resid_norms: Float[Tensor, " n_hooks"] | None = None

    _rank_by = "norm"

    @property
    def relative_norms(self) -> Float[Tensor, " n_hooks"] | None:
        """``||v_h|| / median_t ||x_t||`` per hook (``None`` without residual norms)."""
        return None if self.resid_norms is None else self.norms / self.resid_norms

    def to_pandas(self):
        """One row per hook: norm, residual norm, relative norm."""
        import pandas as pd

        df = pd.DataFrame({"hook": self.hooks, "norm": self.norms.tolist()})
        if self.resid_norms is not None:
            df["resid_norm"] = self.resid_norms.tolist()
            df["relative_norm"] = self.relative_norms.tolist()
        return df

    def top(self, k: int = 10):
        """The hooks in their order (at most ``k``): the table is per hook, in forward order."""
        return self.to_pandas().head(k).reset_index(drop=True)

    def plot(self):
        """Two panels: norms per hook (relative to the residual when known) and the cosine heatmap."""
        from steer_lens import plotting

        rel = self.relative_norms
        return plotting.grid(
            [[plotting.bar(rel if rel is not None else self.norms, self.hooks),
              plotting.heatmap(self.cosines, x_labels=self.hooks, y_labels=self.hooks, zmin=-1.0, zmax=1.0,
                               index_x=False)]],
            titles=["||v|| / residual norm" if rel is not None else "||v||", "cosine(v_i, v_j)"],
            title="Steering vectors: norms and cosines", height=450, showlegend=False,
        )

    def _summary(self) -> str:
        return f"<b>VectorStats</b> of {len(self.hooks)} vectors"


def vector_stats(steered: SteeredTransformer,
                 texts: str | TokenIds | Sequence[str | TokenIds] | None = None) -> VectorStats:
    """Per-hook norms and pairwise cosine similarities of the steering vectors.

    With ``texts``, also the median per-token residual norm at each hook on them (base model, BOS
    and padding left out), so norms can be read relative to the stream they are added to (the
    "small vectors" of Sinii et al. 2025). For gated vectors the norms are those before the gate.
    ``texts`` may be token ids instead (a ``[n, pos]`` tensor, 1-D tensors or lists of ints, BOS
    first), e.g. for a model without a tokenizer.

    Returns:
        A :class:`VectorStats` (norms in residual units, ``[n_hooks]``; cosines ``[n_hooks, n_hooks]``).

    Raises:
        EmptyInputError: ``texts`` is an empty list or holds an empty sequence.
        ConfigError: text for a model without a tokenizer, or ``texts`` neither text nor token ids.
        ShapeMismatchError: a vector is not ``[d_model]`` (e.g. a per-head vector at ``attn.hook_z``).
    """
    steered.vectors.require_residual_width("vector_stats")
    hooks = list(steered.hook_names)
    vecs = torch.stack([steered.vectors.direction(h).detach().float().cpu() for h in hooks])
    norms = vecs.norm(dim=-1)
    unit = vecs / norms.clamp_min(1e-12)[:, None]
    cos = unit @ unit.T
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.full_like(cos, float("nan")))
    resid = None
    if texts is not None:
        tokens, mask, keep = text_tokens(steered, texts)
        with torch.no_grad(), steered.disabled():
            _, cache = steered.run_with_cache(tokens, attention_mask=mask, names_filter=hooks, return_type=None)
        resid = torch.stack([cache[h].float().norm(dim=-1)[keep].median().cpu() for h in hooks])
    return VectorStats(hooks=hooks, norms=norms, cosines=cos, resid_norms=resid)


# ---------------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Persistence(Result):
    """How the write of each vector, added alone, persists through later residual points.

    Attributes:
        sources: the hooks whose vector was added (one at a time).
        points: the residual-stream points measured, in forward order.
        cos_vector: ``[n_sources, n_points]`` mean over tokens of ``cos(Δh_p(t), v_source)``.
        cos_mean_shift: ``[n_sources, n_points]`` mean over tokens of ``cos(Δh_p(t), mean_t Δh_p)``
            (1: the same shift at every token; lower: token-dependent).
        norm_ratio: ``[n_sources, n_points]`` mean over tokens of ``||Δh_p(t)|| / ||v_source||``
            (all three are NaN where the point precedes the source).
        cos_reference: with ``references``: ``[n_sources, n_points]`` mean over tokens of
            ``cos(Δh_p(t), r_p)`` with ``r_p`` the vector trained *in isolation* for point ``p``
            (Sinii et al.'s Diff-Vector; NaN where ``p`` has no reference); else ``None``.
    """

    sources: list[str]
    points: list[str]
    cos_vector: Float[Tensor, "n_sources n_points"]
    cos_mean_shift: Float[Tensor, "n_sources n_points"]
    norm_ratio: Float[Tensor, "n_sources n_points"]
    cos_reference: Float[Tensor, "n_sources n_points"] | None = None

    def to_pandas(self):
        """Long table: ``source, point, cos_vector, cos_mean_shift, norm_ratio`` (measured cells only)."""
        import pandas as pd

        measured = ~torch.isnan(self.cos_vector)
        rows = [{"source": s, "point": p, "cos_vector": float(self.cos_vector[i, j]),
                 "cos_mean_shift": float(self.cos_mean_shift[i, j]), "norm_ratio": float(self.norm_ratio[i, j]),
                 **({} if self.cos_reference is None else {"cos_reference": float(self.cos_reference[i, j])})}
                for i, s in enumerate(self.sources) for j, p in enumerate(self.points) if measured[i, j]]
        return pd.DataFrame(rows)

    def plot(self):
        """Lines per source vector across later points: the three measures in three panels."""
        from steer_lens import plotting

        measures = (self.cos_vector, self.cos_mean_shift, self.norm_ratio)
        panels = [[plotting.lines({s: (self.points, vals[i]) for i, s in enumerate(self.sources)})]
                  for vals in measures]
        for row, (fig,) in enumerate(panels):
            for trace in fig.data:
                trace.showlegend = row == 0
        return plotting.grid(panels, titles=["cos(Δh, v_source)", "cos(Δh(t), mean_t Δh)", "||Δh|| / ||v_source||"],
                             title="Persistence of each vector's write through later layers", height=750,
                             shared_xaxes=True)

    def _summary(self) -> str:
        return f"<b>Persistence</b> of {self.sources} through {len(self.points)} residual points"


def _order(hook: str) -> tuple[int, int]:
    """Position of a residual-stream hook along the stream (``HookSite.stream_order``)."""
    try:
        site = HookSite.parse(hook)
        return site.stream_order
    except HookNameError:
        raise HookNameError(
            f"hook {hook!r}: persistence follows the residual stream and needs a hook named "
            "blocks.L.hook_resid_pre / resid_mid / resid_post / attn_out / mlp_out."
        ) from None


@torch.no_grad()
def persistence(
    steered: SteeredTransformer,
    texts: str | TokenIds | Sequence[str | TokenIds],
    *,
    sources: Sequence[str] | None = None,
    references: Mapping[str, Tensor] | SteeredTransformer | None = None,
) -> Persistence:
    """Follow the write of each vector, added alone, through every later residual point.

    For each source hook ``ℓ`` (default: every steered hook) the texts are run with only ``v_ℓ`` on
    (:meth:`~steer_lens.SteeredTransformer.only_hooks`) and with no vector; at each residual point
    ``p`` at or after ``ℓ`` (all ``blocks.L.hook_resid_pre/mid/post`` the model has, in forward order)
    ``Δh_p(t) = h_p^steered(t) - h_p^base(t)`` per token (BOS and padding left out) gives
    ``cos(Δh_p(t), v_ℓ)``, ``cos(Δh_p(t), mean_t Δh_p)`` and ``||Δh_p(t)|| / ||v_ℓ||``, averaged over
    tokens. At the source itself ``Δh = v_ℓ`` (cosines 1, ratio 1 for a plain vector). This is the
    persistence analysis of Sinii et al. 2025 ("Small Vectors, Big Effects").

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` with vectors at residual-stream hooks.
        texts: evaluation texts (one or several), or token ids (a ``[n, pos]`` tensor, 1-D tensors
            or lists of ints, BOS first) for a model without a tokenizer.
        sources: the hooks to add one at a time (default: all).
        references: vectors trained *in isolation* for target points, ``{hook: [d_model]}`` or a
            wrapper holding them (e.g. one-layer-at-a-time vectors): then ``cos_reference`` compares
            each ``Δh_p`` with ``r_p``, Sinii et al.'s Diff-Vector (their persistence figure compares
            the shift a vector causes downstream with the vector trained for that downstream layer).

    Returns:
        A :class:`Persistence`.

    Raises:
        HookNameError: a source is not a steered residual-stream hook, or a reference is not a
            residual point of the model.
        ShapeMismatchError: a reference that is not ``[d_model]``.
        EmptyInputError: no texts, or an empty sequence.
        ConfigError: text for a model without a tokenizer, or ``texts`` neither text nor token ids.
    """
    sources = list(sources) if sources is not None else list(steered.hook_names)
    for s in sources:
        if s not in steered.hook_names:
            raise HookNameError(f"source {s!r} carries no vector; vectors are at {list(steered.hook_names)}.")
        _order(s)
    stream = ("resid_pre", "resid_mid", "resid_post")
    points = [HookSite.name_of(kind, layer) for layer in range(int(steered.cfg.n_layers)) for kind in stream]
    points = [p for p in points if p in steered.model.hook_dict]
    points = sorted(set(points) | set(sources), key=_order)
    refs = _references(references, points, int(steered.cfg.d_model))
    tokens, mask, keep = text_tokens(steered, texts)
    with steered.disabled():
        _, base = steered.run_with_cache(tokens, attention_mask=mask, names_filter=points, return_type=None)
    shape = (len(sources), len(points))
    cv, cm, nr, cr = (torch.full(shape, float("nan")) for _ in range(4))
    for i, s in enumerate(sources):
        v = steered.vectors.direction(s).detach().float()
        vnorm = v.norm().clamp_min(1e-12)
        with steered.only_hooks([s]):
            _, cache = steered.run_with_cache(tokens, attention_mask=mask, names_filter=points, return_type=None)
        for j, p in enumerate(points):
            if _order(p) < _order(s):
                continue
            dh = (cache[p].float() - base[p].float())[keep]  # [n_tokens, d_model]
            mean = dh.mean(0)
            cos_v = torch.nn.functional.cosine_similarity(dh, v[None].to(dh.device), dim=-1)
            cos_m = torch.nn.functional.cosine_similarity(dh, mean[None], dim=-1)
            cv[i, j] = cos_v.mean().cpu()
            cm[i, j] = cos_m.mean().cpu()
            nr[i, j] = (dh.norm(dim=-1) / vnorm).mean().cpu()
            if p in refs:
                r = refs[p].to(dh.device)[None]
                cr[i, j] = torch.nn.functional.cosine_similarity(dh, r, dim=-1).mean().cpu()
    return Persistence(sources=sources, points=points, cos_vector=cv, cos_mean_shift=cm, norm_ratio=nr,
                       cos_reference=None if references is None else cr)


def _references(references, points: list[str], d_model: int) -> dict[str, Tensor]:
    """The reference vectors by residual point (fp32), checked."""
    if references is None:
        return {}
    if isinstance(references, SteeredTransformer):
        references = {h: references.vectors.direction(h) * references.scale for h in references.hook_names}
    out = {}
    for h, v in references.items():
        if h not in points:
            raise HookNameError(f"reference {h!r} is not a residual point of this model; points are {points[:3]}...")
        v = torch.as_tensor(v).detach().float().reshape(-1) if torch.as_tensor(v).numel() == d_model else None
        if v is None:
            raise ShapeMismatchError(f"reference {h!r}: expected a vector [d_model]=[{d_model}].")
        out[h] = v
    return out
