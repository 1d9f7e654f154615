"""Supervised training of steering vectors: cross-entropy on completion tokens.

Examples are plain texts (every token after BOS is a target), ``(prompt, completion)`` pairs, or
dicts ``{"prompt", "completion", "suppress"}``. Prompt tokens are never targets. Objectives:

* ``"promotion"`` (default): mean cross-entropy ``-log p(y_t | y_<t)`` over completion tokens (nats).
* ``"suppression"``: mean ``-log(1 - p(y_t | y_<t))`` over the tokens of ``suppress`` (or of the
  completion when there is no ``suppress``): pushes the probability of that text down.
* ``"mixed"``: promotion of ``completion`` plus suppression of ``suppress``.

The one-shot objectives follow Dunefsky & Cohan 2025, "One-shot optimized steering vectors mediate
safety-relevant behaviors in LLMs" (promotion, suppression and mixed steering on a single example).
Learned steering vectors by SFT go back to Subramani et al. 2022, "Extracting Latent Steering
Vectors from Pretrained Language Models".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens._utils import batched, device_of
from steer_lens.errors import ConfigError, EmptyInputError, SequenceTooLongError
from steer_lens.train.data import (
    Batch,
    Example,
    collate_rows,
    epoch_order,
    masked_nll,
    next_token_logprobs,
    normalise_example,
)
from steer_lens.train.loop import (
    OptimConfig,
    TrainResult,
    accumulate_gradients,
    check_micro_batch_size,
    is_int,
    micro_batches,
    require,
    run_loop,
    typical_resid_rms,
)

__all__ = ["SFTConfig", "collate", "heldout_loss", "sft", "tokenize_examples"]

@dataclass(frozen=True, kw_only=True)
class SFTConfig(OptimConfig):
    """Settings of :func:`sft` (all of :class:`~steer_lens.train.loop.OptimConfig` plus these).

    Attributes:
        batch_size: examples per step.
        objective: ``"promotion"``, ``"suppression"`` or ``"mixed"`` (see the module docstring).
        eval_texts: held-out texts; their loss (nats/token, vectors on) is logged as
            ``"heldout_loss"`` every ``eval_every`` steps and at the last step, measured with the
            vectors as they are at the start of that step (before its update).
        eval_every: steps between held-out evaluations.
        micro_batch_size: at most this many examples per forward/backward (``None``: the whole
            batch at once). Each micro-batch is padded on its own and its summed token loss is
            divided by the target-token count of the *whole* batch, so the accumulated gradient is
            the full-batch gradient; the optimiser steps once per batch, as without. Peak memory
            scales with ``micro_batch_size``.

    Defaults: AdamW with ``lr=1e-2`` in *relative* units (1% of the hook's typical per-coordinate
    residual RMS per step; see :mod:`steer_lens.train.loop`), 200 steps, batch 16, gradient clipping at 1.

    Raises:
        ConfigError: a field outside its range (the message names it).
    """

    batch_size: int = 16
    objective: Literal["promotion", "suppression", "mixed"] = "promotion"
    eval_texts: Sequence[str] | None = None
    eval_every: int = 50
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        require(self.objective in ("promotion", "suppression", "mixed"), "objective", self.objective,
                "'promotion', 'suppression' or 'mixed'")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "an int >= 1")
        check_micro_batch_size(self.micro_batch_size)
        if isinstance(self.eval_texts, str):
            raise ConfigError(
                "eval_texts: got one string, which would be split into characters. Fix: pass a list of "
                "texts, e.g. eval_texts=[text]."
            )
        if self.eval_texts is not None and not isinstance(self.eval_texts, tuple):
            object.__setattr__(self, "eval_texts", tuple(self.eval_texts))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (held-out texts counted, not copied)."""
        d = super().to_dict()
        d["eval_texts"] = None if self.eval_texts is None else len(self.eval_texts)
        return d


@dataclass(frozen=True)
class _Tokenized:
    prompt: list[int]
    completion: list[int]
    suppress_prompt: list[int]
    suppress: list[int] | None


