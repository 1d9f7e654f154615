"""The result of :func:`steer_lens.lora.compare`: per-site constancy, losses, KL and weight-space numbers,
with ``.plot()``, ``.to_pandas()``, ``.summary()`` and ``_repr_html_``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

__all__ = ["LoraComparison"]


@dataclass(frozen=True)
class LoraComparison:
    """What :func:`compare` measured (CPU tensors; losses in nats per predicted token).

    Attributes:
        sites: the output hooks of the sub-layers the adapter changes, e.g. ``("blocks.1.hook_mlp_out",)``.
        site_modules: ``{site: (module names, ...)}``.
        n_tokens: number of real tokens the per-token statistics use (BOS included).
        stats: ``{site: {"mean_abs_cos", "mean_energy", "top_sv_energy", "top_pc_share",
            "delta_norm", "mean_norm", "cos_steering"}}`` (see the module docstring; NaN where undefined).
        steering_hooks: ``{site: hook of the steering vector compared with it (or None)}``.
        mean_delta: ``{site: Float[Tensor, "d_model"]}``, the constant-vector candidate.
        cos_to_mean: ``{site: Float[Tensor, "n_tokens"]}`` cos(Δ_t, mean Δ) per token.
        weights: one dict per module: ``module``, ``site``, ``rank``, ``sv`` (singular values of ΔW),
            ``top_sv_energy``, ``cos_u1_steering``, ``max_cos_u_steering``, ``cos_u1_mean_delta`` (|cos|;
            NaN when ΔW's output side is not the residual stream).
        loss_base, loss_lora, loss_const: next-token cross-entropy (nats/token).
        loss_steered: the same with the given steering vector (``None`` without one).
        kl_lora_base, kl_lora_const, kl_lora_steered: mean KL(LoRA ‖ ·) per token (nats, float64).
        effective_vectors: ``{f"blocks.{l}.hook_resid_post": mean(resid_LoRA − resid_base)}``.
    """

    sites: tuple[str, ...]
    site_modules: dict[str, tuple[str, ...]]
    n_tokens: int
    stats: dict[str, dict[str, float]]
    steering_hooks: dict[str, str | None]
    mean_delta: dict[str, Float[Tensor, " d_model"]]
    cos_to_mean: dict[str, Float[Tensor, " n_tokens"]]
    weights: tuple[dict, ...]
    loss_base: float
    loss_lora: float
    loss_const: float
    loss_steered: float | None
    kl_lora_base: float
    kl_lora_const: float
    kl_lora_steered: float | None
    effective_vectors: dict[str, Float[Tensor, " d_model"]]

    @property
    def frac_recovered(self) -> float:
        """``(L_base − L_const) / (L_base − L_LoRA)``: the LoRA's loss reduction the constant recovers."""
        return _frac(self.loss_base, self.loss_const, self.loss_lora)

    @property
    def frac_recovered_steered(self) -> float | None:
        """The same fraction for the given steering vector (``None`` without one)."""
        if self.loss_steered is None:
            return None
        return _frac(self.loss_base, self.loss_steered, self.loss_lora)

    def summary(self) -> dict[str, float | None]:
        """Function-space numbers as a dict (losses in nats/token)."""
        return {
            "loss_base": self.loss_base,
            "loss_lora": self.loss_lora,
            "loss_const": self.loss_const,
            "loss_steered": self.loss_steered,
            "frac_recovered": self.frac_recovered,
            "frac_recovered_steered": self.frac_recovered_steered,
            "kl_lora_base": self.kl_lora_base,
            "kl_lora_const": self.kl_lora_const,
            "kl_lora_steered": self.kl_lora_steered,
            "n_tokens": self.n_tokens,
        }

    def to_pandas(self):
        """One row per site: constancy statistics, cos with the steering vector and its hook."""
        import pandas as pd

        rows = []
        for s in self.sites:
            rows.append(
                {
                    "site": s,
                    "modules": ", ".join(self.site_modules[s]),
                    **self.stats[s],
                    "steering_hook": self.steering_hooks[s],
                }
            )
        return pd.DataFrame(rows)

    def weights_to_pandas(self):
        """One row per module: weight-space numbers (singular values as a list)."""
        import pandas as pd

        return pd.DataFrame([{**w, "sv": [round(float(x), 4) for x in w["sv"]]} for w in self.weights])

    def plot(self):
        """Plotly figure: constancy per site; losses; histogram of cos(Δ_t, mean Δ) per token."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=3,
            subplot_titles=(
                "constancy of Δ_t per site",
                "next-token loss (nats/token)",
                "cos(Δ_t, mean Δ) per token",
            ),
        )
        metrics = ["mean_abs_cos", "mean_energy", "top_sv_energy", "top_pc_share", "cos_steering"]
        for s in self.sites:
            fig.add_trace(go.Bar(x=metrics, y=[self.stats[s][k] for k in metrics], name=s), row=1, col=1)
        names = ["base", "LoRA", "base + mean Δ"]
        vals = [self.loss_base, self.loss_lora, self.loss_const]
        if self.loss_steered is not None:
            names.append("steered")
            vals.append(self.loss_steered)
        fig.add_trace(go.Bar(x=names, y=vals, name="loss", showlegend=False), row=1, col=2)
        lo = min(vals)
        fig.update_yaxes(range=[lo - 0.1 * (max(vals) - lo + 1e-6), max(vals) + 0.02], row=1, col=2)
        for s in self.sites:
            fig.add_trace(
                go.Histogram(x=self.cos_to_mean[s].tolist(), name=f"{s}", nbinsx=40, opacity=0.6),
                row=1,
                col=3,
            )
        fig.update_layout(
            title=f"LoRA vs constant vector: frac recovered {self.frac_recovered:.2f}",
            barmode="group",
            height=420,
        )
        return fig

    def _repr_html_(self) -> str:
        summ = "".join(f"<tr><td>{k}</td><td>{_fmt(v)}</td></tr>" for k, v in self.summary().items())
        return (
            f"<b>LoraComparison</b> over {self.n_tokens} tokens"
            f"<table>{summ}</table>{self.to_pandas().to_html(index=False, float_format='%.4f')}"
            f"{self.weights_to_pandas().to_html(index=False, float_format='%.4f')}"
        )

    def __repr__(self) -> str:
        return (
            f"LoraComparison(sites={list(self.sites)}, frac_recovered={self.frac_recovered:.3f}, "
            f"loss base/LoRA/const={self.loss_base:.4f}/{self.loss_lora:.4f}/{self.loss_const:.4f})"
        )


def _fmt(v) -> str:
    return html.escape(f"{v:.4f}" if isinstance(v, float) else str(v))


def _frac(base: float, other: float, lora: float) -> float:
    den = base - lora
    if abs(den) < 1e-12:
        return float("nan")
    return (base - other) / den
