"""Evaluating a sparse autoencoder on a model's activations: :func:`evaluate` and :class:`SAEQuality`.

FVU, L0 and dead features of the SAE's reconstruction over a corpus, and the cross-entropy loss
recovered when the reconstruction replaces the activation, as in sae-lens's evals (zero ablation as
the reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens._utils import unwrap
from steer_lens.errors import EmptyInputError
from steer_lens.results import Result
from steer_lens.sae._core import ModelLike, SAELike, as_sae, check_nonempty, check_sae, iter_batches

__all__ = ["SAEQuality", "evaluate"]


# ---------------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SAEQuality(Result):
    """How well an SAE reconstructs a model's activations on a corpus (see :func:`evaluate`).

    Attributes:
        hook: the hook point.
        n_tokens: tokens evaluated (BOS and padding excluded).
        fvu: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
        l0: mean number of active features per token.
        dead_features: features that never fired on the corpus.
        d_sae: number of features.
        ce_clean: next-token cross-entropy of the model, nats/token.
        ce_spliced: the same with the SAE's reconstruction replacing the activation (no error term).
        ce_zero_ablation: the same with the activation replaced by zeros.
        loss_recovered: ``(ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)``.
        feature_density: ``[d_sae]`` fraction of tokens on which each feature fires.
    """

    hook: str
    n_tokens: int
    fvu: float
    l0: float
    dead_features: int
    d_sae: int
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    loss_recovered: float
    feature_density: Float[Tensor, " d_sae"] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields as a JSON-ready dict."""
        d = asdict(self)
        d.pop("feature_density")
        return d

    def to_pandas(self):
        """One-row DataFrame of the scalar fields."""
        import pandas as pd

        return pd.DataFrame([self.to_dict()])

    def plot(self):
        """Histogram of log10 feature density (plotly Figure)."""
        from steer_lens.plotting import histogram

        return histogram(
            torch.log10(self.feature_density.double() + 1e-10),
            title=f"SAE feature density at {self.hook} (FVU {self.fvu:.3f}, L0 {self.l0:.1f}, "
            f"dead {self.dead_features}/{self.d_sae})",
            x_title="log10 fraction of tokens on which the feature fires",
            y_title="features",
        )

    def _summary(self) -> str:
        return f"<b>SAEQuality</b> at <code>{self.hook}</code> on {self.n_tokens} tokens"


def _next_token_ce(logits: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of next-token cross-entropy (nats) over positions where both tokens are real, and count."""
    lp = logits[:, :-1].float().log_softmax(-1)
    nll = -lp.gather(-1, tokens[:, 1:, None])[..., 0]
    m = (mask[:, :-1] * mask[:, 1:]).bool()
    return (nll * m).sum().double(), m.sum()


@torch.no_grad()
def evaluate(model: ModelLike, sae: SAELike, texts: Any, *, hook: str | None = None, batch_size: int = 16) -> SAEQuality:
    """Measure an SAE on a corpus: FVU, L0, dead features, and cross-entropy loss recovered.

    Three forward passes per batch: the clean model, the model with the SAE's reconstruction spliced
    in at its hook (no error term), and with the activation zero-ablated. Streams the texts; memory
    is ``O(batch * pos * d_sae)``.

    Args:
        model: a HookedTransformer (or a SteeredTransformer: its base model is used).
        sae: a sae-lens SAE or a :class:`TrainedSAE`.
        texts: strings (BOS prepended, BOS excluded from the statistics), dataset rows with ``"text"``,
            or token ids.
        hook: override of the SAE's hook (normally read from its metadata).
        batch_size: texts per forward pass.

    Returns:
        :class:`SAEQuality` (cross-entropies in nats/token).

    Raises:
        EmptyInputError: no texts. HookNameError, ShapeMismatchError, ConfigError: see ``check``.
    """
    model = unwrap(model)
    sae = as_sae(sae)
    check_nonempty(texts)
    hook = check_sae(model, sae, hook)
    d_sae = int(sae.cfg.d_sae)
    dev = sae.W_dec.device
    sq_err = torch.zeros((), dtype=torch.float64, device=dev)
    sum_x = torch.zeros(int(sae.cfg.d_in), dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    l0_sum = torch.zeros((), dtype=torch.float64, device=dev)
    fires = torch.zeros(d_sae, dtype=torch.float64, device=dev)
    n = torch.zeros((), dtype=torch.float64, device=dev)
    ce = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("clean", "spliced", "zero")}
    ce_n = torch.zeros((), dtype=torch.float64, device=dev)
    for batch in iter_batches(model, texts, batch_size=batch_size):
        kw = {"attention_mask": batch.attention_mask}
        stats: dict[str, Tensor] = {}

        def splice(act, hook, stats=stats, batch=batch):
            x = act.to(sae.dtype)
            f = sae.encode(x)
            recon = sae.decode(f)
            c = batch.count.to(dev)
            xm, rm, fm = x[c].double(), recon[c].double(), f[c]
            stats["sq_err"] = (xm - rm).pow(2).sum()
            stats["sum_x"] = xm.sum(0)
            stats["sum_sq"] = xm.pow(2).sum()
            stats["l0"] = (fm > 0).sum().double()
            stats["fires"] = (fm > 0).sum(0).double()
            stats["n"] = c.sum().double()
            return recon.to(act.dtype)

        logits = model(batch.tokens, **kw)
        s, cnt = _next_token_ce(logits, batch.tokens, batch.attention_mask)
        ce["clean"] += s.to(dev)
        ce_n += cnt.to(dev)
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(hook, splice)], **kw)
        ce["spliced"] += _next_token_ce(logits, batch.tokens, batch.attention_mask)[0].to(dev)
        logits = model.run_with_hooks(
            batch.tokens, fwd_hooks=[(hook, lambda act, hook: torch.zeros_like(act))], **kw
        )
        ce["zero"] += _next_token_ce(logits, batch.tokens, batch.attention_mask)[0].to(dev)
        sq_err += stats["sq_err"]
        sum_x += stats["sum_x"]
        sum_sq += stats["sum_sq"]
        l0_sum += stats["l0"]
        fires += stats["fires"]
        n += stats["n"]
    n_tok = int(n.item())
    if n_tok == 0:
        raise EmptyInputError("texts: no tokens to evaluate (every text was only BOS).")
    total_var = sum_sq - sum_x.pow(2).sum() / n
    ce_vals = {k: float(v / ce_n.clamp(min=1)) for k, v in ce.items()}
    denom = ce_vals["zero"] - ce_vals["clean"]
    return SAEQuality(
        hook=hook,
        n_tokens=n_tok,
        fvu=float(sq_err / total_var),
        l0=float(l0_sum / n),
        dead_features=int((fires == 0).sum()),
        d_sae=d_sae,
        ce_clean=ce_vals["clean"],
        ce_spliced=ce_vals["spliced"],
        ce_zero_ablation=ce_vals["zero"],
        loss_recovered=(ce_vals["zero"] - ce_vals["spliced"]) / denom if denom != 0 else float("nan"),
        feature_density=(fires / n).float().cpu(),
    )