def tokenize_examples(steered, examples: Iterable[Example], objective: str = "promotion") -> list[_Tokenized]:
    """Tokenize examples (prompt with BOS; completion and suppress text without), checking them.

    Raises:
        EmptyInputError: no examples, or an example with no target tokens.
        SequenceTooLongError: an example longer than the model's ``n_ctx``.
        ConfigError: a malformed example.
    """
    examples = list(examples)
    if not examples:
        raise EmptyInputError("examples: got none. Fix: pass a non-empty list of texts or (prompt, completion) pairs.")
    n_ctx = int(steered.cfg.n_ctx)
    out = []
    for i, ex in enumerate(examples):
        prompt, completion, suppress = normalise_example(ex, i)
        prompt, completion = str(prompt), str(completion)
        p, c = _split(steered, prompt, completion)
        sp, s = _split(steered, prompt, suppress) if suppress else (p, None)
        needs_c = objective in ("promotion", "mixed") or (objective == "suppression" and s is None)
        if needs_c and not c:
            raise EmptyInputError(f"example {i}: the completion {completion!r} has no tokens; give a non-empty completion.")
        if objective == "mixed" and not s:
            raise EmptyInputError(f"example {i}: objective 'mixed' needs a non-empty 'suppress' text.")
        longest = max(len(p) + len(c), len(sp) + len(s or []))
        if longest > n_ctx:
            raise SequenceTooLongError(
                f"example {i} is {longest} tokens long; the model's context is n_ctx={n_ctx}. "
                "Fix: shorten or split it."
            )
        out.append(_Tokenized(p, c, sp, s))
    return out


def _split(steered, prompt: str, text: str | None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)`` of ``prompt + text`` as the model tokenizes the joint string.

    Tokenizing the text on its own can differ from how it is tokenized after the prompt: a
    SentencePiece-style tokenizer adds a prefix token to every separate call, and a tokenizer that
    attaches spaces to the preceding token re-tokenizes the prompt's last word ("a" + " little" ->
    "a " + "little"). So the joint string is tokenized and split after the longest common prefix
    with the prompt's tokens; a re-tokenized boundary token becomes the first target.
    """
    prompt_ids = steered.to_tokens(prompt, prepend_bos=True).tolist()
    if not text:
        return prompt_ids, []
    full = steered.to_tokens(prompt + text, prepend_bos=True).tolist()
    n = 0
    while n < min(len(full), len(prompt_ids)) and full[n] == prompt_ids[n]:
        n += 1
    n = max(n, 1)  # BOS always stays in the prompt
    return full[:n], full[n:]


def collate(steered, rows: Sequence[tuple[list[int], list[int]]]) -> Batch:
    """Right-pad ``(prompt_ids, target_ids)`` rows into a :class:`~steer_lens.train.data.Batch` on the model's device."""
    return collate_rows(rows, steered.pad_token_id, steered.device)


def _token_logprobs(steered, batch: Batch) -> Float[Tensor, "batch pos_minus_1"]:
    logits = steered(batch.tokens, attention_mask=batch.attention_mask, prompt_lengths=batch.prompt_lengths)
    return next_token_logprobs(logits, batch.tokens)


def _promotion_loss(steered, batch: Batch) -> Tensor:
    return masked_nll(_token_logprobs(steered, batch), batch.target_mask)


def _suppression_loss(steered, batch: Batch) -> Tensor:
    lp = _token_logprobs(steered, batch)
    # -log(1 - p) computed stably from log p
    nll = -torch.log1p(-lp.exp().clamp(max=1 - 1e-6))
    return (nll * batch.target_mask).sum() / batch.target_mask.sum().clamp(min=1)


_Rows = list[tuple[list[int], list[int]]]


def _objective_terms(items: Sequence[_Tokenized], objective: str) -> list[tuple[str, _Rows]]:
    """``[(term, rows)]`` of one batch: ``"promotion"`` and/or ``"suppression"`` with their (prompt, target) rows."""
    promo = [(d.prompt, d.completion) for d in items]
    if objective == "promotion":
        return [("promotion", promo)]
    if objective == "suppression":
        return [("suppression", [(d.suppress_prompt, d.suppress) if d.suppress else (d.prompt, d.completion)
                                 for d in items])]
    return [("promotion", promo), ("suppression", [(d.suppress_prompt, d.suppress or []) for d in items])]


