"""How SAE feature activations change when a steering vector is on (:func:`activation_shift`).

Mean change of each feature's activation at the SAE's hook between steered and base runs over texts
(the vector may sit upstream of the SAE), per-token values for circuitsvis, and the fraction of the
residual change the SAE explains (the error term reported).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError
from steer_lens.sae._core import (
    HookMismatchWarning,
    SAELike,
    check_nonempty,
    check_sae,
    hook_order,
    iter_batches,
    run_kwargs,
    unwrap,
)
from steer_lens.steering import SteeredTransformer

__all__ = ["ActivationShift", "activation_shift"]


def _vector_after_sae(steered, sae_h: str) -> None:
    model = steered.model
    order = hook_order(model, [sae_h, *steered.hook_names])
    if all(order[h] > order[sae_h] for h in steered.hook_names):
        warnings.warn(
            f"every steering vector ({list(steered.hook_names)}) is downstream of the SAE's hook {sae_h!r}: "
            "the SAE's features cannot change. Use an SAE at or after the vector's hook.",
            HookMismatchWarning,
            stacklevel=3,
        )


def _capture(runner, tokens: Tensor, hook: str, kw: dict, extra=None) -> tuple[Tensor, Any]:
    store: dict[str, Tensor] = {}

    def grab(act, hook):
        store["x"] = act.detach()

    out = runner(tokens, fwd_hooks=[(hook, grab), *(extra or [])], **kw)
    return store["x"], out


@dataclass(frozen=True, kw_only=True)
class ActivationShift:
    """How feature activations at the SAE's hook change when the vector is on (see
    :func:`activation_shift`).

    Attributes:
        sae_hook: hook the SAE reads. vector_hooks: hooks carrying vectors.
        n_tokens: tokens averaged over (BOS and padding excluded).
        mean_base, mean_steered: ``[d_sae]`` mean feature activation without / with the vector.
        mean_shift: ``[d_sae]`` ``mean_steered - mean_base``.
        mean_abs_shift: ``[d_sae]`` mean of ``|f_steered - f_base|`` per token.
        residual_change_sq: mean ``||x_steered - x_base||^2`` at the hook (residual units squared).
        error_change_sq: mean squared norm of the change of the SAE's error term.
        explained: ``1 - error_change_sq / residual_change_sq``: fraction of the residual change the
            features' change explains (1: all of it; can be negative when the error grows).
        mean_residual_change: ``[d_in]`` mean of ``x_steered - x_base``.
        mean_error_change: ``[d_in]`` mean change of the SAE's error term (``explained_mean`` compares
            the two: per token, a TopK SAE reconstructs small changes noisily as features switch, so
            ``explained`` can be low or negative while the mean change is well explained).
        token_strs: per stored text, its tokens (strings). token_shift: per stored text,
            ``[pos, d_sae]`` per-token shift (the first ``per_token_texts`` texts).
    """

    sae_hook: str
    vector_hooks: list[str]
    n_tokens: int
    mean_base: Float[Tensor, " d_sae"] = field(repr=False)
    mean_steered: Float[Tensor, " d_sae"] = field(repr=False)
    mean_shift: Float[Tensor, " d_sae"] = field(repr=False)
    mean_abs_shift: Float[Tensor, " d_sae"] = field(repr=False)
    residual_change_sq: float
    error_change_sq: float
    explained: float
    mean_residual_change: Float[Tensor, " d_in"] = field(repr=False)
    mean_error_change: Float[Tensor, " d_in"] = field(repr=False)
    token_strs: list[list[str]] = field(repr=False)
    token_shift: list[Tensor] = field(repr=False)

    @property
    def explained_mean(self) -> float:
        """Fraction of the *mean* residual change explained by the features' mean change:
        ``1 - ||mean Δe||^2 / ||mean Δx||^2``."""
        den = float(self.mean_residual_change.double().pow(2).sum())
        num = float(self.mean_error_change.double().pow(2).sum())
        return 1.0 - num / den if den > 0 else float("nan")

    def top(self, k: int = 20, *, by: str = "shift") -> Tensor:
        """Feature ids with the largest ``mean_shift`` (``by="shift"``), most negative (``"negative"``)
        or largest ``mean_abs_shift`` (``"abs"``)."""
        vals = {"shift": self.mean_shift, "negative": -self.mean_shift, "abs": self.mean_abs_shift}
        if by not in vals:
            raise ConfigError(f"by: expected 'shift', 'negative' or 'abs', got {by!r}.")
        return torch.topk(vals[by], min(k, len(self.mean_shift))).indices

    def to_pandas(self, k: int = 20, *, by: str = "abs"):
        """Top ``k`` features: ``feature``, ``mean_shift``, ``mean_abs_shift``, ``mean_base``, ``mean_steered``."""
        import pandas as pd

        idx = self.top(k, by=by)
        return pd.DataFrame({
            "feature": idx.tolist(), "mean_shift": self.mean_shift[idx].tolist(),
            "mean_abs_shift": self.mean_abs_shift[idx].tolist(),
            "mean_base": self.mean_base[idx].tolist(), "mean_steered": self.mean_steered[idx].tolist(),
        })

    def plot(self, k: int = 20):
        """Bar chart of the top features' mean shift (plotly Figure)."""
        import plotly.graph_objects as go

        df = self.to_pandas(k)
        fig = go.Figure(go.Bar(x=[f"f{f}" for f in df.feature], y=df.mean_shift,
                               hovertext=[f"base {b:.3g} → steered {s:.3g}" for b, s in
                                          zip(df.mean_base, df.mean_steered, strict=True)]))
        fig.update_layout(
            title=f"feature shift at {self.sae_hook} (SAE explains {self.explained:.1%} of the residual change)",
            xaxis_title="feature", yaxis_title="mean activation change (steered − base)",
        )
        return fig

    def show_tokens(self, feature: int | None = None, *, text: int | None = None):
        """circuitsvis ``colored_tokens``: the per-token shift of one feature (default: the largest mean
        shift) over the stored texts (or one of them)."""
        from circuitsvis.tokens import colored_tokens

        if not self.token_shift:
            raise ConfigError("no per-token values were stored (per_token_texts=0).")
        f = int(self.top(1, by="abs")[0]) if feature is None else int(feature)
        which = range(len(self.token_shift)) if text is None else [text]
        tokens: list[str] = []
        values: list[float] = []
        for i in which:
            tokens += [*self.token_strs[i], "\n"]
            values += [*self.token_shift[i][:, f].tolist(), 0.0]
        return colored_tokens(tokens=tokens, values=values)

    def _repr_html_(self) -> str:
        head = (f"<p>SAE at <code>{self.sae_hook}</code>, vectors at {self.vector_hooks}, {self.n_tokens} "
                f"tokens; features explain {self.explained:.1%} of the residual change per token, "
                f"{self.explained_mean:.1%} of its mean</p>")
        return head + self.to_pandas(10).to_html(index=False, float_format=lambda v: f"{v:.4g}")


