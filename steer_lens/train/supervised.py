"""Supervised training of steering vectors: cross-entropy on completion tokens.

Examples are plain texts (every token after BOS is a target), ``(prompt, completion)`` pairs, or
dicts ``{"prompt", "completion", "suppress"}``, each part a text or token ids (for models without a
tokenizer). Prompt tokens are never targets. Objectives:

* ``"promotion"`` (default): mean cross-entropy ``-log p(y_t | y_<t)`` over completion tokens (nats).
* ``"suppression"``: mean ``-log(1 - p(y_t | y_<t))`` over the tokens of ``suppress`` (or of the
  completion when there is no ``suppress``): pushes the probability of that text down.
* ``"mixed"``: promotion of ``completion`` plus suppression of ``suppress``.

With ``kl_coef > 0`` every objective gets ``kl_coef * KL(p_steered || p_base)`` on the model's own
samples added (:mod:`steer_lens.train.side_effects`); the side effects of the vectors on those
samples (KL, distinct-2, repeat rate) are logged and returned whatever ``kl_coef`` is.

The one-shot objectives follow Dunefsky & Cohan 2025, "One-shot optimized steering vectors mediate
safety-relevant behaviors in LLMs" (promotion, suppression and mixed steering on a single example).
Learned steering vectors by SFT go back to Subramani et al. 2022, "Extracting Latent Steering
Vectors from Pretrained Language Models".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens._utils import batched, device_of
from steer_lens.errors import ConfigError, EmptyInputError, SequenceTooLongError
from steer_lens.train import distributed
from steer_lens.train.data import (
    Batch,
    Example,
    TokenIds,
    collate_rows,
    epoch_order,
    is_token_ids,
    normalise_example,
    token_ids,
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
from steer_lens.train.recompute import recompute_context, valid_recompute
from steer_lens.train.scored import scored_logits
from steer_lens.train.side_effects import (
    SideEffects,
    SideEffectWarning,
    prompt_rows,
    sample_kl,
    sample_measures,
    sample_rows,
    side_effects,
)

__all__ = ["SFTConfig", "SFTResult", "collate", "heldout_loss", "sft", "tokenize_examples"]

SIDE_EFFECT_SAMPLES = 16
"""Samples measured by the side-effect checks when ``side_effect_prompts`` is not given."""

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
        kl_coef: weight of a KL-to-base term on the model's **own samples**, added to the loss:
            every ``kl_every`` steps, ``kl_samples`` continuations of ``kl_tokens`` tokens are sampled
            (no gradient, vectors on, temperature 1) from the prompts of the step's first
            ``kl_samples`` examples (BOS for plain texts), and ``kl_coef * KL(p_steered || p_base)``
            (:func:`~steer_lens.train.side_effects.sample_kl`, nats/token, gradient into the vectors)
            is added; it is logged as ``"kl"`` and the logged ``"loss"`` includes the term. 0: off.
            Teacher-forced loss alone can reward a vector that breaks the text the model writes
            itself (issue 16); this term is what RL's ``kl_coef`` is for SFT.
        kl_every, kl_samples, kl_tokens: steps between KL terms, samples per term, tokens per sample.
        kl_prompts: prompts (texts, BOS prepended, or token ids with the BOS first) to sample the KL
            term's continuations from instead of the batch's prompts: step ``s`` takes
            ``kl_samples`` of them in turn from index ``s * kl_samples``. ``None``: the batch's.
        side_effect_prompts: prompts (texts, BOS prepended, or token ids with the BOS first) for the
            side-effect measures (:func:`~steer_lens.train.side_effects.side_effects`: exact KL to
            the base on the steered samples, distinct-2 and repeat rate), one sample of
            ``side_effect_tokens`` tokens each. Logged as ``"side/kl"``, ``"side/distinct_2"`` and
            ``"side/repeat_rate"`` every ``eval_every`` steps and at the last step (vectors as at
            the start of that step); measured with the base after training into
            :attr:`SFTResult.side_effects`, with a :class:`~steer_lens.train.side_effects.SideEffectWarning`
            when a check fails. ``None``: the training examples' distinct prompts (BOS for plain
            texts), cycled to 16 samples; give held-out prompts for a held-out measure.
        side_effect_tokens: tokens per side-effect sample.
        measure_side_effects: ``False`` skips the side-effect measures and warning.
        recompute: run the training forwards of the objective under
            :func:`~steer_lens.train.recompute.recompute_blocks` (activation recomputation over the
            blocks from the first vector on). ``True`` / ``"full"``: the blocks keep only their input
            residual and rerun their forward in the backward pass (what a step holds for the backward
            drops to a quarter or less, for about one extra forward per step). ``"selective"``: they
            keep the outputs of their matrix products and rerun only the element-wise ops (about two
            thirds of the memory of no recomputation, for a fraction of a forward). Figures: ``docs/benchmarks/lora.md``, P4.
            The gradients are those without recomputation (the same ops run again: bit-identical on
            CPU). The KL term's forward (``kl_coef``) is not recomputed.

    Defaults: AdamW with ``lr=1e-2`` in *relative* units (1% of the hook's typical per-coordinate
    residual RMS per step; see :mod:`steer_lens.train.loop`), 200 steps, batch 16, gradient clipping at 1.

    Raises:
        ConfigError: a field outside its range (the message names it).
    """

    batch_size: int = 16
    objective: Literal["promotion", "suppression", "mixed"] = "promotion"
    eval_texts: Sequence[str | TokenIds] | Tensor | None = None
    eval_every: int = 50
    micro_batch_size: int | None = None
    kl_coef: float = 0.0
    kl_every: int = 1
    kl_samples: int = 8
    kl_tokens: int = 16
    kl_prompts: Sequence[str | TokenIds] | Tensor | None = None
    side_effect_prompts: Sequence[str | TokenIds] | Tensor | None = None
    side_effect_tokens: int = 32
    measure_side_effects: bool = True
    recompute: bool | Literal["full", "selective"] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        require(self.objective in ("promotion", "suppression", "mixed"), "objective", self.objective,
                "'promotion', 'suppression' or 'mixed'")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "an int >= 1")
        check_micro_batch_size(self.micro_batch_size)
        require(not isinstance(self.kl_coef, bool) and isinstance(self.kl_coef, int | float)
                and math.isfinite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", self.kl_coef, "a finite float >= 0")
        for name in ("kl_every", "kl_samples", "kl_tokens", "side_effect_tokens"):
            require(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        require(isinstance(self.measure_side_effects, bool), "measure_side_effects", self.measure_side_effects,
                "True or False")
        require(valid_recompute(self.recompute), "recompute", self.recompute, "False, True, 'full' or 'selective'")
        for name in ("eval_texts", "side_effect_prompts", "kl_prompts"):
            object.__setattr__(self, name, _as_sequences(getattr(self, name), name))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (held-out texts and prompts counted, not copied)."""
        d = super().to_dict()
        for name in ("eval_texts", "side_effect_prompts", "kl_prompts"):
            d[name] = None if getattr(self, name) is None else len(getattr(self, name))
        return d


def _as_sequences(value: Any, name: str) -> tuple | None:
    """Texts or token-id sequences as a tuple (a ``[n, pos]`` tensor as ``n`` rows, one id sequence as one).

    Raises:
        ConfigError: one string (it would be split into characters), or no ``side_effect_prompts``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(f"{name}: got one string, which would be split into characters. Fix: pass a list, "
                          f"e.g. {name}=[text].")
    if (isinstance(value, Tensor) and value.ndim <= 1) or (not isinstance(value, Tensor) and is_token_ids(value)):
        return (value,)
    value = tuple(value)
    if not value and name in ("side_effect_prompts", "kl_prompts"):
        raise ConfigError(f"{name}: got an empty list. Fix: pass at least one prompt, None (the training "
                          "prompts) or set measure_side_effects=False.")
    return value


@dataclass(frozen=True)
class _Tokenized:
    prompt: list[int]
    completion: list[int]
    suppress_prompt: list[int]
    suppress: list[int] | None


def tokenize_examples(steered, examples: Iterable[Example], objective: str = "promotion") -> list[_Tokenized]:
    """Tokenize examples (prompt with BOS; completion and suppress text without), checking them.

    Parts given as token ids (1-D tensors or lists of ints; see
    :func:`~steer_lens.train.data.normalise_example`) are used as given: put the BOS id first in the
    prompt (a whole example given as ids has its first token as the prompt). Texts are tokenized as
    the model's tokenizer does; a text part next to an id part is tokenized on its own.

    Raises:
        EmptyInputError: no examples, an example with no target tokens, or an id prompt with no tokens.
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
        p, c = _split(steered, prompt, completion)
        sp, s = _split(steered, prompt, suppress) if _given(suppress) else (p, None)
        if not p:
            raise EmptyInputError(f"example {i}: the prompt has no tokens; give token ids with the BOS id first.")
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


def _given(part: Any) -> bool:
    """Whether an example part is there: a non-empty text or id tensor."""
    return part is not None and (part.numel() > 0 if isinstance(part, Tensor) else bool(part))


def _split(steered, prompt: str | Tensor, text: str | Tensor | None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)`` of ``prompt + text`` as the model tokenizes the joint string.

    Tokenizing the text on its own can differ from how it is tokenized after the prompt: a
    SentencePiece-style tokenizer adds a prefix token to every separate call, and a tokenizer that
    attaches spaces to the preceding token re-tokenizes the prompt's last word ("a" + " little" ->
    "a " + "little"). So the joint string is tokenized and split after the longest common prefix
    with the prompt's tokens; a re-tokenized boundary token becomes the first target. Token-id
    parts (tensors) are used as given; a text next to one is tokenized alone (the prompt with BOS).
    """
    if isinstance(prompt, Tensor) or isinstance(text, Tensor):
        def ids(part: str | Tensor, bos: bool) -> list[int]:
            return part.tolist() if isinstance(part, Tensor) else steered.to_tokens(part, prepend_bos=bos).tolist()

        return ids(prompt, True), ids(text, False) if _given(text) else []
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


def _target_logprobs(steered, batch: Batch) -> Float[Tensor, " n_targets"]:
    """``log p`` (nats, fp32) of the target tokens, in row-major order of ``batch.target_mask``; only
    those positions are unembedded (:func:`~steer_lens.train.scored.scored_logits`): a chat example's
    prompt positions cost neither the unembedding nor ``d_vocab`` floats each."""
    mask = batch.target_mask
    logits = scored_logits(steered, batch.tokens, lambda x: x[:, :-1][mask],
                           attention_mask=batch.attention_mask, prompt_lengths=batch.prompt_lengths)
    return logits.float().log_softmax(-1).gather(-1, batch.tokens[:, 1:][mask][:, None])[:, 0]


def _promotion_loss(steered, batch: Batch) -> Tensor:
    lp = _target_logprobs(steered, batch)
    return -lp.sum() / max(lp.numel(), 1)


def _suppression_loss(steered, batch: Batch) -> Tensor:
    lp = _target_logprobs(steered, batch)
    # -log(1 - p) computed stably from log p
    nll = -torch.log1p(-lp.exp().clamp(max=1 - 1e-6))
    return nll.sum() / max(lp.numel(), 1)


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


def _batch_loss(steered, items: Sequence[_Tokenized], objective: str, micro_batch_size: int | None,
                whole: Sequence[_Tokenized] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective of one batch, in micro-batches whose gradients accumulate to the full batch's.

    Every term is a mean over the target tokens of the *whole* batch: a micro-batch's mean is
    weighted by its share of those tokens, ``mean_chunk * n_chunk / n_batch = sum_chunk / n_batch``
    (see :func:`~steer_lens.train.loop.accumulate_gradients`); with one micro-batch the weight is 1.
    ``whole`` (distributed: the global batch, of which ``items`` is this process's shard) gives the
    token counts ``n_batch``, so the shards' losses and gradients add up to the global batch's.
    """
    terms = _objective_terms(items, objective)
    counts = {name: sum(len(t) for _, t in rows) for name, rows in _objective_terms(whole or items, objective)}
    losses = {"promotion": _promotion_loss, "suppression": _suppression_loss}

    def term(name: str, batch: Batch) -> Tensor:
        share = batch.target_mask.sum() / max(counts[name], 1)
        return losses[name](steered, batch) * share

    def chunk_loss(sl: slice) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: term(name, collate(steered, rows[sl])) for name, rows in terms}
        metrics = {f"{k}_loss": v.detach() for k, v in parts.items()} if objective == "mixed" else {}
        return sum(parts.values()), metrics

    return accumulate_gradients(micro_batches(len(items), micro_batch_size), chunk_loss)


@dataclass(frozen=True)
class SFTResult(TrainResult):
    """What :func:`sft` returns: the per-step metrics of a :class:`~steer_lens.train.loop.TrainResult`
    plus the side effects of the trained vectors on the model's own samples.

    Attributes:
        side_effects: a :class:`~steer_lens.train.side_effects.SideEffects` measured after training on
            ``SFTConfig.side_effect_prompts`` (KL in nats/token, distinct-2, repeat rate, with the
            base model's; held-out loss with ``eval_texts``); ``None`` with
            ``measure_side_effects=False``. ``side_effects.reasons`` says why a warning was raised.
    """

    side_effects: SideEffects | None = None

    def _repr_html_(self) -> str:
        html = super()._repr_html_()
        return html if self.side_effects is None else html + self.side_effects._repr_html_()


def sft(
    steered,
    examples: Iterable[Example],
    config: SFTConfig | None = None,
) -> SFTResult:
    """Train the steering vectors of ``steered`` on examples by supervised fine-tuning.

    Only the vectors learn (the model is frozen). Each step draws ``batch_size`` examples (epochs
    of a seeded permutation), right-pads them, and minimises the objective on the target tokens
    (in micro-batches of ``config.micro_batch_size`` examples with accumulated gradients, if set),
    plus ``kl_coef`` times the KL to the base model on the model's own samples when set. Held-out
    loss alone is no evidence that the text is intact (it teacher-forces human text); the
    side-effect measures on the model's own samples are (see :class:`SFTConfig`).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer`.
        examples: texts, token ids (1-D tensors or lists of ints, BOS first), ``(prompt, completion)``
            pairs, or dicts with ``prompt`` / ``completion`` / ``suppress``; each part a text or ids.
        config: :class:`SFTConfig` (default: ``SFTConfig()``).

    Returns:
        An :class:`SFTResult` (a :class:`~steer_lens.train.loop.TrainResult`) with per-step ``loss``
        (nats/token), ``grad_norm``, vector norms, ``kl`` with ``kl_coef``, ``heldout_loss`` with
        ``eval_texts``, ``side/*`` measures, and the final :class:`SideEffects` in ``.side_effects``.

    Raises:
        EmptyInputError: no examples or an empty completion.
        SequenceTooLongError: an example longer than ``n_ctx``.
        ConfigError: a malformed example or config, one string where a list of examples is expected,
            or text for a model without a tokenizer.
        TrainingDivergedError: non-finite loss or gradient (vectors restored to the last good state).

    Warns:
        SideEffectWarning: after training, the vectors' samples drift from the base model or degenerate.
    """
    config = config or SFTConfig()
    distributed.init_distributed()  # torchrun without init_process_group: join the group (no-op otherwise)
    distributed.require_shardable(config.batch_size, "batch_size")
    if isinstance(examples, (str, bytes)):
        raise ConfigError(
            "examples: got one string, which would be split into characters (one example each). Fix: pass "
            "a list of examples, e.g. [text] or [(prompt, completion)]."
        )
    data = tokenize_examples(steered, examples, config.objective)
    probe = collate(steered, [(d.prompt, d.completion) if d.completion else (d.suppress_prompt, d.suppress or [])
                              for d in data[:64]])
    resid_rms = typical_resid_rms(steered, probe.tokens, probe.attention_mask)
    eval_batch = _text_batch(steered, config.eval_texts) if config.eval_texts else None
    side_rows = _side_effect_rows(steered, data, config) if config.measure_side_effects else None
    kl_rows = None if config.kl_prompts is None else prompt_rows(steered, config.kl_prompts, "kl_prompts")
    own = {k: v for k, v in asdict(config).items() if k in ("batch_size", "objective", "kl_coef")}
    result = run_loop(steered, _step_fn(steered, data, config, eval_batch, side_rows, kl_rows), config,
                      resid_rms=resid_rms, objective="sft", extra_config={"sft": own, "n_examples": len(data)},
                      sharded=True)
    # distributed: the final side effects are measured (and warned about) on rank 0 only
    final = None if side_rows is None or not distributed.is_main_process() else \
        _final_side_effects(steered, side_rows, config)
    return SFTResult(**{f.name: getattr(result, f.name) for f in fields(result)}, side_effects=final)


def _step_fn(steered, data: list[_Tokenized], config: SFTConfig, eval_batch: Batch | None,
             side_rows: list[list[int]] | None, kl_rows: list[list[int]] | None):
    """The objective of one step (for :func:`~steer_lens.train.loop.run_loop`), with its evaluations."""
    order = epoch_order(len(data), config.steps * config.batch_size, config.seed)

    def step_fn(step: int):
        items = [data[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]]
        # distributed: this process's shard of the global batch `items`, normalised by the global token counts
        with recompute_context(steered, config.recompute):
            loss, metrics = _batch_loss(steered, distributed.shard(items), config.objective,
                                        config.micro_batch_size, whole=items)
        if metrics:  # the mixed objective's per-term losses: shards' parts summed over processes
            metrics = dict(zip(metrics, distributed.all_reduce_sum(torch.stack(list(metrics.values()))), strict=True))
        if config.kl_coef > 0 and step % config.kl_every == 0:
            kl = _kl_term(steered, _kl_prompts(items, kl_rows, config, step), config, step)
            # distributed: every process computes the whole KL term; its gradients are summed, hence / W
            loss = loss + config.kl_coef * kl / distributed.world_size()
            metrics["kl"] = kl.detach()
        if step % config.eval_every == 0 or step == config.steps - 1:
            metrics.update(_evaluate(steered, eval_batch, side_rows, config))
        return loss, metrics

    return step_fn


def _kl_prompts(items: Sequence[_Tokenized], kl_rows: list[list[int]] | None, config: SFTConfig,
                step: int) -> list[list[int]]:
    """The prompt rows of step ``step``'s KL samples: ``kl_prompts`` in turn, else the batch's first prompts."""
    if kl_rows is None:
        return [d.prompt if d.completion else d.suppress_prompt for d in items[: config.kl_samples]]
    start = step * config.kl_samples
    return [kl_rows[(start + i) % len(kl_rows)] for i in range(config.kl_samples)]


def _kl_term(steered, rows: list[list[int]], config: SFTConfig, step: int) -> Float[Tensor, ""]:
    """``KL(p_steered || p_base)`` (nats/token, with the vectors' graph) on fresh samples from prompt ``rows``."""
    with torch.no_grad():
        gen = sample_rows(steered, rows, config.kl_tokens, seed=config.seed * 1_000_003 + step)
    return sample_kl(steered, gen)


def _evaluate(steered, eval_batch: Batch | None, side_rows: list[list[int]] | None,
              config: SFTConfig) -> dict[str, Tensor | float]:
    """Held-out loss (nats/token) and the side-effect measures of the vectors as they are (no gradient)."""
    out: dict[str, Tensor | float] = {}
    with torch.no_grad():
        if eval_batch is not None:
            out["heldout_loss"] = _promotion_loss(steered, eval_batch)
        if side_rows is not None:
            _, (kl, d2, rr) = sample_measures(steered, side_rows, config.side_effect_tokens, config.seed)
            out.update({"side/kl": kl, "side/distinct_2": d2, "side/repeat_rate": rr})
    return out


def _side_effect_rows(steered, data: list[_Tokenized], config: SFTConfig) -> list[list[int]]:
    """The side-effect prompts as id rows: ``side_effect_prompts``, or the training prompts cycled to 16.

    Raises:
        EmptyInputError, ConfigError: a bad prompt (see :func:`~steer_lens.train.side_effects.prompt_rows`).
    """
    if config.side_effect_prompts is not None:
        return prompt_rows(steered, config.side_effect_prompts, "side_effect_prompts")
    n_ctx = int(steered.cfg.n_ctx)
    distinct = list(dict.fromkeys(tuple(d.prompt) for d in data if len(d.prompt) < n_ctx)) or [tuple(data[0].prompt[:1])]
    return [list(distinct[i % len(distinct)]) for i in range(max(SIDE_EFFECT_SAMPLES, min(len(distinct), 64)))]


def _final_side_effects(steered, rows: list[list[int]], config: SFTConfig) -> SideEffects:
    """:func:`~steer_lens.train.side_effects.side_effects` of the trained vectors, with held-out losses; warns."""
    res = side_effects(steered, rows, max_new_tokens=config.side_effect_tokens, seed=config.seed)
    if config.eval_texts:
        with steered.disabled():
            base = heldout_loss(steered, config.eval_texts)
        res = replace(res, heldout_loss=heldout_loss(steered, config.eval_texts), base_heldout_loss=base)
    if res.reasons:
        warnings.warn(f"the trained vectors change the model's own samples: {'; '.join(res.reasons)}. "
                      "Fix: set SFTConfig.kl_coef (e.g. 0.1), lower lr or steps, or read the samples "
                      "(result.side_effects.completions).", SideEffectWarning, stacklevel=3)
    return res


def _text_batch(steered, texts: Sequence[str | TokenIds]) -> Batch:
    """Texts (BOS prepended) or token ids (as given, BOS first) as a batch whose targets follow the first token."""
    rows = []
    n_ctx = int(steered.cfg.n_ctx)
    for i, t in enumerate(texts):
        ids = token_ids(t, f"texts[{i}]")
        ids = (steered.to_tokens(t, prepend_bos=True).tolist() if ids is None else ids)[:n_ctx]
        if len(ids) > 1:
            rows.append((ids[:1], ids[1:]))
    if not rows:
        raise EmptyInputError("texts: none has a token after BOS; give non-empty texts.")
    return collate(steered, rows)


@torch.no_grad()
def heldout_loss(steered_or_model, texts: Sequence[str | TokenIds] | Tensor, *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over ``texts``, BOS excluded as a target.

    With a :class:`~steer_lens.SteeredTransformer` the vectors are on (use ``disabled()`` for the
    base); with a plain model it is the model's loss. Texts longer than ``n_ctx`` are truncated.
    Token ids (a ``[n, pos]`` tensor, 1-D tensors or lists of ints) are used as given, their first
    token (the BOS) not a target. Teacher-forced on given text, this cannot see a vector that breaks
    the model's own samples: read :func:`~steer_lens.train.side_effects.side_effects` too.

    Raises:
        EmptyInputError: no texts, or none with a token after BOS.
        ConfigError: text for a model without a tokenizer, or something neither text nor ids.
    """
    from steer_lens.steering import SteeredTransformer

    texts = _as_sequences(texts, "texts") or ()
    if not texts:
        raise EmptyInputError("texts: got none; give at least one text.")
    steered = steered_or_model
    if not isinstance(steered, SteeredTransformer):
        steered = _Unsteered(steered_or_model)
    total = torch.zeros((), dtype=torch.float64, device=steered.device)
    count = torch.zeros((), dtype=torch.float64, device=steered.device)
    for chunk in batched(texts, batch_size):
        b = _text_batch(steered, chunk)
        total += -_target_logprobs(steered, b).sum().double()
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
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            return 0
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def to_tokens(self, text: str, *, prepend_bos: bool = True):
        if getattr(self.model, "tokenizer", None) is None:
            raise ConfigError("this model has no tokenizer; pass token ids instead of text.")
        return self.model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0]

    def __call__(self, tokens, *, attention_mask=None, prompt_lengths=None):
        return self.model(tokens, attention_mask=attention_mask)
