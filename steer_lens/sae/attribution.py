"""Which SAE features carry a steering vector's effect on a metric (what the vector does to the
features' activations is :func:`steer_lens.analysis.activation_shift`).

* :func:`attribute`: attribution patching (Nanda 2023; Syed et al. 2023) of a metric to SAE features
  with the SAE spliced in *with its error term* (as in Marks et al. 2024, "Sparse feature
  circuits"), so the forward pass is exactly the model's: ``attr_i = sum_{b,t} dm/df_i * (f_i^steered -
  f_i^base)``, the gradient taken on the steered run. The error node gets the same treatment, so for
  a metric that is linear in the activations at the hook the attributions sum to the exact effect.
  An ablation check then removes the top-n features' shift (feature activations set to their base
  values) and compares the effect removed with that of n random shifted features.
* :func:`splice_hooks`: the ``(hook, fn)`` pair that splices an SAE into a forward pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError
from steer_lens.metrics import Metric, MetricFn, evaluate_metric
from steer_lens.results import Result
from steer_lens.sae import _core
from steer_lens.sae._core import SAELike, TokenBatch
from steer_lens.steering import SteeredTransformer

__all__ = ["Attribution", "attribute", "splice_hooks"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# splicing
# ---------------------------------------------------------------------------------------------------
def splice_hooks(sae: SAELike, *, error_term: bool = True, hook: str | None = None) -> list[tuple[str, Any]]:
    """``[(hook, fn)]`` that replaces the activation at the SAE's hook with the SAE's output.

    With ``error_term=True`` the output is ``x + (x_hat - x_hat.detach())``: numerically exactly ``x``
    (the logits equal the plain model's bit for bit) while gradients reach the feature activations
    through the decoder, as when the error ``x - x_hat`` is added back. Without it, the activation is
    replaced by the reconstruction ``x_hat`` (for loss-recovered style evaluations).

    Args:
        sae: a sae-lens SAE or TrainedSAE.
        error_term: keep the SAE's error term (exact forward).
        hook: override of the SAE's hook.

    Returns:
        A list with one ``(hook_name, fn)`` for ``model.run_with_hooks(fwd_hooks=...)`` or
        ``model.hooks(...)``.
    """
    from steer_lens.sae._core import sae_hook

    sae = _core.as_sae(sae)
    h = sae_hook(sae, hook)

    def fn(act, hook):
        recon = sae.decode(sae.encode(act.to(sae.dtype))).to(act.dtype)
        if error_term:
            return act + (recon - recon.detach())
        return recon

    return [(h, fn)]


def _batch_sum(metric: MetricFn | Metric, logits: Tensor) -> Tensor:
    """The metric summed over the batch (a scalar metric is the batch's mean), with the shared checks of
    :func:`steer_lens.metrics.evaluate_metric` (raises MetricError for other shapes)."""
    return evaluate_metric(metric, logits, 1)[0] * logits.shape[0]


# ---------------------------------------------------------------------------------------------------
# attribution
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Attribution(Result):
    """Which SAE features carry a steering vector's effect on a metric (see :func:`attribute`).

    All metric values are means over texts, in the metric's units (e.g. logits for a logit
    difference).

    Attributes:
        sae_hook, vector_hooks: where the SAE reads and the vectors sit.
        n_texts: texts evaluated.
        metric_base, metric_steered: the metric without / with the vector (exact forward passes).
        effect: ``metric_steered - metric_base``.
        attribution: ``[d_sae]`` per feature ``sum_{b,t} dm/df_i (f_i^steered - f_i^base)`` (mean per text).
        error_attribution: the same for the SAE's error term.
        mean_shift: ``[d_sae]`` mean activation shift per token (as :func:`steer_lens.analysis.activation_shift`).
        ablation: rows ``{"n", "kind", "metric", "fraction_removed", "fraction_removed_std",
            "linear_estimate"}``: the metric with the top-n (``kind="top"``), n random shifted
            (``"random"``, mean over draws), or all (``"all"``) features' shift removed, the fraction of
            ``effect`` removed, and its linear estimate ``sum_{i in set} attr_i / effect``. The fractions
            need not grow with n: features whose attribution has the other sign (they push against the
            effect) come late in the ranking, so the top-n can remove *more* than the whole effect, and
            ``"all"`` removes ``1 - error_attribution / effect`` (to first order): whatever part of the
            vector the SAE does not reconstruct stays in the error term, which is never ablated.
    """

    sae_hook: str
    vector_hooks: list[str]
    n_texts: int
    metric_base: float
    metric_steered: float
    effect: float
    attribution: Float[Tensor, " d_sae"] = field(repr=False)
    error_attribution: float
    mean_shift: Float[Tensor, " d_sae"] = field(repr=False)
    ablation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_attribution(self) -> float:
        """Sum of the feature attributions plus the error term's (the linear estimate of ``effect``)."""
        return float(self.attribution.double().sum()) + self.error_attribution

    _html_rows = 10

    def _top_ids(self, k: int) -> Tensor:
        sign = 1.0 if self.effect >= 0 else -1.0
        return torch.topk(sign * self.attribution, min(k, len(self.attribution))).indices

    def top(self, k: int = 20):
        """Features carrying most of the effect (largest attribution in the direction of ``effect``), as
        :meth:`to_pandas` ``(k)``: ``feature``, ``attribution``, ``fraction_of_effect``, ``mean_shift``."""
        return self.to_pandas(k)

    def to_pandas(self, k: int = 20):
        """Top ``k`` features: ``feature``, ``attribution``, ``fraction_of_effect``, ``mean_shift``."""
        import pandas as pd

        idx = self._top_ids(k)
        a = self.attribution[idx]
        return pd.DataFrame({
            "feature": idx.tolist(), "attribution": a.tolist(),
            "fraction_of_effect": (a / self.effect).tolist() if self.effect != 0 else [math.nan] * len(idx),
            "mean_shift": self.mean_shift[idx].tolist(),
        })

    def ablation_table(self):
        """The ablation check as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.ablation)

    def plot(self, k: int = 20):
        """Top attributions (bars) and the ablation check (fraction of the effect removed by the top-n
        vs n random features) as a plotly Figure."""
        from steer_lens import plotting

        df = self.to_pandas(k)
        attr = plotting.bars({"attribution": ([f"f{f}" for f in df.feature], df.attribution),
                              "error term": (["error"], [self.error_attribution])})
        runs = {f"{kind}-n features": [r for r in self.ablation if r["kind"] == kind] for kind in ("top", "random")}
        runs = {name: rows for name, rows in runs.items() if rows}
        ablation = plotting.lines({name: ([r["n"] for r in rows], [r["fraction_removed"] for r in rows])
                                   for name, rows in runs.items()},
                                  error_y={name: [r["fraction_removed_std"] for r in rows]
                                           for name, rows in runs.items() if name.startswith("random")},
                                  x_title="features removed (n)", y_title="fraction of effect removed")
        return plotting.grid([[attr, ablation]], titles=["attribution per feature",
                                                         "ablation: fraction of effect removed"],
                             title=f"attribution of the vector's effect ({self.effect:.3g}) to SAE features "
                                   f"at {self.sae_hook}", height=450)

    def _summary(self) -> str:
        return (f"effect {self.effect:.4g} (base {self.metric_base:.4g} → steered {self.metric_steered:.4g});"
                f" features {float(self.attribution.sum()):.4g} + error {self.error_attribution:.4g}")

    def _repr_html_(self) -> str:
        from steer_lens.plotting import result_html

        html = result_html(self._summary(), self.top(self._html_rows))
        if self.ablation:
            html += result_html("ablation check", self.ablation_table())
        return html


def _attr_batch(steered, sae, h: str, batch: TokenBatch, metric: MetricFn | Metric):
    """One batch: exact base and steered metric, per-feature and error attribution, feature shift."""
    model = steered.model
    kw = {"attention_mask": batch.attention_mask}
    with torch.no_grad():
        x_b, logits_b = _core.capture(model.run_with_hooks, batch.tokens, h, kw)
        m_b = _batch_sum(metric, logits_b).detach()
        x_b = x_b.to(sae.dtype)
        f_b = sae.encode(x_b)
        err_b = x_b - sae.decode(f_b)
    leaves: dict[str, Tensor] = {}

    def splice(act, hook):
        x = act.detach().to(sae.dtype)
        f = sae.encode(x).detach().requires_grad_(True)
        e = torch.zeros_like(x, requires_grad=True)
        recon = sae.decode(f)
        leaves.update(x=x, f=f, e=e, recon=recon.detach())
        return act.detach() + ((recon - recon.detach()) + e).to(act.dtype)

    with torch.enable_grad():
        logits_s = steered.run_with_hooks(batch.tokens, fwd_hooks=[(h, splice)], **kw)
        m_s = _batch_sum(metric, logits_s)
        if not m_s.requires_grad:
            raise MetricError(
                "metric: its value does not depend differentiably on the logits (got a constant or a Python "
                "number); attribution needs its gradient. Fix: return a tensor computed from the logits."
            )
        g_f, g_e = torch.autograd.grad(m_s, [leaves["f"], leaves["e"]], allow_unused=True)
    f_s = leaves["f"].detach()
    if g_f is None:
        g_f = torch.zeros_like(f_s)
    if g_e is None:
        g_e = torch.zeros_like(leaves["x"])
    err_s = leaves["x"] - leaves["recon"]
    df = f_s - f_b
    attr = (g_f * df).double().sum(dim=(0, 1))
    err_attr = (g_e * (err_s - err_b)).double().sum()
    c = batch.count.to(df.device)
    return m_b.double(), m_s.detach().double(), attr, err_attr, df[c].double().sum(0), c.sum(), df.ne(0).any(
        dim=(0, 1)
    )


@torch.no_grad()
def _ablated_metric(
    steered, sae, h: str, batch: TokenBatch, metric: MetricFn | Metric, sets: list[Tensor]
) -> list[Tensor]:
    """Metric (summed over the batch) of the steered run with each feature set's shift removed."""
    model = steered.model
    kw = {"attention_mask": batch.attention_mask}
    x_b, _ = _core.capture(model.run_with_hooks, batch.tokens, h, {**_core.run_kwargs(model, h, batch, stop=True),
                                                             "return_type": None})
    f_b = sae.encode(x_b.to(sae.dtype))
    out = []
    for s in sets:
        s = s.to(f_b.device)

        def ablate(act, hook, s=s):
            x = act.to(sae.dtype)
            f_s = sae.encode(x)
            f_new = f_s.clone()
            f_new[..., s] = f_b[..., s]
            return act + (sae.decode(f_new) - sae.decode(f_s)).to(act.dtype)

        logits = steered.run_with_hooks(batch.tokens, fwd_hooks=[(h, ablate)], **kw)
        out.append(_batch_sum(metric, logits).double())
    return out


def attribute(
    steered: SteeredTransformer,
    sae: SAELike,
    texts: Any,
    metric: MetricFn | Metric,
    *,
    batch_size: int = 8,
    ablation_sizes: tuple[int, ...] | list[int] = (1, 5, 10, 20),
    n_random: int = 3,
    ablation: bool = True,
    seed: int = 0,
) -> Attribution:
    """Attribute a steering vector's effect on a metric to SAE features (attribution patching with the
    SAE spliced in with its error term), then check it by ablation.

    For each batch: the base run gives ``m_base`` and the base feature activations ``f_b``; the steered
    run, with the SAE spliced in at its hook *with its error term* (the forward equals the steered
    model exactly), gives ``m_steered`` and the gradients ``dm/df`` and ``dm/de`` (``e``: the error
    term). Attribution of feature ``i``: ``sum_{b,t} dm/df_i (f_i^s - f_i^b)`` and of the error term
    ``sum dm/de . (e^s - e^b)``; their sum is the first-order estimate of ``effect = m_steered - m_base``
    and is exact when the metric is linear in the activations at the hook.

    Ablation check (second pass over ``texts``): for n in ``ablation_sizes``, run the steered model
    with the top-n features' activations set to their base values (the rest of the activation,
    error term included, unchanged) and report the fraction of the effect removed,
    ``(m_steered - m_ablated) / effect``; the same for n random features drawn among those whose
    activation shifted (mean over ``n_random`` draws), and for all features (what remains is the error
    term's share).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` (vectors at or upstream of the SAE's hook).
        sae: a sae-lens SAE or TrainedSAE.
        texts: strings, dataset rows or token ids (iterated twice when ``ablation``; a one-shot
            iterator is listed first).
        metric: a :class:`steer_lens.metrics.Metric` (e.g. ``steer_lens.metrics.logit_diff(...)``, read
            per sequence) or any differentiable ``MetricFn``: ``logits [batch, pos, d_vocab] -> [batch]``
            (per text) or a scalar (taken as the batch mean). Strings are batched
            with left padding, so the last position is always a real token; a metric that reads other
            positions also reads padding: give equal-length token ids (or ``batch_size=1``) then.
        batch_size: texts per forward pass.
        ablation_sizes: the n of the ablation check.
        n_random: random draws per n.
        ablation: run the ablation check.
        seed: seed of the random feature sets.

    Returns:
        :class:`Attribution`.

    Raises:
        MetricError: the metric returns something other than ``[batch]`` or a scalar, or non-finite
            values. EmptyInputError: no texts. HookNameError / ShapeMismatchError: SAE and model do
            not match. ConfigError: bad ablation settings.
    """
    sae = _core.as_sae(sae)
    model = steered.model
    if not callable(metric):
        raise MetricError(f"metric: expected a callable logits -> [batch] or scalar, got {type(metric).__name__}.")
    sizes = [int(n) for n in ablation_sizes]
    if any(n < 1 for n in sizes) or n_random < 0:
        raise ConfigError(
            f"ablation_sizes: expected positive integers and n_random >= 0, got {list(ablation_sizes)}, {n_random}."
        )
    _core.check_nonempty(texts)
    texts = _core.reiterable(texts)
    h = _core.check_sae(model, sae)
    _core.warn_if_vectors_after(steered, h)
    d_sae = int(sae.cfg.d_sae)
    dev = sae.W_dec.device
    attr = torch.zeros(d_sae, dtype=torch.float64, device=dev)
    err_attr = torch.zeros((), dtype=torch.float64, device=dev)
    shift = torch.zeros(d_sae, dtype=torch.float64, device=dev)
    shifted = torch.zeros(d_sae, dtype=torch.bool, device=dev)
    m_b = torch.zeros((), dtype=torch.float64, device=dev)
    m_s = torch.zeros((), dtype=torch.float64, device=dev)
    n_tok = torch.zeros((), dtype=torch.float64, device=dev)
    n_texts = 0
    for batch in _core.iter_batches(model, texts, batch_size=batch_size):
        mb, ms, a, ea, sh, nt, sd = _attr_batch(steered, sae, h, batch, metric)
        m_b += mb.to(dev)
        m_s += ms.to(dev)
        attr += a
        err_attr += ea
        shift += sh
        n_tok += nt
        shifted |= sd
        n_texts += batch.tokens.shape[0]
    if not (torch.isfinite(m_b) and torch.isfinite(m_s) and torch.isfinite(attr).all()):
        raise MetricError("metric: the metric or its gradient is NaN/inf on these texts; check the metric.")
    mean_b, mean_s = float(m_b) / n_texts, float(m_s) / n_texts
    effect = mean_s - mean_b
    result = dict(
        sae_hook=h, vector_hooks=list(steered.hook_names), n_texts=n_texts, metric_base=mean_b,
        metric_steered=mean_s, effect=effect, attribution=(attr / n_texts).float().cpu(),
        error_attribution=float(err_attr) / n_texts,
        mean_shift=(shift / n_tok.clamp(min=1)).float().cpu(),
    )
    rows: list[dict[str, Any]] = []
    if ablation:
        rows = _ablation(steered, sae, h, texts, metric, batch_size, sizes, n_random, seed,
                         result["attribution"], effect, mean_s, shifted.cpu())
    return Attribution(**result, ablation=rows)


def _ablation(steered, sae, h, texts, metric, batch_size, sizes, n_random, seed, attribution, effect,
              mean_s, shifted) -> list[dict[str, Any]]:
    d_sae = len(attribution)
    sign = 1.0 if effect >= 0 else -1.0
    order = torch.argsort(sign * attribution, descending=True)
    pool = torch.nonzero(shifted).flatten()
    gen = torch.Generator().manual_seed(seed)
    sets: list[tuple[str, int, Tensor]] = []
    for n in sizes:
        sets.append(("top", n, order[: min(n, d_sae)]))
        for _ in range(n_random if len(pool) else 0):
            sets.append(("random", n, pool[torch.randperm(len(pool), generator=gen)[: min(n, len(pool))]]))
    sets.append(("all", d_sae, torch.arange(d_sae)))
    totals = [torch.zeros((), dtype=torch.float64, device=sae.W_dec.device) for _ in sets]
    n_texts = 0
    for batch in _core.iter_batches(steered.model, texts, batch_size=batch_size):
        vals = _ablated_metric(steered, sae, h, batch, metric, [s for _, _, s in sets])
        for i, v in enumerate(vals):
            totals[i] += v.to(totals[i].device)
        n_texts += batch.tokens.shape[0]
    means = [float(t) / n_texts for t in totals]
    frac = [(mean_s - m) / effect if effect != 0 else math.nan for m in means]
    attr64 = attribution.double().cpu()
    linear = [float(attr64[s.cpu()].sum()) / effect if effect != 0 else math.nan for _, _, s in sets]
    rows: list[dict[str, Any]] = []
    for kind in ("top", "random", "all"):
        for n in ([*dict.fromkeys(sizes)] if kind != "all" else [d_sae]):
            idx = [i for i, (k_, n_, _) in enumerate(sets) if k_ == kind and n_ == n]
            if not idx:
                continue
            fr = torch.tensor([frac[i] for i in idx], dtype=torch.float64)
            rows.append({
                "n": n, "kind": kind, "metric": sum(means[i] for i in idx) / len(idx),
                "fraction_removed": float(fr.mean()),
                "fraction_removed_std": float(fr.std()) if len(idx) > 1 else 0.0,
                "linear_estimate": sum(linear[i] for i in idx) / len(idx),
            })
    return rows