def _token_strs(model, tokens: Tensor, count: Tensor) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    ids = tokens[count].tolist()
    return [tok.decode([i]) for i in ids] if tok is not None else [str(i) for i in ids]


@torch.no_grad()
def activation_shift(
    steered: SteeredTransformer, sae: SAELike, texts: Any, *, batch_size: int = 16, per_token_texts: int = 8
) -> ActivationShift:
    """Mean change of each SAE feature's activation between the steered and the base run.

    For each text, runs the base model and the steered model up to the SAE's hook, encodes both
    activations and accumulates ``f_steered - f_base`` over tokens (BOS and padding excluded).
    Also splits the residual change ``x_s - x_b`` into the features' part ``x_hat_s - x_hat_b`` and
    the error term's part, reporting the fraction explained. Streams the texts (memory bounded by
    one batch plus the stored per-token values).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`; its vectors may be at or upstream of the SAE.
        sae: a sae-lens SAE or TrainedSAE.
        texts: strings, dataset rows with ``"text"``, or token ids ``[batch, pos]``.
        batch_size: texts per forward pass.
        per_token_texts: how many of the first texts keep per-token values (for :meth:`show_tokens`).

    Returns:
        :class:`ActivationShift`.

    Raises:
        EmptyInputError: no texts. HookNameError / ShapeMismatchError: SAE and model do not match.

    Warns:
        HookMismatchWarning: every vector is downstream of the SAE's hook (nothing can shift).
    """
    sae = unwrap(sae)
    model = steered.model
    check_nonempty(texts)
    h = check_sae(model, sae)
    _vector_after_sae(steered, h)
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    dev = sae.W_dec.device
    acc = {n: torch.zeros(d_sae, dtype=torch.float64, device=dev) for n in ("base", "steered", "abs")}
    dx_sum = torch.zeros(d_in, dtype=torch.float64, device=dev)
    derr_sum = torch.zeros(d_in, dtype=torch.float64, device=dev)
    dx_sq = torch.zeros((), dtype=torch.float64, device=dev)
    derr_sq = torch.zeros((), dtype=torch.float64, device=dev)
    n = torch.zeros((), dtype=torch.float64, device=dev)
    token_strs: list[list[str]] = []
    token_shift: list[Tensor] = []
    for batch in iter_batches(model, texts, batch_size=batch_size):
        kw = run_kwargs(model, h, batch, stop=True)
        x_b, _ = _capture(model.run_with_hooks, batch.tokens, h, {**kw, "return_type": None})
        x_s, _ = _capture(steered.run_with_hooks, batch.tokens, h, {**kw, "return_type": None})
        c = batch.count.to(dev)
        xb, xs = x_b.to(sae.dtype)[c], x_s.to(sae.dtype)[c]
        fb, fs = sae.encode(xb), sae.encode(xs)
        rb, rs = sae.decode(fb), sae.decode(fs)
        df = (fs - fb).double()
        acc["base"] += fb.double().sum(0)
        acc["steered"] += fs.double().sum(0)
        acc["abs"] += df.abs().sum(0)
        dx = (xs - xb).double()
        derr = dx - (rs - rb).double()
        dx_sum += dx.sum(0)
        derr_sum += derr.sum(0)
        dx_sq += dx.pow(2).sum()
        derr_sq += derr.pow(2).sum()
        n += c.sum()
        if len(token_shift) < per_token_texts:
            # split the flat [tokens, d_sae] shift back into texts
            per_text = c.sum(1).tolist()
            start = 0
            for i, L in enumerate(per_text):
                if len(token_shift) >= per_token_texts:
                    break
                token_shift.append(df[start : start + L].float().cpu())
                token_strs.append(_token_strs(model, batch.tokens[i].cpu(), batch.count[i].cpu()))
                start += L
    n_tok = int(n.item())
    if n_tok == 0:
        raise ConfigError("texts: no tokens besides BOS; give longer texts.")
    mb, ms = (acc["base"] / n).float().cpu(), (acc["steered"] / n).float().cpu()
    rc, ec = float(dx_sq / n), float(derr_sq / n)
    return ActivationShift(
        sae_hook=h, vector_hooks=list(steered.hook_names), n_tokens=n_tok,
        mean_base=mb, mean_steered=ms, mean_shift=ms - mb, mean_abs_shift=(acc["abs"] / n).float().cpu(),
        residual_change_sq=rc, error_change_sq=ec,
        explained=1.0 - ec / rc if rc > 0 else float("nan"),
        mean_residual_change=(dx_sum / n).float().cpu(), mean_error_change=(derr_sum / n).float().cpu(),
        token_strs=token_strs, token_shift=token_shift,
    )
