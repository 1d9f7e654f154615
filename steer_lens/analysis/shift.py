"""What changes when the vectors are on: the next-token distribution per generated position, and the
SAE features at a hook. Both compare a steered run with the base run on the same tokens.

* :func:`generation_shift` measures, per *generated* position, how the next-token distribution of the
  steered run differs from the base run on the same tokens (total variation, tokens that gain most).
  "Small Vectors, Big Effects" (Sinii et al. 2025) reports a last-layer vector acting mostly on the
  first generated token; this tells whether that holds for a given vector.
* :func:`activation_shift` measures the mean change of every SAE feature's activation at the SAE's
  hook (the vector may sit upstream of the SAE), keeps per-token values for circuitsvis, and how much
  of the residual-stream change the SAE's features explain (the rest is the change in the SAE's error
  term). It takes a sae-lens ``SAE`` or a :class:`~steer_lens.sae.TrainedSAE`; sae-lens itself is
  imported only when an SAE is loaded or trained.

The two live together because they are one analysis at two places - the output distribution and a
hook's feature basis - with the same result surface (:class:`~steer_lens.results.Result`: ``top``,
``plot``, ``token_view``); the SAE plumbing they need stays in :mod:`steer_lens.sae`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import Prompt, token_strings
from steer_lens.errors import ConfigError
from steer_lens.results import Result
from steer_lens.sae import _core
from steer_lens.sae._core import SAELike
from steer_lens.steering import SteeredTransformer

__all__ = ["ActivationShift", "GenerationShift", "activation_shift", "generation_shift"]


# ---------------------------------------------------------------------------------------------------
# per generated position
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationShift(Result):
    """Result of :func:`generation_shift`: per generated position, how steering changes the
    next-token distribution (teacher-forced on steered samples).

    Attributes:
        tv: ``[samples, new]`` total variation distance between steered and base next-token
            distributions at each generated position (NaN after a sequence ended).
        mean_tv: ``[new]`` mean over samples.
        first_position_share: position 0's share of the summed mean TV over positions.
        top_gains: per position, the tokens whose mean probability gained most, with the gain.
    """

    tv: Float[Tensor, "samples new"]
    mean_tv: Float[Tensor, " new"]
    first_position_share: float
    top_gains: list[list[tuple[str, float]]]

    _rank_by = "mean_tv"
    _html_rows = 60

    def to_pandas(self):
        """Per position: mean TV and the top gaining tokens."""
        import pandas as pd

        return pd.DataFrame({
            "position": list(range(self.mean_tv.shape[0])),
            "mean_tv": self.mean_tv.tolist(),
            "top_gains": [", ".join(f"{t!r}:{g:+.3f}" for t, g in row) for row in self.top_gains],
        })

    def top(self, k: int = 10):
        """The positions in order (at most ``k``): the table is per generated position."""
        return self.to_pandas().head(k).reset_index(drop=True)

    def plot(self):
        """Bar chart of mean total variation per generated position."""
        from steer_lens.plotting import bar

        return bar(self.mean_tv, [str(i) for i in range(self.mean_tv.shape[0])],
                   title=f"Next-token change per generated position (position 0 share "
                         f"{self.first_position_share:.1%})", y_title="total variation",
                   x_title="generated position")

    def _summary(self) -> str:
        return (f"<b>GenerationShift</b> over {self.tv.shape[0]} samples: position 0 carries "
                f"{self.first_position_share:.1%} of the total variation")


def generation_shift(
    steered: SteeredTransformer,
    prompts: Prompt | Sequence[Prompt] | Int[Tensor, "batch pos"],
    *,
    max_new_tokens: int = 40,
    n_samples: int = 8,
    seed: int = 0,
    k: int = 5,
    temperature: float = 1.0,
) -> GenerationShift:
    """Per generated position, the change of the next-token distribution caused by the vectors.

    Samples ``n_samples`` continuations per prompt with the vectors on, then runs the same tokens
    with and without the vectors and compares the next-token distributions at each generated
    position ``j`` (the prediction of generated token ``j``): total variation
    ``½ Σ|p_steered − p_base|`` (a probability, in [0, 1]) and the tokens whose mean probability gains
    most (Sinii et al. 2025, "Small Vectors, Big Effects").

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        prompts: one prompt, several, or token ids ``[batch, pos]``; a prompt is a text or a
            conversation (``[{"role": "user", "content": ...}]``, rendered by the chat template).
        max_new_tokens: generated positions to measure.
        n_samples: samples per prompt.
        seed: sampling seed.
        k: tokens listed per position.
        temperature: sampling temperature.

    Returns:
        A :class:`GenerationShift`.

    Raises:
        EmptyInputError: no prompts.
    """
    from steer_lens.generation import repeat_prompts

    prompts = repeat_prompts(prompts, n_samples)
    gen = steered.sample(prompts, max_new_tokens, seed=seed, temperature=temperature)
    P = gen.prompt_len
    plens = [P] * gen.tokens.shape[0]  # so positions="prompt"/"generated" act as during sampling
    with torch.no_grad():
        on = steered(gen.tokens, attention_mask=gen.attention_mask, prompt_lengths=plens).float().softmax(-1)
        with steered.disabled():
            off = steered(gen.tokens, attention_mask=gen.attention_mask).float().softmax(-1)
    # logits at position P-1+j predict generated token j
    on = on[:, P - 1 : P - 1 + max_new_tokens]
    off = off[:, P - 1 : P - 1 + max_new_tokens]
    mask = gen.completion_mask.float()
    tv = 0.5 * (on - off).abs().sum(-1)
    tv = torch.where(gen.completion_mask, tv, torch.full_like(tv, float("nan"))).cpu()
    denom = mask.sum(0).clamp(min=1)
    mean_tv = ((torch.nan_to_num(tv.to(mask.device)) * mask).sum(0) / denom).cpu()
    gains = (((on - off) * mask[..., None]).sum(0) / denom[:, None]).cpu()
    best = gains.topk(k, dim=-1)
    names = token_strings(steered, best.indices)
    top = [list(zip(row, vals.tolist(), strict=True)) for row, vals in zip(names, best.values, strict=True)]
    share = float(mean_tv[0] / mean_tv.sum()) if mean_tv.sum() > 0 else float("nan")
    return GenerationShift(tv, mean_tv, share, top)


# ---------------------------------------------------------------------------------------------------
# SAE features at a hook
# ---------------------------------------------------------------------------------------------------
ShiftOrder = Literal["shift", "negative", "abs"]


@dataclass(frozen=True, kw_only=True)
class ActivationShift(Result):
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
        str_tokens: per stored text, its tokens (strings). token_shift: per stored text,
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
    str_tokens: list[list[str]] = field(repr=False)
    token_shift: list[Float[Tensor, "_pos d_sae"]] = field(repr=False)

    _html_rows = 10

    @property
    def explained_mean(self) -> float:
        """Fraction of the *mean* residual change explained by the features' mean change:
        ``1 - ||mean Δe||^2 / ||mean Δx||^2``."""
        den = float(self.mean_residual_change.double().pow(2).sum())
        num = float(self.mean_error_change.double().pow(2).sum())
        return 1.0 - num / den if den > 0 else float("nan")

    def _top_ids(self, k: int, by: ShiftOrder) -> Int[Tensor, " k"]:
        vals = {"shift": self.mean_shift, "negative": -self.mean_shift, "abs": self.mean_abs_shift}
        if by not in vals:
            raise ConfigError(f"by: expected 'shift', 'negative' or 'abs', got {by!r}.")
        return torch.topk(vals[by], min(k, len(self.mean_shift))).indices

    def to_pandas(self, k: int = 20, *, by: ShiftOrder = "abs"):
        """Top ``k`` features: ``feature``, ``mean_shift``, ``mean_abs_shift``, ``mean_base``, ``mean_steered``.

        Args:
            k: features listed.
            by: order: largest ``mean_shift`` (``"shift"``), most negative (``"negative"``) or largest
                ``mean_abs_shift`` (``"abs"``).

        Raises:
            ConfigError: unknown ``by``.
        """
        import pandas as pd

        idx = self._top_ids(k, by)
        return pd.DataFrame({
            "feature": idx.tolist(), "mean_shift": self.mean_shift[idx].tolist(),
            "mean_abs_shift": self.mean_abs_shift[idx].tolist(),
            "mean_base": self.mean_base[idx].tolist(), "mean_steered": self.mean_steered[idx].tolist(),
        })

    def top(self, k: int = 20, *, by: ShiftOrder = "abs"):
        """The ``k`` features that shift most: :meth:`to_pandas` ``(k, by=by)`` (a DataFrame)."""
        return self.to_pandas(k, by=by)

    def plot(self, k: int = 20):
        """Bar chart of the top features' mean shift (plotly Figure)."""
        from steer_lens.plotting import bar

        df = self.to_pandas(k)
        return bar(df.mean_shift, [f"f{f}" for f in df.feature],
                   hovertext=[f"base {b:.3g} → steered {s:.3g}" for b, s in zip(df.mean_base, df.mean_steered,
                                                                                 strict=True)],
                   title=f"feature shift at {self.sae_hook} (SAE explains {self.explained:.1%} of the residual change)",
                   x_title="feature", y_title="mean activation change (steered − base)")

    def token_view(self, feature: int | None = None, *, text: int | None = None):
        """circuitsvis ``colored_tokens``: the per-token shift of one feature (default: the largest mean
        absolute shift) over the stored texts, one per line (or text ``text`` only).

        Raises:
            ConfigError: no per-token values were stored (``per_token_texts=0``).
        """
        from steer_lens.plotting import token_view

        if not self.token_shift:
            raise ConfigError("no per-token values were stored (per_token_texts=0).")
        f = int(self._top_ids(1, "abs")[0]) if feature is None else int(feature)
        which = range(len(self.token_shift)) if text is None else [text]
        return token_view([self.str_tokens[i] for i in which], [self.token_shift[i][:, f] for i in which])

    def _summary(self) -> str:
        return (f"SAE at <code>{self.sae_hook}</code>, vectors at {self.vector_hooks}, {self.n_tokens} "
                f"tokens; features explain {self.explained:.1%} of the residual change per token, "
                f"{self.explained_mean:.1%} of its mean")


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
        per_token_texts: how many of the first texts keep per-token values (for :meth:`ActivationShift.token_view`).

    Returns:
        :class:`ActivationShift` (activations in the SAE's units).

    Raises:
        EmptyInputError: no texts. HookNameError / ShapeMismatchError: SAE and model do not match.
        ConfigError: the texts have no tokens besides BOS.

    Warns:
        HookMismatchWarning: every vector is downstream of the SAE's hook (nothing can shift).
    """
    sae = _core.as_sae(sae)
    model = steered.model
    _core.check_nonempty(texts)
    h = _core.check_sae(model, sae)
    _core.warn_if_vectors_after(steered, h)
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    dev = sae.W_dec.device
    acc = {n: torch.zeros(d_sae, dtype=torch.float64, device=dev) for n in ("base", "steered", "abs")}
    dx_sum = torch.zeros(d_in, dtype=torch.float64, device=dev)
    derr_sum = torch.zeros(d_in, dtype=torch.float64, device=dev)
    dx_sq = torch.zeros((), dtype=torch.float64, device=dev)
    derr_sq = torch.zeros((), dtype=torch.float64, device=dev)
    n = torch.zeros((), dtype=torch.float64, device=dev)
    str_tokens: list[list[str]] = []
    token_shift: list[Tensor] = []
    for batch in _core.iter_batches(model, texts, batch_size=batch_size):
        kw = {**_core.run_kwargs(model, h, batch, stop=True), "return_type": None}
        x_b, _ = _core.capture(model.run_with_hooks, batch.tokens, h, kw)
        x_s, _ = _core.capture(steered.run_with_hooks, batch.tokens, h, kw)
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
            start = 0
            for i, L in enumerate(c.sum(1).tolist()):
                if len(token_shift) >= per_token_texts:
                    break
                token_shift.append(df[start : start + L].float().cpu())
                str_tokens.append(token_strings(model, batch.tokens[i].cpu()[batch.count[i].cpu()]))
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
        str_tokens=str_tokens, token_shift=token_shift,
    )
