"""Logit lens of steering vectors and of steered runs.

* :func:`vector_logit_lens` reads what a vector writes, through the unembedding: the raw logits
  ``W_U·v`` (as in direct logit attribution), the logits of the vector passed through the final
  norm (``W_U·norm(v)``, the logit lens of nostalgebraist 2020 applied to the vector alone), or the
  end-to-end effect (mean change of next-token log-probs over texts when the vector is on).
* :func:`direction_lens` does the same for any direction(s) in the residual stream (SAE decoder
  directions, LoRA B columns ...).
* :func:`layer_logit_lens` is the per-layer logit lens of the residual stream for the steered and the
  base run of one prompt: ``W_U·ln_final(resid_pre[l]) + b_U`` at every layer, exactly TransformerLens's
  ``ActivationCache.accumulated_resid(apply_ln=True)`` projected by ``W_U``.
* :func:`generation_shift` measures, per *generated* position, how the next-token distribution of the
  steered run differs from the base run on the same tokens (total variation, tokens that gain most).
  "Small Vectors, Big Effects" (Sinii et al. 2025) reports a last-layer vector acting mostly on the
  first generated token; this tells whether that holds for a given vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError, EmptyInputError, ShapeMismatchError

__all__ = [
    "GenerationShift",
    "LayerLens",
    "TokenScores",
    "VectorLens",
    "direction_lens",
    "generation_shift",
    "layer_logit_lens",
    "vector_logit_lens",
]

LensMode = Literal["raw", "norm", "effect"]


def _tok_str(model, ids: Sequence[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{i}>" for i in ids]
    return [tok.decode([i]) for i in ids]


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScores:
    """Top and bottom tokens of one score vector over the vocabulary.

    Attributes:
        name: what was scored (a hook name, a feature id ...).
        scores: ``[d_vocab]`` the full scores (CPU).
        top_ids, bottom_ids: ``[k]`` token ids, highest / lowest first.
        top_tokens, bottom_tokens: their strings.
        unit: ``"logits"`` or ``"nats"`` (log-prob change).
    """

    name: str
    scores: Float[Tensor, " d_vocab"]
    top_ids: Tensor
    bottom_ids: Tensor
    top_tokens: list[str]
    bottom_tokens: list[str]
    unit: str

    @property
    def top_values(self) -> Tensor:
        """Scores of :attr:`top_ids`."""
        return self.scores[self.top_ids]

    @property
    def bottom_values(self) -> Tensor:
        """Scores of :attr:`bottom_ids`."""
        return self.scores[self.bottom_ids]

    def rank_of(self, token_id: int) -> int:
        """1-based rank of a token among all scores (1 = highest)."""
        return int((self.scores > self.scores[token_id]).sum()) + 1


def _token_scores(model, name: str, scores: Tensor, k: int, unit: str) -> TokenScores:
    scores = scores.detach().float().cpu()
    k = min(k, scores.shape[0])
    top = scores.topk(k).indices
    bottom = (-scores).topk(k).indices
    return TokenScores(name, scores, top, bottom, _tok_str(model, top.tolist()),
                       _tok_str(model, bottom.tolist()), unit)


@dataclass(frozen=True)
class VectorLens:
    """Result of :func:`vector_logit_lens`: per hook, the tokens a vector promotes and suppresses.

    Attributes:
        mode: ``"raw"``, ``"norm"`` or ``"effect"``.
        per_hook: ``{hook_name: TokenScores}``.
    """

    mode: str
    per_hook: dict[str, TokenScores]

    def __getitem__(self, hook: str) -> TokenScores:
        return self.per_hook[hook]

    def to_pandas(self):
        """Long table: hook, direction (top/bottom), rank, token, token id, value."""
        import pandas as pd

        rows = []
        for h, ts in self.per_hook.items():
            for side, ids, toks in (("top", ts.top_ids, ts.top_tokens), ("bottom", ts.bottom_ids, ts.bottom_tokens)):
                for r, (i, t) in enumerate(zip(ids.tolist(), toks, strict=True), start=1):
                    rows.append({"hook": h, "side": side, "rank": r, "token": t, "token_id": i,
                                 "value": float(ts.scores[i]), "unit": ts.unit})
        return pd.DataFrame(rows)

    def plot(self):
        """Plotly bar charts: top and bottom tokens per hook."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        hooks = list(self.per_hook)
        fig = make_subplots(rows=len(hooks), cols=2, subplot_titles=[f"{h} {s}" for h in hooks
                                                                     for s in ("top", "bottom")])
        for r, h in enumerate(hooks, start=1):
            ts = self.per_hook[h]
            fig.add_trace(go.Bar(x=[repr(t) for t in ts.top_tokens], y=ts.top_values.tolist(),
                                 marker_color="seagreen", showlegend=False), row=r, col=1)
            fig.add_trace(go.Bar(x=[repr(t) for t in ts.bottom_tokens], y=ts.bottom_values.tolist(),
                                 marker_color="indianred", showlegend=False), row=r, col=2)
        unit = next(iter(self.per_hook.values())).unit
        fig.update_layout(title=f"Vector logit lens ({self.mode}, {unit})", height=320 * len(hooks))
        return fig

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html(max_rows=80)


