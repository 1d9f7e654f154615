"""What a vector does to text the model writes itself: KL to the base model and degeneration.

Held-out loss teacher-forces *human* text, so it can reward a broken vector: a concept vector trained
on 20 short sentences lowered the loss on held-out short sentences (5.62 -> 5.57 nats/token) while
every sample it wrote was garbage (``'.<|.<|end..<|And .<|...'``; issue 16 item 1). The measures
here look at the model's **own samples** instead:

* :func:`next_token_kl` - the exact ``KL(p_steered || p_base)`` of the next-token distributions,
  summed over the whole vocabulary at each position and averaged over the positions that predict
  a sampled token (nats/token). RL penalises the same divergence through the k3 estimate of the
  sampled token only (:func:`steer_lens.train.rl.k3_kl`, Schulman 2020); with both distributions at
  hand the exact sum costs nothing more and has no per-position sampling noise.
* :func:`distinct_n` - per sample, distinct n-grams over n-grams, averaged over samples: Li et al.
  2016's distinct-n ("A Diversity-Promoting Objective Function for Neural Conversation Models") taken
  within each sample, i.e. ``1 - seq-rep-n`` of Welleck et al. 2019 ("Neural Text Generation with
  Unlikelihood Training", sec. 6). 1 means no n-gram repeats.
* :func:`repeat_rate` - the fraction of generated tokens equal to one of the ``window`` tokens
  before them in the same sample: Welleck et al. 2019's ``rep/l`` with ``l = window`` (4 here).
* :func:`side_effects` - samples continuations of prompts with the vectors on and off (same seeds)
  and returns all three as a :class:`SideEffects`; :func:`check_side_effects` compares them with
  the thresholds below and returns the reasons for a :class:`SideEffectWarning`.

Thresholds (measured on TinyStories-656K, 32 samples of 32 tokens, temperature 1): the base model
writes with distinct-2 ≈ 0.99 and a repeat rate ≈ 0.01; the demo's "dog" vector trained without a
KL term wrote with KL 3.2 nats/token, distinct-2 0.82 and repeat rate 0.09, visibly degenerate.
A warning is raised when the KL exceeds :data:`KL_WARN` = 1 nat/token, or when distinct-2 falls, or
the repeat rate rises, by more than :data:`DEGENERATION_WARN` = 0.1 against the base model's own
samples from the same prompts and seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.generation import Generation, sample_tokens
from steer_lens.results import Result
from steer_lens.train.data import TokenIds, token_ids

__all__ = [
    "DEGENERATION_WARN",
    "KL_WARN",
    "SideEffectWarning",
    "SideEffects",
    "check_side_effects",
    "distinct_n",
    "generated_ids",
    "next_token_kl",
    "prompt_rows",
    "repeat_rate",
    "sample_kl",
    "sample_measures",
    "sample_rows",
    "side_effects",
]

KL_WARN = 1.0
"""Warn above this ``KL(p_steered || p_base)`` on the model's own samples (nats/token)."""

DEGENERATION_WARN = 0.1
"""Warn when distinct-2 falls, or the repeat rate rises, by more than this against the base model."""

REPEAT_WINDOW = 4
"""Tokens looked back by :func:`repeat_rate` (Welleck et al. 2019's ``l``)."""


class SideEffectWarning(UserWarning):
    """A trained vector drifts far from the base model or makes it write degenerate text.

    Raised (as a warning) by :func:`steer_lens.train.sft` after training when the checks of
    :func:`check_side_effects` fail; the message says which measure crossed which threshold.
    """