def _batch_loss(steered, items: Sequence[_Tokenized], objective: str,
                micro_batch_size: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective of one batch, in micro-batches whose gradients accumulate to the full batch's.

    Every term is a mean over the target tokens of the *whole* batch: a micro-batch's mean is
    weighted by its share of those tokens, ``mean_chunk * n_chunk / n_batch = sum_chunk / n_batch``
    (see :func:`~steer_lens.train.loop.accumulate_gradients`); with one micro-batch the weight is 1.
    """
    terms = _objective_terms(items, objective)
    counts = {name: sum(len(t) for _, t in rows) for name, rows in terms}
    losses = {"promotion": _promotion_loss, "suppression": _suppression_loss}

    def term(name: str, batch: Batch) -> Tensor:
        share = batch.target_mask.sum() / max(counts[name], 1)
        return losses[name](steered, batch) * share

    def chunk_loss(sl: slice) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: term(name, collate(steered, rows[sl])) for name, rows in terms}
        metrics = {f"{k}_loss": v.detach() for k, v in parts.items()} if objective == "mixed" else {}
        return sum(parts.values()), metrics

    return accumulate_gradients(micro_batches(len(items), micro_batch_size), chunk_loss)


def sft(
    steered,
    examples: Iterable[Example],
    config: SFTConfig | None = None,
) -> TrainResult:
    """Train the steering vectors of ``steered`` on examples by supervised fine-tuning.

    Only the vectors learn (the model is frozen). Each step draws ``batch_size`` examples (epochs
    of a seeded permutation), right-pads them, and minimises the objective on the target tokens
    (in micro-batches of ``config.micro_batch_size`` examples with accumulated gradients, if set).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        examples: texts, ``(prompt, completion)`` pairs, or dicts with ``prompt`` / ``completion`` /
            ``suppress``.
        config: :class:`SFTConfig` (default: ``SFTConfig()``).

    Returns:
        A :class:`~steer_lens.train.loop.TrainResult` with per-step ``loss`` (nats/token),
        ``grad_norm``, vector norms and, with ``eval_texts``, ``heldout_loss``; ``.plot()`` draws it.

    Raises:
        EmptyInputError: no examples or an empty completion.
        SequenceTooLongError: an example longer than ``n_ctx``.
        ConfigError: a malformed example or config, or one string where a list of examples is expected.
        TrainingDivergedError: non-finite loss or gradient (vectors restored to the last good state).
    """
    config = config or SFTConfig()
    if isinstance(examples, (str, bytes)):
        raise ConfigError(
            "examples: got one string, which would be split into characters (one example each). Fix: pass "
            "a list of examples, e.g. [text] or [(prompt, completion)]."
        )
    data = tokenize_examples(steered, examples, config.objective)
    n = len(data)
    order = epoch_order(n, config.steps * config.batch_size, config.seed)

    sample_rows = [(d.prompt, d.completion) if d.completion else (d.suppress_prompt, d.suppress or [])
                   for d in data[: min(n, 64)]]
    probe = collate(steered, sample_rows)
    resid_rms = typical_resid_rms(steered, probe.tokens, probe.attention_mask)

    eval_batch = None
    if config.eval_texts:
        eval_batch = _text_batch(steered, config.eval_texts)

    def step_fn(step: int):
        idx = order[step * config.batch_size : (step + 1) * config.batch_size]
        items = [data[i] for i in idx]
        loss, metrics = _batch_loss(steered, items, config.objective, config.micro_batch_size)
        if eval_batch is not None and (step % config.eval_every == 0 or step == config.steps - 1):
            with torch.no_grad():
                metrics["heldout_loss"] = _promotion_loss(steered, eval_batch)
        return loss, metrics

    return run_loop(
        steered, step_fn, config, resid_rms=resid_rms, objective="sft",
        extra_config={"sft": {k: v for k, v in asdict(config).items() if k in ("batch_size", "objective")},
                      "n_examples": n},
    )


def _text_batch(steered, texts: Sequence[str]) -> Batch:
    rows = []
    n_ctx = int(steered.cfg.n_ctx)
    for t in texts:
        ids = steered.to_tokens(t, prepend_bos=True).tolist()[:n_ctx]
        if len(ids) > 1:
            rows.append((ids[:1], ids[1:]))
    if not rows:
        raise EmptyInputError("texts: none has a token after BOS; give non-empty texts.")
    return collate(steered, rows)


@torch.no_grad()
def heldout_loss(steered_or_model, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over ``texts``, BOS excluded as a target.

    With a :class:`~steer_lens.SteeredTransformer` the vectors are on (use ``disabled()`` for the
    base); with a plain model it is the model's loss. Texts longer than ``n_ctx`` are truncated.

    Raises:
        EmptyInputError: no texts, or none with a token after BOS.
    """
    from steer_lens.steering import SteeredTransformer

    texts = list(texts)
    if not texts:
        raise EmptyInputError("texts: got none; give at least one text.")
    steered = steered_or_model
    if not isinstance(steered, SteeredTransformer):
        steered = _Unsteered(steered_or_model)
    total = torch.zeros((), dtype=torch.float64, device=steered.device)
    count = torch.zeros((), dtype=torch.float64, device=steered.device)
    for chunk in batched(texts, batch_size):
        b = _text_batch(steered, chunk)
        lp = _token_logprobs(steered, b)
        total += -(lp * b.target_mask).sum().double()
        count += b.target_mask.sum().double()
    return float(total / count)


class _Unsteered:
    """Adapter giving a plain model the few wrapper methods the loss helpers use."""

    def __init__(self, model) -> None:
        self.model = model
        self.cfg = model.cfg

    @property
    def device(self):
        return device_of(self.model)

    @property
    def pad_token_id(self) -> int:
        tok = self.model.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def to_tokens(self, text: str, *, prepend_bos: bool = True):
        return self.model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0]

    def __call__(self, tokens, *, attention_mask=None, prompt_lengths=None):
        return self.model(tokens, attention_mask=attention_mask)