@dataclass(frozen=True)
class LayerLens:
    """Result of :func:`layer_logit_lens`: the logit lens at every layer, steered and base.

    Attributes:
        labels: layer labels (``"0_pre"``, ``"1_pre"``, ..., ``"final_post"``) as in TransformerLens.
        str_tokens: the prompt's tokens.
        steered_logits, base_logits: ``[layer, pos, d_vocab]`` lens logits of each run.
    """

    labels: list[str]
    str_tokens: list[str]
    steered_logits: Float[Tensor, "layer pos d_vocab"]
    base_logits: Float[Tensor, "layer pos d_vocab"]
    token_strings: list[str]

    @property
    def diff(self) -> Float[Tensor, "layer pos d_vocab"]:
        """Change of lens log-probs, steered − base (nats)."""
        return self.steered_logits.log_softmax(-1) - self.base_logits.log_softmax(-1)

    @property
    def kl(self) -> Float[Tensor, "layer pos"]:
        """KL(steered ‖ base) of the lens distributions per layer and position (nats, float64)."""
        p = self.steered_logits.double().log_softmax(-1)
        q = self.base_logits.double().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    def top_tokens(self, run: Literal["steered", "base"] = "steered", position: int = -1) -> list[str]:
        """Top-1 lens token at ``position`` for each layer."""
        logits = self.steered_logits if run == "steered" else self.base_logits
        return [self.token_strings[i] for i in logits[:, position].argmax(-1).tolist()]

    def to_pandas(self, position: int = -1, k: int = 5):
        """Per layer: top-k lens tokens of both runs at ``position`` and the KL between them."""
        import pandas as pd

        rows = []
        kl = self.kl[:, position]
        for li, lab in enumerate(self.labels):
            row = {"layer": lab, "kl_steered_base": float(kl[li])}
            for run, lg in (("steered", self.steered_logits), ("base", self.base_logits)):
                pr = lg[li, position].softmax(-1)
                v, i = pr.topk(k)
                row[f"{run}_top"] = ", ".join(f"{self.token_strings[j]!r}:{p:.2f}"
                                             for j, p in zip(i.tolist(), v.tolist(), strict=True))
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self):
        """Heatmaps over layer × position: top-1 token probability of each run (with the token as
        text) and KL(steered ‖ base)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        x = [f"{i}: {t!r}" for i, t in enumerate(self.str_tokens)]
        fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                            subplot_titles=["steered: top-1 lens token (prob)", "base: top-1 lens token (prob)",
                                            "KL(steered ‖ base), nats"])
        for r, lg in ((1, self.steered_logits), (2, self.base_logits)):
            pr = lg.softmax(-1)
            p, i = pr.max(-1)
            text = [[repr(self.token_strings[j]) for j in row] for row in i.tolist()]
            fig.add_trace(go.Heatmap(z=p.tolist(), x=x, y=self.labels, text=text, texttemplate="%{text}",
                                     colorscale="Blues", zmin=0, zmax=1, showscale=r == 1), row=r, col=1)
        fig.add_trace(go.Heatmap(z=self.kl.float().tolist(), x=x, y=self.labels, colorscale="Reds",
                                 showscale=False), row=3, col=1)
        fig.update_layout(title="Per-layer logit lens, steered vs base", height=300 * 3)
        return fig

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html()


@dataclass(frozen=True)
class GenerationShift:
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

    def to_pandas(self):
        """Per position: mean TV and the top gaining tokens."""
        import pandas as pd

        return pd.DataFrame({
            "position": list(range(self.mean_tv.shape[0])),
            "mean_tv": self.mean_tv.tolist(),
            "top_gains": [", ".join(f"{t!r}:{g:+.3f}" for t, g in row) for row in self.top_gains],
        })

    def plot(self):
        """Bar chart of mean total variation per generated position."""
        from steer_lens.plotting import bar

        fig = bar(self.mean_tv, [str(i) for i in range(self.mean_tv.shape[0])],
                  title=f"Next-token change per generated position (position 0 share "
                        f"{self.first_position_share:.1%})", y_title="total variation")
        fig.update_xaxes(title_text="generated position")
        return fig

    def _repr_html_(self) -> str:
        return self.to_pandas().to_html(max_rows=60)


# ---------------------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------------------
def _apply_final_norm(model, x: Tensor) -> Tensor:
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return x
    shaped = x.reshape(-1, 1, x.shape[-1]).to(model.cfg.dtype)
    return ln(shaped).reshape(x.shape)


def direction_lens(
    model,
    directions: Float[Tensor, "n d_model"] | Float[Tensor, " d_model"],
    *,
    k: int = 20,
    mode: Literal["raw", "norm"] = "raw",
    names: Sequence[str] | None = None,
) -> list[TokenScores]:
    """Read residual-stream directions through the unembedding.

    ``mode="raw"``: ``W_U·d`` (logits per unit of the direction; no bias). ``mode="norm"``:
    ``W_U·ln_final(d)``, the direction treated as a residual on its own.

    Args:
        model: the model whose ``W_U`` (and ``ln_final``) is used.
        directions: ``[d_model]`` or ``[n, d_model]``.
        k: tokens to keep at each end.
        mode: ``"raw"`` or ``"norm"``.
        names: a name per direction (default ``"0"``, ``"1"``, ...).

    Returns:
        One :class:`TokenScores` per direction (unit ``"logits"``).

    Raises:
        ShapeMismatchError: the last dimension is not ``d_model``.
        ConfigError: bad ``mode`` or ``k``.
    """
    if mode not in ("raw", "norm"):
        raise ConfigError(f"mode: expected 'raw' or 'norm', got {mode!r}.")
    if k < 1:
        raise ConfigError(f"k: expected >= 1, got {k}.")
    d = directions.detach()
    if d.ndim == 1:
        d = d[None]
    if d.shape[-1] != model.cfg.d_model:
        raise ShapeMismatchError(
            f"directions: expected last dimension d_model={model.cfg.d_model}, got shape {list(d.shape)}."
        )
    names = list(names) if names is not None else [str(i) for i in range(d.shape[0])]
    W_U = model.W_U.detach()
    with torch.no_grad():
        d = d.to(W_U.device, W_U.dtype)
        if mode == "norm":
            d = _apply_final_norm(model, d)
        scores = d.float() @ W_U.float()
    return [_token_scores(model, n, s, k, "logits") for n, s in zip(names, scores, strict=True)]


def vector_logit_lens(
    steered,
    *,
    k: int = 20,
    mode: LensMode = "raw",
    texts: Sequence[str] | None = None,
) -> VectorLens:
    """Top and bottom ``k`` tokens of each steering vector, read through the unembedding.

    Modes:
        ``"raw"``: ``W_U·v`` in logits, the vector's direct logit attribution (no final norm).
        ``"norm"``: ``W_U·ln_final(v)``, the vector alone treated as a final residual.
        ``"effect"``: the mean change of next-token log-probs (nats) over every position of
        ``texts`` when the vectors are on (all vectors at once; the result has one entry, keyed
        ``"all"``), the end-to-end effect that includes every layer after the vector.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        k: tokens at each end.
        mode: see above.
        texts: required for ``mode="effect"``.

    Returns:
        A :class:`VectorLens`.

    Raises:
        ConfigError: bad mode, or ``"effect"`` without texts.
        EmptyInputError: ``texts`` empty.
    """
    if mode not in ("raw", "norm", "effect"):
        raise ConfigError(f"mode: expected 'raw', 'norm' or 'effect', got {mode!r}.")
    if mode != "effect":
        hooks = list(steered.hook_names)
        vecs = torch.stack([steered.vectors.direction(h).detach() * steered.scale for h in hooks])
        res = direction_lens(steered.model, vecs, k=k, mode=mode, names=hooks)
        return VectorLens(mode, {r.name: r for r in res})
    if texts is None:
        raise ConfigError("mode='effect' needs texts: pass texts=[...] to average the effect over.")
    texts = list(texts)
    if not texts:
        raise EmptyInputError("texts: got an empty list; give at least one text.")
    total = None
    count = 0
    with torch.no_grad():
        for t in texts:
            toks = steered.to_tokens(t)[None]
            on = steered(toks).float().log_softmax(-1)[0]
            with steered.disabled():
                off = steered(toks).float().log_softmax(-1)[0]
            s = (on - off).sum(0)
            total = s if total is None else total + s
            count += toks.shape[1]
    scores = total / count
    return VectorLens(mode, {"all": _token_scores(steered.model, "all", scores, k, "nats")})


def layer_logit_lens(steered, prompt: str | Tensor) -> LayerLens:
    """The per-layer logit lens of one prompt for the steered and the base run.

    At each layer ``l`` (the residual stream before block ``l``, and after the last block) the lens
    logits are ``ln_final(resid) @ W_U + b_U`` with the final norm recomputed on that residual:
    TransformerLens's ``cache.accumulated_resid(apply_ln=True)`` projected by ``W_U``. The steered
    run's residual at a steered hook includes the vector.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        prompt: text (BOS is prepended) or token ids ``[pos]`` / ``[1, pos]``.

    Returns:
        A :class:`LayerLens` with logits ``[n_layers + 1, pos, d_vocab]`` for both runs.
    """
    model = steered.model
    toks = steered.to_tokens(prompt)[None] if isinstance(prompt, str) else prompt.reshape(1, -1)
    toks = toks.to(steered.device)
    names = lambda n: "resid_pre" in n or n == f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" \
        or n.startswith("ln_final")

    def lens(cache) -> tuple[Tensor, list[str]]:
        stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
        out = stack[:, 0].float() @ model.W_U.float()
        if getattr(model, "b_U", None) is not None:
            out = out + model.b_U.float()
        return out.cpu(), labels

    with torch.no_grad():
        _, cache_s = steered.run_with_cache(toks, names_filter=names)
        steered_logits, labels = lens(cache_s)
        with steered.disabled():
            _, cache_b = steered.run_with_cache(toks, names_filter=names)
        base_logits, _ = lens(cache_b)
    str_tokens = _tok_str(model, toks[0].tolist())
    vocab = _tok_str(model, list(range(int(model.cfg.d_vocab_out))))
    return LayerLens(list(labels), str_tokens, steered_logits, base_logits, vocab)


def generation_shift(
    steered,
    prompts: str | Sequence[str] | Int[Tensor, "batch pos"],
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
    ``½ Σ|p_steered − p_base|`` and the tokens whose mean probability gains most.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        prompts: one prompt, several, or token ids ``[batch, pos]``.
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
    vocab_ids = gains.topk(k, dim=-1)
    top = [[(_tok_str(steered.model, [i])[0], float(g)) for i, g in zip(ids.tolist(), vals.tolist(), strict=True)]
           for ids, vals in zip(vocab_ids.indices, vocab_ids.values, strict=True)]
    share = float(mean_tv[0] / mean_tv.sum()) if mean_tv.sum() > 0 else float("nan")
    return GenerationShift(tv, mean_tv, share, top)