def next_token_kl(
    steered_logits: Float[Tensor, "batch pos d_vocab"],
    base_logits: Float[Tensor, "batch pos d_vocab"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Exact ``KL(p_steered || p_base)`` per position, averaged over the positions where ``mask`` is True.

    ``sum_v p_s(v) (log p_s(v) - log p_b(v))`` over the vocabulary, in fp32 or wider (fp64 logits
    stay fp64), in nats/token. Gradients flow through ``steered_logits`` (detach the base).
    """
    dtype = torch.promote_types(torch.promote_types(steered_logits.dtype, base_logits.dtype), torch.float32)
    ls = steered_logits.to(dtype).log_softmax(-1)
    lb = base_logits.to(dtype).log_softmax(-1)
    kl = (ls.exp() * (ls - lb)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def sample_kl(steered, gen: Generation) -> Float[Tensor, ""]:
    """:func:`next_token_kl` at the positions that predict the sampled tokens of ``gen`` (nats/token).

    The base logits come from a no-gradient forward with the vectors off; the steered forward records
    the vectors' graph only inside ``steered.gradients()`` (as the training loop's step does), so the
    same call is the KL penalty of :func:`~steer_lens.train.sft` and its held-out measurement.
    """
    lengths = torch.full((gen.tokens.shape[0],), gen.prompt_len, device=gen.tokens.device)
    with torch.no_grad(), steered.disabled():
        base = steered(gen.tokens, attention_mask=gen.attention_mask, prompt_lengths=lengths)
    logits = steered(gen.tokens, attention_mask=gen.attention_mask, prompt_lengths=lengths)
    window = slice(gen.prompt_len - 1, -1)
    return next_token_kl(logits[:, window], base[:, window], gen.completion_mask)


def generated_ids(gen: Generation, eos: int | None) -> list[list[int]]:
    """The generated tokens of each sample (up to, not including, EOS)."""
    out = []
    for row, keep in zip(gen.completion_tokens.tolist(), gen.completion_mask.tolist(), strict=True):
        out.append([t for t, k in zip(row, keep, strict=True) if k and t != eos])
    return out


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Mean over sequences of ``|distinct n-grams| / |n-grams|`` within each (NaN when none has ``n`` tokens).

    ``[1, 2, 1, 2, 1, 2]`` has the 2-grams ``12 21 12 21 12``: 2 distinct of 5, distinct-2 = 0.4.

    Raises:
        ConfigError: ``n < 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n: expected an int >= 1, got {n!r}.")
    scores = []
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if grams:
            scores.append(len(set(grams)) / len(grams))
    return sum(scores) / len(scores) if scores else math.nan


def repeat_rate(sequences: Sequence[Sequence[int]], window: int = REPEAT_WINDOW) -> float:
    """Fraction of tokens (all sequences together, each from its second token on) equal to one of the
    ``window`` tokens before them in their sequence (NaN when no sequence has two tokens).

    ``[1, 2, 1, 2, 1, 2]`` with ``window=4``: every token from the third on repeats, 4 of 5 = 0.8.

    Raises:
        ConfigError: ``window < 1``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window: expected an int >= 1, got {window!r}.")
    hits = total = 0
    for seq in sequences:
        for t in range(1, len(seq)):
            hits += seq[t] in seq[max(0, t - window) : t]
            total += 1
    return hits / total if total else math.nan


def prompt_rows(steered, prompts: Sequence[str | TokenIds] | Tensor, what: str = "prompts") -> list[list[int]]:
    """Prompts as token-id rows: a text is tokenized with BOS first; token ids are used as given.

    Raises:
        EmptyInputError: no prompts, or a prompt with no tokens.
        ConfigError: a text for a model without a tokenizer, or something that is neither.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for i, p in enumerate(prompts):
        ids = token_ids(p, f"{what}[{i}]")
        ids = steered.to_tokens(p).tolist() if ids is None else ids
        if not ids:
            raise EmptyInputError(f"{what}[{i}] has no tokens; give at least one (the BOS id).")
        rows.append(ids)
    if not rows:
        raise EmptyInputError(f"{what}: got none; give at least one prompt.")
    return rows


def sample_rows(steered, rows: Sequence[Sequence[int]], max_new_tokens: int, seed: int) -> Generation:
    """Sample one continuation per prompt row (left-padded, temperature 1, stops at EOS), vectors as they are.

    ``max_new_tokens`` is cut to what the model's context leaves after the longest prompt.
    """
    toks, mask = steered.left_pad([torch.tensor(list(r), dtype=torch.long) for r in rows])
    room = int(steered.cfg.n_ctx) - toks.shape[1]
    return sample_tokens(steered, toks, mask, None, max(1, min(max_new_tokens, room)), temperature=1.0,
                         top_p=1.0, top_k=None, do_sample=True, seed=seed, stop_at_eos=True, use_kv_cache=True)


@torch.no_grad()
def sample_measures(steered, rows: Sequence[Sequence[int]], max_new_tokens: int,
                    seed: int) -> tuple[Generation, tuple[float, float, float]]:
    """Sample from prompt ``rows`` with the vectors as they are; ``(gen, (kl, distinct_2, repeat_rate))``.

    The steered-side measures of :func:`side_effects` without the base samples (which do not change
    while the vectors train): what :func:`~steer_lens.train.sft` logs every ``eval_every`` steps.
    KL in nats/token (:func:`sample_kl`), distinct-2 and repeat rate as fractions; no gradient.
    """
    gen = sample_rows(steered, rows, max_new_tokens, seed)
    kl = float(sample_kl(steered, gen))
    ids = generated_ids(gen, steered.eos_token_id)
    return gen, (kl, distinct_n(ids, 2), repeat_rate(ids))


@dataclass(frozen=True, kw_only=True)
class SideEffects(Result):
    """KL to the base model and degeneration of the steered model's own samples, with the base's.

    Attributes:
        kl: exact ``KL(p_steered || p_base)`` at the positions predicting the steered samples'
            tokens (nats/token; the base's is 0).
        distinct_2, base_distinct_2: within-sample distinct-2 of the steered / base samples (1: no
            repeated 2-gram).
        repeat_rate, base_repeat_rate: fraction of generated tokens repeating one of the 4 before them.
        heldout_loss, base_heldout_loss: cross-entropy on held-out texts (nats/token; NaN when none
            were given).
        tokens: ``[n_samples, prompt_len + new]`` the steered samples (left-padded prompts first).
        attention_mask: ``[n_samples, prompt_len + new]`` 1 for real tokens.
        completion_mask: ``[n_samples, new]`` True for generated tokens up to and including EOS.
        prompt_len: padded prompt length (generated tokens start there).
        completions, base_completions: decoded samples (``None`` without a tokenizer).
        reasons: why the checks failed (empty: no warning), from :func:`check_side_effects`.
    """

    kl: float
    distinct_2: float
    base_distinct_2: float
    repeat_rate: float
    base_repeat_rate: float
    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    completion_mask: Bool[Tensor, "batch new"]
    prompt_len: int
    completions: tuple[str, ...] | None = None
    base_completions: tuple[str, ...] | None = None
    heldout_loss: float = math.nan
    base_heldout_loss: float = math.nan
    reasons: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """Whether no check failed (no :class:`SideEffectWarning`)."""
        return not self.reasons

    def to_pandas(self):
        """One row per measure: ``measure, base, steered``."""
        import pandas as pd

        return pd.DataFrame({
            "measure": ["kl", "distinct_2", "repeat_rate", "heldout_loss"],
            "base": [0.0, self.base_distinct_2, self.base_repeat_rate, self.base_heldout_loss],
            "steered": [self.kl, self.distinct_2, self.repeat_rate, self.heldout_loss],
        })

    def plot(self):
        """Grouped bars, base vs steered, for each measure."""
        from steer_lens import plotting

        df = self.to_pandas()
        names = df["measure"].tolist()
        return plotting.bars({"base": (names, df["base"].tolist()), "steered": (names, df["steered"].tolist())},
                             title="Side effects on the model's own samples")

    def _summary(self) -> str:
        state = "healthy" if self.healthy else "WARNING: " + "; ".join(self.reasons)
        return f"<b>SideEffects</b> of {self.tokens.shape[0]} samples: {state}"


def check_side_effects(kl: float, distinct_2: float, base_distinct_2: float, repeat_rate: float,
                       base_repeat_rate: float, *, kl_warn: float = KL_WARN,
                       degeneration_warn: float = DEGENERATION_WARN) -> tuple[str, ...]:
    """The reasons to warn: KL above ``kl_warn``, distinct-2 down or repeat rate up by more than
    ``degeneration_warn`` against the base (each measure as in :class:`SideEffects`). Empty when healthy."""
    out = []
    if kl > kl_warn:
        out.append(f"KL to the base model {kl:.3g} nats/token > {kl_warn:g}")
    if base_distinct_2 - distinct_2 > degeneration_warn:
        out.append(f"distinct-2 {base_distinct_2:.3f} -> {distinct_2:.3f} (fell by more than {degeneration_warn:g})")
    if repeat_rate - base_repeat_rate > degeneration_warn:
        out.append(f"repeat rate {base_repeat_rate:.3f} -> {repeat_rate:.3f} (rose by more than {degeneration_warn:g})")
    return tuple(out)


@torch.no_grad()
def side_effects(
    steered,
    prompts: Sequence[str | TokenIds] | Tensor | str,
    *,
    max_new_tokens: int = 32,
    seed: int = 0,
    kl_warn: float = KL_WARN,
    degeneration_warn: float = DEGENERATION_WARN,
) -> SideEffects:
    """Sample one continuation per prompt with the vectors on and off (same seeds) and measure them.

    Measures the steered samples' exact KL to the base model (:func:`sample_kl`), and distinct-2 and
    the repeat rate of both sets of samples (:func:`distinct_n`, :func:`repeat_rate`); the checks of
    :func:`check_side_effects` are in ``reasons`` (nothing is warned here).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        prompts: texts (BOS prepended) or token ids (a ``[n, pos]`` tensor, 1-D tensors or lists of
            ints, used as given: put the BOS id first), one sample each; repeat a prompt for more.
        max_new_tokens: tokens per sample (temperature 1, stopping at EOS).
        seed: sampling seed (the same for the steered and the base samples).
        kl_warn, degeneration_warn: the thresholds (see the module docstring).

    Returns:
        A :class:`SideEffects`.

    Raises:
        EmptyInputError: no prompts, or a prompt with no tokens.
        ConfigError: a text prompt for a model without a tokenizer.
        SequenceTooLongError: a prompt that fills the model's context.
    """
    rows = prompt_rows(steered, prompts)
    gen, (kl, d2, rr) = sample_measures(steered, rows, max_new_tokens, seed)
    with steered.disabled():
        base = sample_rows(steered, rows, max_new_tokens, seed)
    base_ids = generated_ids(base, steered.eos_token_id)
    bd2, brr = distinct_n(base_ids, 2), repeat_rate(base_ids)
    return SideEffects(
        kl=kl, distinct_2=d2, base_distinct_2=bd2, repeat_rate=rr, base_repeat_rate=brr,
        tokens=gen.tokens.cpu(), attention_mask=gen.attention_mask.cpu(), completion_mask=gen.completion_mask.cpu(),
        prompt_len=gen.prompt_len,
        completions=None if gen.completions is None else tuple(gen.completions),
        base_completions=None if base.completions is None else tuple(base.completions),
        reasons=check_side_effects(kl, d2, bd2, rr, brr, kl_warn=kl_warn, degeneration_warn=degeneration_warn),
    )
