"""Is a vector a token-substitution bias on the first generated token? (Sinii et al. 2025)

"Small Vectors, Big Effects" (Sinii et al. 2025, Section 6) finds that an RL-trained last-layer
steering vector acts mostly on the *first* generated token, boosting tokens such as "To" and "Step".
Two measurements test that for any vector:

* :func:`first_token_concentration` - on the model's own steered samples (by default only those that
  end with EOS, as the paper keeps), at every generated position ``j`` both runs score the *same*
  steered prefix and we take the largest probability increase of any token,
  ``max_w [p_steered(w | x_<j) − p_base(w | x_<j)]``, the token that achieves it, and the probability
  change of named tokens; the summary sets the first position against the others.
* :func:`prefix_substitution` - the paper's substitution check: put the boosted token at the start
  of the answer (append it to the prompt) and measure the *base* model's accuracy, against the base
  and the steered accuracy without it. If the prefixed base recovers the steered accuracy, the
  vector's effect is the token.

Checked against the paper's code as read in ``robertnward/steering-reasoning`` @ ``caf560b``, a fork
of ``corl-team/steering-reasoning`` (the paper's repository, which could not be fetched here), file
``steering_reasoning/metrics/last_layer_steering.py``: probabilities ``softmax(logits / T)`` at the
sampling temperature (lines 80-81), ``prob_diffs = steered_probs - vanilla_probs`` on the same tokens
(line 118), the largest increase per position ``torch.max(prob_diffs, dim=-1)`` (lines 152-153);
in ``run()``: only EOS-terminated samples are scored (``if not is_eos: continue``), positions start
at ``generation_offset = len(prompt) - 1`` (the logits that predict the first generated token), the
named token's change is ``prob_diffs[:, token_to_idx]`` ("To" for Qwen, "Step" for Llama), and
``token_to_vis_position`` compares ``pos == 0`` with ``pos != 0`` pooled over samples. The prefix
check is the ``append_to`` option of ``steering_reasoning/train/rl/policy_model.py``
(``tokenize_example``: the id of "To" appended to the templated prompt's ids).

One difference: the paper also scores the position *after* EOS (its slice runs to the end of the
sequence); here position ``j`` predicts generated token ``j``, up to and including EOS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens._utils import is_conversation, token_strings
from steer_lens.analysis._common import number, single_token
from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.results import Result
from steer_lens.steering import SteeredTransformer

__all__ = ["FirstTokenConcentration", "PrefixSubstitution", "first_token_concentration", "prefix_substitution"]


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
def _first_rest(values: Tensor) -> tuple[float, float, int, int]:
    """Mean of position 0 and pooled mean of positions >= 1 over the finite entries of ``[samples, new]``."""
    first, rest = values[:, 0], values[:, 1:]
    first, rest = first[~first.isnan()], rest[~rest.isnan()]
    f = float(first.double().mean()) if first.numel() else float("nan")
    r = float(rest.double().mean()) if rest.numel() else float("nan")
    return f, r, int(first.numel()), int(rest.numel())


@dataclass(frozen=True, kw_only=True)
class FirstTokenConcentration(Result):
    """Result of :func:`first_token_concentration`: per steered sample and generated position, how much
    the vectors raise the probability of the token they raise most (and of named tokens).

    Attributes:
        max_delta_p: ``[samples, new]`` ``max_w (p_steered(w) − p_base(w))`` at each generated position
            (a probability change in [0, 1]; NaN after a sample's EOS).
        argmax_ids: ``[samples, new]`` the token ``w`` that achieves it (-1 after EOS).
        argmax_tokens: per sample, the strings of its ``argmax_ids`` up to EOS.
        named_tokens: the named tokens' strings; named_ids: their ids.
        named_delta_p: ``[named, samples, new]`` ``p_steered(w) − p_base(w)`` of each named token
            (NaN after EOS).
        completion_mask: ``[samples, new]`` True up to and including each sample's EOS.
        tokens: ``[samples, prompt_len + new]`` the scored samples (left-padded prompt, then the
            generated tokens; pad id after EOS). attention_mask: ``[samples, prompt_len + new]``
            1 for real tokens. prompt_len: the padded prompt length (generation starts there).
        n_sampled: samples drawn before keeping only EOS-terminated ones.
        temperature: the temperature of sampling and of the probabilities.
    """

    max_delta_p: Float[Tensor, "samples new"]
    argmax_ids: Int[Tensor, "samples new"]
    argmax_tokens: list[list[str]] = field(repr=False)
    named_tokens: list[str]
    named_ids: list[int]
    named_delta_p: Float[Tensor, "named samples new"]
    completion_mask: Bool[Tensor, "samples new"] = field(repr=False)
    tokens: Int[Tensor, "samples seq"] = field(repr=False)
    attention_mask: Int[Tensor, "samples seq"] = field(repr=False)
    prompt_len: int
    n_sampled: int
    temperature: float

    _rank_by = "mean_max_delta_p"

    @property
    def mean_max_delta_p(self) -> Float[Tensor, " new"]:
        """Mean of :attr:`max_delta_p` over the samples still running at each position (NaN: none)."""
        return self.max_delta_p.nanmean(0)

    @property
    def first_vs_rest(self):
        """The paper's summary: position 0 against the other positions (pooled over samples).

        One row per measure (``"max_delta_p"``, then ``"delta_p[<token>]"`` per named token):
        ``first`` (mean at position 0), ``rest`` (mean over every sample's positions ``>= 1`` up to
        EOS), ``ratio`` (``first / rest``), ``n_first``, ``n_rest`` (entries averaged).
        """
        import pandas as pd

        rows = []
        measures = [("max_delta_p", self.max_delta_p)]
        measures += [(f"delta_p[{t}]", self.named_delta_p[i]) for i, t in enumerate(self.named_tokens)]
        for name, values in measures:
            f, r, nf, nr = _first_rest(values)
            rows.append({"measure": name, "first": f, "rest": r,
                         "ratio": f / r if r == r and r != 0 else float("nan"), "n_first": nf, "n_rest": nr})
        return pd.DataFrame(rows)

    def to_pandas(self):
        """Per generated position: ``position, n_samples, mean_max_delta_p``, the most frequent arg-max
        token and its share, and ``delta_p[<token>]`` (mean) per named token."""
        import pandas as pd

        rows = []
        for j in range(self.max_delta_p.shape[1]):
            alive = self.completion_mask[:, j]
            ids = self.argmax_ids[alive, j]
            row: dict[str, Any] = {"position": j, "n_samples": int(alive.sum()),
                                   "mean_max_delta_p": float(self.mean_max_delta_p[j])}
            if ids.numel():
                vals, counts = ids.unique(return_counts=True)
                best = int(counts.argmax())
                row["top_token"] = self._token_str(int(vals[best]))
                row["top_token_share"] = float(counts[best]) / ids.numel()
            else:
                row["top_token"], row["top_token_share"] = None, float("nan")
            for i, t in enumerate(self.named_tokens):
                row[f"delta_p[{t}]"] = float(self.named_delta_p[i, :, j].nanmean())
            rows.append(row)
        return pd.DataFrame(rows)

    def _token_str(self, token_id: int) -> str:
        for s_ids, s_toks in zip(self.argmax_ids.tolist(), self.argmax_tokens, strict=True):
            if token_id in s_ids:
                return s_toks[s_ids.index(token_id)]
        return f"<{token_id}>"  # pragma: no cover - every shown id comes from argmax_ids

    def plot(self):
        """Lines over generated positions: mean max Δp and the mean Δp of each named token."""
        from steer_lens.plotting import lines

        x = list(range(self.max_delta_p.shape[1]))
        series = {"max Δp (any token)": (x, self.mean_max_delta_p)}
        for i, t in enumerate(self.named_tokens):
            series[f"Δp({t!r})"] = (x, self.named_delta_p[i].nanmean(0))
        f, r, _, _ = _first_rest(self.max_delta_p)
        return lines(series, title=f"Probability change per generated position (max Δp: first {f:.3f}, "
                                   f"rest {r:.3f})", x_title="generated position",
                     y_title="p_steered − p_base")

    def _summary(self) -> str:
        f, r, _, _ = _first_rest(self.max_delta_p)
        return (f"<b>FirstTokenConcentration</b> over {self.max_delta_p.shape[0]} of {self.n_sampled} samples: "
                f"max Δp {f:.3f} at the first position, {r:.3f} at the others")


@dataclass(frozen=True, kw_only=True)
class PrefixSubstitution(Result):
    """Result of :func:`prefix_substitution`: the metric (an accuracy) with and without the token.

    Attributes:
        token: the token's string; token_id: its id.
        base: the base model's metric on the prompts.
        prefixed: the base model's metric with the token appended to every prompt.
        steered: the steered model's metric on the prompts (NaN when a bare model was given).
    """

    token: str
    token_id: int
    base: float
    prefixed: float
    steered: float

    @property
    def recovered(self) -> float:
        """``(prefixed − base) / (steered − base)``: the share of the steering gain the token alone
        recovers (NaN without a steered value or when the gain is 0)."""
        gain = self.steered - self.base
        return (self.prefixed - self.base) / gain if gain == gain and gain != 0 else float("nan")

    def to_pandas(self):
        """Three rows: ``condition`` (base, base + token, steered) and ``value``."""
        import pandas as pd

        return pd.DataFrame({"condition": ["base", f"base + {self.token!r}", "steered"],
                             "value": [self.base, self.prefixed, self.steered]})

    def plot(self):
        """Bars of the three values."""
        from steer_lens.plotting import bar

        df = self.to_pandas()
        return bar(df.value, list(df.condition), y_title="metric",
                   title=f"Prefix substitution with {self.token!r} (recovers {self.recovered:.1%} of the gain)")

    def _summary(self) -> str:
        return (f"<b>PrefixSubstitution</b> {self.token!r}: base {self.base:.4g}, base + token "
                f"{self.prefixed:.4g}, steered {self.steered:.4g}")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def _score(steered: SteeredTransformer, gen, rows: Tensor, named: list[int], temperature: float,
           batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced Δp on the kept sample ``rows``: ``(max_delta_p, argmax_ids, named_delta_p)``."""
    P, new = gen.prompt_len, gen.completion_mask.shape[1]
    out_max, out_arg, out_named = [], [], []
    idx = torch.tensor(named, dtype=torch.long, device=gen.tokens.device)
    for start in range(0, rows.numel(), batch_size):
        r = rows[start : start + batch_size]
        toks, attn = gen.tokens[r], gen.attention_mask[r]
        plens = [P] * toks.shape[0]  # positions="prompt"/"generated" act as while sampling
        on = steered(toks, attention_mask=attn, prompt_lengths=plens)[:, P - 1 : P - 1 + new]
        with steered.disabled():
            off = steered(toks, attention_mask=attn)[:, P - 1 : P - 1 + new]
        delta = (on.float() / temperature).softmax(-1) - (off.float() / temperature).softmax(-1)
        m, a = delta.max(-1)
        out_max.append(m)
        out_arg.append(a)
        out_named.append(delta.index_select(-1, idx).permute(2, 0, 1))
    return torch.cat(out_max), torch.cat(out_arg), torch.cat(out_named, 1)


# ---------------------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------------------
def first_token_concentration(
    steered: SteeredTransformer,
    prompts: Any,
    *,
    named_tokens: Sequence[str | int] = (),
    max_new_tokens: int = 64,
    n_samples: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    eos_only: bool = True,
    batch_size: int = 8,
) -> FirstTokenConcentration:
    """Per generated position of steered samples, the largest probability increase the vectors cause.

    Samples ``n_samples`` continuations per prompt with the vectors on (keeping, when ``eos_only``,
    only those that end with EOS, as the paper does), runs each sample's tokens with and without the
    vectors, and at each generated position ``j`` (the distributions predicting generated token
    ``j``, both on the same steered prefix ``x_<j``) computes

    ``Δp_j(w) = softmax(logits_steered / T)(w) − softmax(logits_base / T)(w)``,
    ``max_delta_p[s, j] = max_w Δp_j(w)`` and its arg-max token, and ``Δp_j(w)`` of each named token
    (Sinii et al. 2025, Section 6; see the module docstring for the lines of their code).
    :attr:`FirstTokenConcentration.first_vs_rest` sets position 0 against the pooled others.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        prompts: one prompt, several (texts or conversations), or token ids ``[batch, pos]``.
        named_tokens: tokens whose Δp to report, as strings (one token each, e.g. ``" To"``) or ids.
        max_new_tokens: generated positions per sample.
        n_samples: samples per prompt.
        seed: sampling seed.
        temperature: sampling temperature, also used for the probabilities (as the paper does).
        eos_only: keep only samples that reached EOS within ``max_new_tokens``; ``False`` keeps all
            (needed for a model without a tokenizer, which has no EOS).
        batch_size: samples per teacher-forced pass.

    Returns:
        A :class:`FirstTokenConcentration` (probability changes; CPU tensors).

    Raises:
        ConfigError: bad ``n_samples``, ``batch_size`` or ``temperature``; a named token that is not
            one token; ``eos_only`` for a model without an EOS token.
        EmptyInputError: no prompts, or no sample reached EOS (the message gives the fix).
        SequenceTooLongError: prompt plus ``max_new_tokens`` exceeds ``n_ctx``.
    """
    from steer_lens.generation import repeat_prompts

    for name, v in (("n_samples", n_samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {v!r}.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature: expected a positive finite number, got {temperature}.")
    named = [single_token(steered, t, "named_tokens") for t in named_tokens]
    eos = steered.eos_token_id
    if eos_only and eos is None:
        raise ConfigError("eos_only=True but the model has no EOS token (no tokenizer). Fix: pass eos_only=False "
                          "to score every sample.")
    gen = steered.sample(repeat_prompts(prompts, n_samples), max_new_tokens, seed=seed, temperature=temperature)
    n_sampled = int(gen.tokens.shape[0])
    if eos_only:
        keep = ((gen.completion_tokens == eos) & gen.completion_mask).any(1)
        if not bool(keep.any()):
            raise EmptyInputError(f"none of the {n_sampled} samples reached EOS within max_new_tokens="
                                  f"{max_new_tokens}. Fix: raise max_new_tokens, or pass eos_only=False.")
        rows = keep.nonzero()[:, 0]
    else:
        rows = torch.arange(n_sampled, device=gen.tokens.device)
    mx, arg, nd = _score(steered, gen, rows, [i for _, i in named], float(temperature), batch_size)
    mask = gen.completion_mask[rows]
    nan = torch.tensor(float("nan"), device=mx.device)
    mx = torch.where(mask, mx, nan).cpu()
    nd = torch.where(mask[None], nd, nan).cpu()
    arg = torch.where(mask, arg, torch.full_like(arg, -1)).cpu()
    mask = mask.cpu()
    strs = [token_strings(steered, a[m]) for a, m in zip(arg, mask, strict=True)]
    return FirstTokenConcentration(
        max_delta_p=mx, argmax_ids=arg, argmax_tokens=strs,  # type: ignore[arg-type]
        named_tokens=[s for s, _ in named], named_ids=[i for _, i in named], named_delta_p=nd,
        completion_mask=mask, tokens=gen.tokens[rows].cpu(), attention_mask=gen.attention_mask[rows].cpu(),
        prompt_len=int(gen.prompt_len), n_sampled=n_sampled, temperature=float(temperature),
    )


def prefix_substitution(
    model_or_steered: Any,
    prompts: str | Sequence[Any] | Int[Tensor, "batch pos"],
    token: str | int,
    evaluate: Callable[..., object],
) -> PrefixSubstitution:
    """The base model's metric with the boosted token put at the start of the answer.

    Sinii et al. 2025's substitution check (the ``append_to`` option of their
    ``policy_model.py::tokenize_example``): append the token the vector boosts (e.g. "To") to every
    prompt and evaluate the *base* model; compare with the base and the steered model on the plain
    prompts. ``evaluate(model, prompts) -> float`` (an accuracy, a rate ...) is called three times:
    base, base with the token, steered (inside :meth:`~steer_lens.SteeredTransformer.disabled` for the
    base runs; given a bare model, ``evaluate`` receives it and the steered value is NaN).

    Text prompts get the token's *string* appended (``prompt + token``), so a tokenizer may merge it
    with the prompt's last characters; token-id prompts ``[batch, pos]`` get the *id* appended as a
    new last column, exactly as the paper does.

    Args:
        model_or_steered: a :class:`~steer_lens.SteeredTransformer`, or a bare model.
        prompts: one text, several, or token ids ``[batch, pos]``.
        token: the token, as a string (exactly one token) or an id.
        evaluate: ``evaluate(model, prompts) -> float``, e.g.
            ``lambda m, p: sampled_rate(m, p, reward, n_samples=64)``.

    Returns:
        A :class:`PrefixSubstitution` (``base``, ``prefixed``, ``steered``, ``recovered``).

    Raises:
        ConfigError: ``evaluate`` is not callable; the token is not one token (or a string for a model
            without a tokenizer); conversations as prompts.
        EmptyInputError: no prompts.
        MetricError: ``evaluate`` returned a non-number or a non-finite value.
    """
    if not callable(evaluate):
        raise ConfigError(f"evaluate: expected a callable evaluate(model, prompts) -> float, got "
                          f"{type(evaluate).__name__}.")
    tok_str, tok_id = single_token(model_or_steered, token, "token")
    if isinstance(prompts, Tensor):
        rows = prompts if prompts.ndim == 2 else prompts[None]
        if rows.numel() == 0:
            raise EmptyInputError("prompts: got an empty token tensor; give at least one token.")
        prefixed: Any = torch.cat([rows, torch.full_like(rows[:, :1], tok_id)], 1)
        prompts = rows
    else:
        if is_conversation(prompts) or any(is_conversation(p) for p in prompts):
            raise ConfigError("prompts: conversations are not supported. Fix: pass the rendered prompts as token "
                              "ids [batch, pos] (steered.chat_tokens(...), stacked) so the token id is appended.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise EmptyInputError("prompts: got none; give at least one prompt.")
        prefixed = [p + tok_str for p in prompts]
    if isinstance(model_or_steered, SteeredTransformer):
        with model_or_steered.disabled():
            base = number(lambda m: evaluate(m, prompts), model_or_steered)
            pre = number(lambda m: evaluate(m, prefixed), model_or_steered)
        steered = number(lambda m: evaluate(m, prompts), model_or_steered)
    else:
        base = number(lambda m: evaluate(m, prompts), model_or_steered)
        pre = number(lambda m: evaluate(m, prefixed), model_or_steered)
        steered = float("nan")
    return PrefixSubstitution(token=tok_str, token_id=tok_id, base=base, prefixed=pre, steered=steered)
