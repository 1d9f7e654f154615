"""Logit lens of steering vectors, of residual directions, and of steered runs.

* :func:`vector_logit_lens` reads what a vector writes, through the unembedding: the raw logits
  ``W_U·v`` (as in direct logit attribution), the logits of the vector passed through the final
  norm (``W_U·norm(v)``, the logit lens of nostalgebraist 2020 applied to the vector alone), the
  cosine between ``v`` and each token's unembedding ``W_U[:, t]`` (the vector logit lens of Sinii et
  al. 2025, with the dot product beside it), or the end-to-end effect (mean change of next-token
  log-probs over texts when the vector is on).
* :func:`direction_lens` does the same for any direction(s) in the residual stream (SAE decoder
  directions, LoRA B columns ...).
* :func:`layer_logit_lens` is the per-layer logit lens of the residual stream for the steered and the
  base run of one prompt: ``W_U·ln_final(resid_pre[l]) + b_U`` at every layer, exactly TransformerLens's
  ``ActivationCache.accumulated_resid(apply_ln=True)`` projected by ``W_U``.

How the next-token distribution shifts per *generated* position (:func:`generation_shift`) is an
analysis of a steered run, not a lens: it lives with the other shifts in :mod:`steer_lens.analysis`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import check_token_ids, token_strings, unwrap
from steer_lens.errors import ConfigError, EmptyInputError, ShapeMismatchError
from steer_lens.results import Result

__all__ = [
    "DirectionLogitLens",
    "LayerLogitLens",
    "TokenScores",
    "VectorLogitLens",
    "direction_lens",
    "layer_logit_lens",
    "vector_logit_lens",
]

LensMode = Literal["raw", "norm", "cosine", "effect"]
"""The modes of :func:`vector_logit_lens` (:func:`direction_lens` takes all but ``"effect"``)."""

_COSINE_EPS = 1e-12
"""Smallest norm of an unembedding column in ``mode="cosine"`` (a zero column gets cosine 0)."""

_TABLE_K = 10
"""Lens tokens per layer and position whose strings a :class:`LayerLogitLens` keeps (``to_pandas(k<=10)``)."""

_REPR_K = 5
"""Tokens per side that the short reprs (``print(lens)``) show."""


def _scored(tokens: Sequence[str], values: Tensor) -> str:
    """``'dog' 1.23, 'cat' 0.98`` for the reprs (the first :data:`_REPR_K` entries)."""
    return ", ".join(f"{t!r} {float(v):.3g}" for t, v in zip(tokens[:_REPR_K], values[:_REPR_K].tolist(), strict=False))


def _labels(model, ids: Sequence[int]) -> list[str]:
    """Vocabulary labels: the token strings, or ``<id>`` for a model without a tokenizer."""
    if getattr(unwrap(model), "tokenizer", None) is None:
        return [f"<{i}>" for i in ids]
    return token_strings(model, list(ids))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScores(Result):
    """Top and bottom tokens of one score vector over the vocabulary.

    Attributes:
        name: what was scored (a hook name, a feature id ...).
        scores: ``[d_vocab]`` the full scores (CPU).
        top_ids, bottom_ids: ``[k]`` token ids, highest / lowest first.
        top_tokens, bottom_tokens: their strings.
        unit: ``"logits"``, ``"nats"`` (log-prob change) or ``"cosine"``.
        dot: ``[d_vocab]`` the dot products ``W_U[:, t]·v`` (logits) beside cosine scores
            (``mode="cosine"``); ``None`` in the other modes.
    """

    name: str
    scores: Float[Tensor, " d_vocab"]
    top_ids: Int[Tensor, " k"]
    bottom_ids: Int[Tensor, " k"]
    top_tokens: list[str]
    bottom_tokens: list[str]
    unit: str
    dot: Float[Tensor, " d_vocab"] | None = field(default=None, repr=False)

    @property
    def top_values(self) -> Float[Tensor, " k"]:
        """Scores of :attr:`top_ids`."""
        return self.scores[self.top_ids]

    @property
    def bottom_values(self) -> Float[Tensor, " k"]:
        """Scores of :attr:`bottom_ids`."""
        return self.scores[self.bottom_ids]

    def rank_of(self, token_id: int) -> int:
        """1-based rank of a token among all scores (1 = highest)."""
        return int((self.scores > self.scores[token_id]).sum()) + 1

    def to_pandas(self):
        """Long table: ``name, side`` (top / bottom), ``rank, token, token_id, value, unit``, and
        ``dot`` (the dot product ``W_U[:, t]·v``, logits) when the scores are cosines."""
        import pandas as pd

        rows = []
        for side, ids, toks in (("top", self.top_ids, self.top_tokens), ("bottom", self.bottom_ids, self.bottom_tokens)):
            for r, (i, t) in enumerate(zip(ids.tolist(), toks, strict=True), start=1):
                row = {"name": self.name, "side": side, "rank": r, "token": t, "token_id": i,
                       "value": float(self.scores[i]), "unit": self.unit}
                if self.dot is not None:
                    row["dot"] = float(self.dot[i])
                rows.append(row)
        return pd.DataFrame(rows)

    def top(self, k: int = 10):
        """The ``k`` most promoted and ``k`` most suppressed tokens (rows of :meth:`to_pandas` with ``rank <= k``)."""
        return _ranked(self.to_pandas(), k)

    def plot(self):
        """Two bar panels: the promoted (top) and suppressed (bottom) tokens."""
        return _top_bottom_figure({self.name: self}, title=f"Logit lens of {self.name} ({self.unit})")

    def _summary(self) -> str:
        return f"<b>TokenScores</b> of <code>{self.name}</code> ({self.unit})"

    def _line(self) -> str:
        return f"top [{_scored(self.top_tokens, self.top_values)}]; bottom [{_scored(self.bottom_tokens, self.bottom_values)}]"

    def __repr__(self) -> str:
        """Name, unit, vocabulary size and the first top / bottom tokens with their scores (no tensors)."""
        return f"TokenScores({self.name!r}, {self.unit} over {self.scores.shape[0]} tokens: {self._line()})"


def _ranked(df, k: int):
    return df[df["rank"] <= k].reset_index(drop=True)


def _top_bottom_figure(per_name: dict[str, TokenScores], *, title: str):
    from steer_lens import plotting

    panels = [[plotting.bar(ts.top_values, [repr(t) for t in ts.top_tokens], color="seagreen"),
               plotting.bar(ts.bottom_values, [repr(t) for t in ts.bottom_tokens], color="indianred")]
              for ts in per_name.values()]
    titles = [f"{n} {s}" for n in per_name for s in ("top", "bottom")]
    return plotting.grid(panels, titles=titles, title=title, showlegend=False)


def _token_scores(model, name: str, scores: Tensor, k: int, unit: str, dot: Tensor | None = None) -> TokenScores:
    scores = scores.detach().float().cpu()
    k = min(k, scores.shape[0])
    top = scores.topk(k).indices
    bottom = (-scores).topk(k).indices
    dot = None if dot is None else dot.detach().float().cpu()
    return TokenScores(name, scores, top, bottom, _labels(model, top.tolist()), _labels(model, bottom.tolist()),
                       unit, dot)


@dataclass(frozen=True)
class DirectionLogitLens(Result):
    """Result of :func:`direction_lens`: per direction, the tokens it promotes and suppresses.

    A read-only container keyed by name: ``lens["f12"]`` is one :class:`TokenScores`,
    ``lens.keys()`` the names, ``lens.items()`` / ``lens.values()`` / ``lens.get(name)`` and
    ``name in lens`` as for a dict. Iterating yields the :class:`TokenScores` in order (as since the
    first release; use ``lens.keys()`` for the names). ``print(lens)`` shows the first tokens of
    each direction, never the full score tensors.

    Attributes:
        mode: ``"raw"``, ``"norm"``, ``"cosine"`` or ``"effect"``.
        per_name: ``{name: TokenScores}`` (for a vector lens the names are hook names).
    """

    mode: str
    per_name: dict[str, TokenScores]

    def __getitem__(self, name: str) -> TokenScores:
        return self.per_name[name]

    def __iter__(self) -> Iterator[TokenScores]:
        return iter(self.per_name.values())

    def __len__(self) -> int:
        return len(self.per_name)

    def __contains__(self, name: object) -> bool:
        return name in self.per_name

    def keys(self):
        """The direction names (hook names for a vector lens), in order."""
        return self.per_name.keys()

    def values(self):
        """The :class:`TokenScores`, in order."""
        return self.per_name.values()

    def items(self):
        """``(name, TokenScores)`` pairs, in order."""
        return self.per_name.items()

    def get(self, name: str, default: TokenScores | None = None) -> TokenScores | None:
        """The :class:`TokenScores` of ``name``, or ``default`` when there is none."""
        return self.per_name.get(name, default)

    def __repr__(self) -> str:
        """Mode, unit and per name the first top / bottom tokens with their scores (no tensors)."""
        unit = next(iter(self.per_name.values())).unit if self.per_name else "-"
        rows = "".join(f"\n  {n}: {ts._line()}" for n, ts in self.per_name.items())
        return f"{type(self).__name__}(mode={self.mode!r}, unit={unit!r}, {len(self)} direction(s)){rows}"

    @property
    def scores(self) -> Float[Tensor, "n d_vocab"]:
        """The full scores of every direction, stacked in order."""
        return torch.stack([ts.scores for ts in self])

    def to_pandas(self):
        """Long table: ``name, side, rank, token, token_id, value, unit`` for every direction."""
        import pandas as pd

        return pd.concat([ts.to_pandas() for ts in self], ignore_index=True)

    def top(self, k: int = 10):
        """Per direction, the ``k`` most promoted and suppressed tokens (rows with ``rank <= k``)."""
        return _ranked(self.to_pandas(), k)

    def plot(self):
        """Plotly bar charts: top and bottom tokens per direction."""
        unit = next(iter(self)).unit
        return _top_bottom_figure(self.per_name, title=f"{self._title} ({self.mode}, {unit})")

    _title = "Logit lens of directions"

    def _summary(self) -> str:
        return f"<b>{type(self).__name__}</b> ({self.mode}) of {list(self.per_name)}"


@dataclass(frozen=True, repr=False)  # the short repr of DirectionLogitLens
class VectorLogitLens(DirectionLogitLens):
    """Result of :func:`vector_logit_lens`: per hook, the tokens a vector promotes and suppresses.

    ``lens[hook]`` is the :class:`TokenScores` of the vector at ``hook`` (``lens["all"]`` for
    ``mode="effect"``); ``lens.keys()`` are the hook names (see :class:`DirectionLogitLens` for the
    dict-like methods).

    Attributes:
        mode: ``"raw"``, ``"norm"``, ``"cosine"`` or ``"effect"``.
        per_name: ``{hook_name: TokenScores}``.
    """

    _title = "Vector logit lens"


@dataclass(frozen=True)
class LayerLogitLens(Result):
    """Result of :func:`layer_logit_lens`: the logit lens at every layer, steered and base.

    Attributes:
        labels: layer labels (``"0_pre"``, ``"1_pre"``, ..., ``"final_post"``) as in TransformerLens.
        str_tokens: the prompt's tokens (as ``HookedTransformer.to_str_tokens``).
        steered_logits, base_logits: ``[layer, pos, d_vocab]`` lens logits of each run.
        decoded: the strings of the vocabulary entries the tables and figures name: the top-10 lens
            tokens of both runs at every layer and position (``{token_id: string}``).
    """

    labels: list[str]
    str_tokens: list[str]
    steered_logits: Float[Tensor, "layer pos d_vocab"]
    base_logits: Float[Tensor, "layer pos d_vocab"]
    decoded: dict[int, str] = field(repr=False)

    def _str(self, token_id: int) -> str:
        return self.decoded.get(token_id, f"<{token_id}>")

    def _logits(self, run: Literal["steered", "base"]) -> Tensor:
        if run not in ("steered", "base"):
            raise ConfigError(f"run: expected 'steered' or 'base', got {run!r}.")
        return self.steered_logits if run == "steered" else self.base_logits

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
        """Top-1 lens token at ``position`` for each layer.

        Raises:
            ConfigError: ``run`` is not ``"steered"`` or ``"base"``.
        """
        return [self._str(i) for i in self._logits(run)[:, position].argmax(-1).tolist()]

    def to_pandas(self, position: int = -1, k: int = 5):
        """Per layer: top-k lens tokens (probabilities) of both runs at ``position`` and the KL between them.

        Raises:
            ConfigError: ``k`` is not in ``[1, 10]``.
        """
        import pandas as pd

        if not 1 <= int(k) <= _TABLE_K:
            raise ConfigError(f"k: expected 1..{_TABLE_K} (the lens tokens kept per layer and position), got {k}.")
        rows = []
        kl = self.kl[:, position]
        for li, lab in enumerate(self.labels):
            row = {"layer": lab, "kl_steered_base": float(kl[li])}
            for run, lg in (("steered", self.steered_logits), ("base", self.base_logits)):
                v, i = lg[li, position].softmax(-1).topk(k)
                row[f"{run}_top"] = ", ".join(f"{self._str(j)!r}:{p:.2f}"
                                             for j, p in zip(i.tolist(), v.tolist(), strict=True))
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self):
        """Heatmaps over layer × position: top-1 token probability of each run (with the token as
        text) and KL(steered ‖ base)."""
        from steer_lens import plotting

        x = [repr(t) for t in self.str_tokens]
        panels = []
        for r, lg in enumerate((self.steered_logits, self.base_logits)):
            p, i = lg.softmax(-1).max(-1)
            text = [[repr(self._str(j)) for j in row] for row in i.tolist()]
            panels.append([plotting.heatmap(p, x_labels=x, y_labels=self.labels, text=text, colorscale="Blues",
                                            zmid=None, zmin=0.0, zmax=1.0)])
            panels[-1][0].data[0].showscale = r == 0
        panels.append([plotting.heatmap(self.kl.float(), x_labels=x, y_labels=self.labels, colorscale="Reds",
                                        zmid=None)])
        panels[-1][0].data[0].showscale = False
        return plotting.grid(panels, titles=["steered: top-1 lens token (prob)", "base: top-1 lens token (prob)",
                                             "KL(steered ‖ base), nats"],
                             title="Per-layer logit lens, steered vs base", height=900, shared_xaxes=True)

    def _summary(self) -> str:
        return f"<b>LayerLogitLens</b> of {len(self.str_tokens)} tokens, {len(self.labels)} layers (last position)"

    def __repr__(self) -> str:
        """Shapes, layer labels, the top-1 lens token per layer at the last position and the KL there."""
        kl = self.kl[:, -1]
        return (f"LayerLogitLens({len(self.str_tokens)} tokens, layers {self.labels[0]}..{self.labels[-1]} "
                f"({len(self.labels)}), logits {list(self.steered_logits.shape)}; last position "
                f"{self.str_tokens[-1]!r}: steered top-1 {self.top_tokens('steered')}, base top-1 "
                f"{self.top_tokens('base')}, KL(steered||base) max {float(kl.max()):.3g} nats at "
                f"{self.labels[int(kl.argmax())]})")

    _html_rows = 64


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
    mode: str = "raw",
    names: Sequence[str] | None = None,
) -> DirectionLogitLens:
    """Read residual-stream directions through the unembedding (logit lens, nostalgebraist 2020).

    ``mode="raw"``: ``W_U·d`` (logits per unit of the direction; no bias), the direction's direct
    logit attribution. ``mode="norm"``: ``W_U·ln_final(d)``, the direction treated as a residual on
    its own. ``mode="cosine"``: ``cos(W_U[:, t], d) = (W_U[:, t]·d) / (‖W_U[:, t]‖ ‖d‖)`` for every
    token ``t`` (unit ``"cosine"``, in [-1, 1]), with the dot product ``W_U[:, t]·d`` kept beside it
    (:attr:`TokenScores.dot`, a ``dot`` column in the table). The cosine ranking is the vector logit
    lens of Sinii et al. 2025 ("Small Vectors, Big Effects"), who list the top 50 tokens by cosine
    and report the dot product too: ``steering_reasoning/metrics/logit_lens.py`` lines 315 (dot
    products ``unembed_matrix @ v``), 328-331 (cosine of the normalised unembedding rows with the
    normalised vector, top 50) and 268 (the table of "Cos. Sim." and "Dot Prod."), read in
    robertnward/steering-reasoning @ caf560b, a fork of corl-team/steering-reasoning (the paper's
    repository, which could not be fetched here). Their ``unembed_matrix`` is the Hugging Face
    ``lm_head`` weight, which is this ``W_U`` transposed for a model loaded without weight
    processing (``load_model``'s default); with ``fold_ln=True`` ``W_U`` includes the final norm's
    weight and the cosines differ from theirs.

    Args:
        model: the model whose ``W_U`` (and ``ln_final``) is used (a wrapper: its base model).
        directions: ``[d_model]`` or ``[n, d_model]``.
        k: tokens to keep at each end.
        mode: ``"raw"``, ``"norm"`` or ``"cosine"``.
        names: a name per direction (default ``"0"``, ``"1"``, ...).

    Returns:
        A :class:`DirectionLogitLens`: ``lens[name]`` is one :class:`TokenScores` (unit ``"logits"``,
        or ``"cosine"`` with the dot products in ``.dot``); iterating yields them in order.

    Raises:
        ShapeMismatchError: the last dimension is not ``d_model``.
        ConfigError: bad ``mode`` or ``k``; ``mode="cosine"`` with a zero direction (no cosine).
    """
    model = unwrap(model)
    if mode not in ("raw", "norm", "cosine"):
        raise ConfigError(f"mode: expected 'raw', 'norm' or 'cosine', got {mode!r}.")
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
    if mode == "cosine":
        zero = [n for n, row in zip(names, d, strict=True) if not bool(row.float().norm() > 0)]
        if zero:
            raise ConfigError(
                f"directions: {zero} have zero norm, so their cosine with W_U is undefined. Fix: read a "
                "non-zero (e.g. trained) vector, or use mode='raw'."
            )
    W_U = model.W_U.detach()
    with torch.no_grad():
        d = d.to(W_U.device, W_U.dtype)
        if mode == "norm":
            d = _apply_final_norm(model, d)
        scores = d.float() @ W_U.float()
    if mode != "cosine":
        return DirectionLogitLens(mode, {n: _token_scores(model, n, s, k, "logits")
                                         for n, s in zip(names, scores, strict=True)})
    col_norm = W_U.float().norm(dim=0).clamp_min(_COSINE_EPS)
    cos = scores / (d.float().norm(dim=-1, keepdim=True) * col_norm)
    return DirectionLogitLens(mode, {n: _token_scores(model, n, c, k, "cosine", dot=s)
                                     for n, c, s in zip(names, cos, scores, strict=True)})


def vector_logit_lens(
    steered,
    *,
    k: int = 20,
    mode: str = "raw",
    texts: Sequence[str] | None = None,
) -> VectorLogitLens:
    """Top and bottom ``k`` tokens of each steering vector, read through the unembedding.

    Modes:
        ``"raw"``: ``W_U·v`` in logits, the vector's direct logit attribution (no final norm).
        ``"norm"``: ``W_U·ln_final(v)``, the vector alone treated as a final residual (logit lens,
            nostalgebraist 2020).
        ``"cosine"``: ``cos(W_U[:, t], v)`` per token (unit ``"cosine"``), the ranking of Sinii et
            al. 2025's vector logit lens, with the dot product ``W_U[:, t]·v`` (logits) in
            :attr:`TokenScores.dot` and the table's ``dot`` column (see :func:`direction_lens`; the
            paper lists ``k=50``).
        ``"effect"``: the mean change of next-token log-probs (nats) over every position of
            ``texts`` when the vectors are on (all vectors at once; the result has one entry, keyed
            ``"all"``), the end-to-end effect that includes every layer after the vector.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        k: tokens at each end.
        mode: ``"raw"``, ``"norm"``, ``"cosine"`` or ``"effect"`` (see above).
        texts: required for ``mode="effect"``.

    Returns:
        A :class:`VectorLogitLens` (``lens[hook]`` -> :class:`TokenScores`).

    Raises:
        ConfigError: bad mode, or ``"effect"`` without texts; ``"cosine"`` with a zero vector.
        EmptyInputError: ``texts`` empty.
        ShapeMismatchError: a vector is not ``[d_model]`` (e.g. a per-head vector at ``attn.hook_z``).
    """
    if mode not in ("raw", "norm", "cosine", "effect"):
        raise ConfigError(f"mode: expected 'raw', 'norm', 'cosine' or 'effect', got {mode!r}.")
    steered.vectors.require_residual_width("vector_logit_lens")
    if mode != "effect":
        hooks = list(steered.hook_names)
        vecs = torch.stack([steered.vectors.direction(h).detach() * steered.scale for h in hooks])
        return VectorLogitLens(mode, direction_lens(steered.model, vecs, k=k, mode=mode, names=hooks).per_name)
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
    return VectorLogitLens(mode, {"all": _token_scores(steered.model, "all", scores, k, "nats")})


def layer_logit_lens(steered, prompt: str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"]) -> LayerLogitLens:
    """The per-layer logit lens of one prompt for the steered and the base run (nostalgebraist 2020).

    At each layer ``l`` (the residual stream before block ``l``, and after the last block) the lens
    logits are ``ln_final(resid) @ W_U + b_U`` with the final norm recomputed on that residual:
    TransformerLens's ``cache.accumulated_resid(apply_ln=True)`` projected by ``W_U``. The steered
    run's residual at a steered hook includes the vector.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        prompt: text (BOS is prepended) or token ids ``[pos]`` / ``[1, pos]``.

    Returns:
        A :class:`LayerLogitLens` with logits ``[n_layers + 1, pos, d_vocab]`` for both runs.
    """
    model = steered.model
    toks = steered.to_tokens(prompt)[None] if isinstance(prompt, str) else prompt.reshape(1, -1)
    toks = toks.to(steered.device)
    check_token_ids(toks, model.cfg, "prompt")
    last_post = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def names(n: str) -> bool:
        return "resid_pre" in n or n == last_post or n.startswith("ln_final")

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
    k = min(_TABLE_K, steered_logits.shape[-1])
    shown = torch.unique(torch.cat([steered_logits.topk(k, -1).indices.reshape(-1),
                                    base_logits.topk(k, -1).indices.reshape(-1)])).tolist()
    decoded = dict(zip(shown, _labels(model, shown), strict=True))
    return LayerLogitLens(list(labels), _labels(model, toks[0].tolist()), steered_logits, base_logits, decoded)
