"""The end-to-end demo: train a concept vector by SFT on real stories, then read it.

:func:`run_demo` is what ``steer-lens demo`` (and ``make demo``) runs. On the default model it

1. collects training sentences that contain ``word`` from the given text files (or, without files,
   from stories the model samples itself), and held-out sentences that do not;
2. trains one steering vector at ``blocks.{layer}.hook_{hook}`` by SFT (:func:`steer_lens.train.sft`)
   with a KL-to-base term on the model's own samples (``kl_coef``);
3. measures the rate of ``word`` in sampled continuations of a prompt, base vs steered, with the same
   seeds (word boundaries on decoded text: this tokenizer attaches spaces to the preceding token), and
   the side effects on the model's own continuations of the prompt (exact KL to the base model,
   distinct-2, repeat rate: :mod:`steer_lens.train.side_effects`), the evidence that the text is
   not corrupted (held-out loss on human text alone missed a broken vector, issue 16);
4. reads the vector: vector logit lens (raw and through the final norm), the per-layer lens of the
   prompt, and the per-generated-position shift of the next-token distribution;
5. writes ``report.html`` (self-contained: plotly.js inline, opens offline), ``summary.json`` and the
   saved vector (``vector/``) into the output folder.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from steer_lens.errors import EmptyInputError
from steer_lens.vectors.io import atomic_write_bytes, atomic_write_json

__all__ = ["DemoResult", "load_texts", "run_demo", "split_sentences", "word_rate"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "raincandy-u/TinyStories-656K"


def load_texts(paths: Sequence[str | Path]) -> list[str]:
    """Read stories from text files (stories separated by ``<|endoftext|>`` or blank lines / lines).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    stories: list[str] = []
    for p in paths:
        raw = Path(p).read_text(encoding="utf-8")
        for chunk in raw.split("<|endoftext|>"):
            stories += [line.strip() for line in chunk.splitlines() if line.strip()]
    return stories


def split_sentences(texts: Sequence[str]) -> list[str]:
    """Split texts into sentences at ``.``, ``!`` or ``?`` followed by white space."""
    out = []
    for t in texts:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", t) if len(s.strip()) > 3]
    return out


def word_rate(texts: Sequence[str], word: str) -> float:
    """Fraction of texts that contain ``word`` as a whole word (case-insensitive)."""
    pat = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    return sum(bool(pat.search(t)) for t in texts) / max(1, len(texts))


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured (also written as ``summary.json``).

    Attributes:
        word, hook, model: what was trained where.
        n_train, n_heldout: sentences used.
        base_rate, steered_rate: fraction of sampled continuations containing the word.
        heldout_loss_base, heldout_loss_steered: nats/token on held-out sentences without the word.
        kl_coef: weight of SFT's KL-to-base term.
        kl_to_base: exact ``KL(p_steered || p_base)`` on the steered continuations of the prompt
            (nats/token; 16 samples).
        distinct_2_base, distinct_2_steered: within-sample distinct-2 of those continuations (1: no
            repeated 2-gram).
        repeat_rate_base, repeat_rate_steered: fraction of generated tokens repeating one of the 4
            before them.
        side_effect_warnings: why :class:`~steer_lens.train.side_effects.SideEffectWarning` was raised
            (empty: healthy).
        word_token_rank_raw: best rank of a token spelling the word in the raw vector lens (1 = top).
        first_position_share: share of the next-token change on the first generated position.
        vector_norm: the trained vector's norm (residual units).
        seconds_train, seconds_total: wall-clock times.
        out: output folder.
    """

    word: str
    hook: str
    model: str
    n_train: int
    n_heldout: int
    base_rate: float
    steered_rate: float
    heldout_loss_base: float
    heldout_loss_steered: float
    kl_coef: float
    kl_to_base: float
    distinct_2_base: float
    distinct_2_steered: float
    repeat_rate_base: float
    repeat_rate_steered: float
    side_effect_warnings: list[str]
    word_token_rank_raw: int | None
    first_position_share: float
    vector_norm: float
    seconds_train: float
    seconds_total: float
    out: str


def _word_rank(lens_scores, model, word: str) -> int | None:
    tok = model.tokenizer
    ranks = []
    for i in range(int(model.cfg.d_vocab)):
        s = tok.decode([i]).strip().strip(".,!?").lower()
        if s == word.lower():
            ranks.append(lens_scores.rank_of(i))
    return min(ranks) if ranks else None


def run_demo(
    *,
    model_name: str = DEFAULT_MODEL,
    gguf_file: str | None = None,
    word: str = "dog",
    layer: int = 1,
    hook: str = "resid_pre",
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 16,
    texts: Sequence[str | Path] = (),
    out: str | Path = "demo-out",
    device: str = "auto",
    prompt: str = "Once upon a time",
    n_samples: int = 64,
    max_new_tokens: int = 40,
    seed: int = 0,
    progress: bool = True,
    kl_coef: float = 1.0,
    kl_every: int = 2,
) -> DemoResult:
    """Run the demo end to end and write its report; see the module docstring.

    ``gguf_file``: the GGUF file in ``model_name``'s repository, for a GGUF model (see
    :func:`steer_lens.load_model`). ``kl_coef`` / ``kl_every`` are :class:`~steer_lens.train.SFTConfig`'s
    KL-to-base term on the model's continuations of ``prompt`` (0: off; without it the default vector writes broken text,
    with a :class:`~steer_lens.train.side_effects.SideEffectWarning`).

    Returns:
        A :class:`DemoResult`.

    Raises:
        EmptyInputError: no training sentence contains ``word``.
        ModelNotAvailableError: the model is neither cached nor downloadable.
    """
    import steer_lens as sl
    from steer_lens.train import SFTConfig, heldout_loss, sft

    t0 = time.perf_counter()
    out = Path(out)
    model = sl.load_model(model_name, gguf_file=gguf_file, device=device)
    hook_name = f"blocks.{layer}.hook_{hook}"
    steered = sl.SteeredTransformer(model, [hook_name])

    train_texts, held, source = _sentences(steered, texts, word, seed)
    logger.info("training on %d sentences containing %r (%s)", len(train_texts), word, source)

    prompts = [prompt] * n_samples
    with steered.disabled():
        base_samples = steered.sample(prompts, max_new_tokens, seed=seed).completions or []
        loss_base = heldout_loss(steered, held) if held else float("nan")

    t1 = time.perf_counter()
    result = sft(steered, train_texts, SFTConfig(
        lr=lr, steps=steps, batch_size=batch_size, seed=seed, progress=progress, kl_coef=kl_coef,
        kl_every=kl_every, kl_prompts=[prompt], side_effect_prompts=[prompt] * 16,
        side_effect_tokens=max_new_tokens))
    t_train = time.perf_counter() - t1
    se = result.side_effects

    steered_samples = steered.sample(prompts, max_new_tokens, seed=seed).completions or []
    loss_steered = heldout_loss(steered, held) if held else float("nan")
    raw = sl.lens.vector_logit_lens(steered, k=20, mode="raw")
    normed = sl.lens.vector_logit_lens(steered, k=20, mode="norm")
    layers = sl.lens.layer_logit_lens(steered, prompt)
    shift = sl.analysis.generation_shift(steered, prompt, max_new_tokens=max_new_tokens, n_samples=16, seed=seed)

    out.mkdir(parents=True, exist_ok=True)
    steered.save(out / "vector")
    res = DemoResult(
        word=word, hook=hook_name, model=model_name, n_train=len(train_texts), n_heldout=len(held),
        base_rate=word_rate(base_samples, word), steered_rate=word_rate(steered_samples, word),
        heldout_loss_base=loss_base, heldout_loss_steered=loss_steered, kl_coef=kl_coef, kl_to_base=se.kl,
        distinct_2_base=se.base_distinct_2, distinct_2_steered=se.distinct_2,
        repeat_rate_base=se.base_repeat_rate, repeat_rate_steered=se.repeat_rate,
        side_effect_warnings=list(se.reasons),
        word_token_rank_raw=_word_rank(raw[hook_name], model, word),
        first_position_share=shift.first_position_share,
        vector_norm=steered.vectors.norms()[hook_name],
        seconds_train=t_train, seconds_total=time.perf_counter() - t0, out=str(out),
    )
    atomic_write_json(out / "summary.json", asdict(res))
    figs = [
        ("Training loss, KL to the base and side effects", result.plot()),
        ("Side effects on the model's own samples (base vs steered)", se.plot()),
        ("Vector logit lens (raw: W_U·v)", raw.plot()),
        ("Vector logit lens (through the final norm)", normed.plot()),
        (f"Per-layer logit lens of {prompt!r}", layers.plot()),
        ("Next-token change per generated position", shift.plot()),
    ]
    _write_report(out / "report.html", res, figs, base_samples[:5], steered_samples[:5], source)
    return res


def _sentences(steered, texts: Sequence[str | Path], word: str,
               seed: int) -> tuple[list[str], list[str], str]:
    """``(training sentences with the word, up to 200 held-out ones without, where they came from)``.

    Raises:
        EmptyInputError: no sentence contains ``word``.
    """
    pat = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    if texts:
        stories = load_texts(texts)
        source = f"{len(stories)} stories from {len(texts)} file(s)"
    else:
        with steered.disabled():
            stories = steered.sample([""] * 256, 120, seed=seed + 1000).completions or []
        source = "256 stories sampled from the model"
    sentences = split_sentences(stories)
    train_texts = [s for s in sentences if pat.search(s)]
    if not train_texts:
        raise EmptyInputError(
            f"no sentence in the texts contains {word!r}; pick another --word or give other --texts."
        )
    return train_texts, [s for s in sentences if not pat.search(s)][:200], source


def _write_report(path: Path, res: DemoResult, figs, base_samples, steered_samples, source: str) -> None:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in asdict(res).items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>steer_lens demo</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 8px}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}</style></head><body>",
        f"<h1>steer_lens demo: a '{html.escape(res.word)}' vector at {html.escape(res.hook)}</h1>",
        f"<p>Model <code>{html.escape(res.model)}</code>; training text: {html.escape(source)}.</p>",
        f"<p><b>Rate of '{html.escape(res.word)}'</b> in {len(base_samples) and 'sampled'} continuations: "
        f"base {res.base_rate:.1%} → steered {res.steered_rate:.1%} (same seeds).</p>",
        f"<p><b>Side effects</b> on the model's own continuations: KL to the base {res.kl_to_base:.3f} "
        f"nats/token, distinct-2 {res.distinct_2_base:.3f} → {res.distinct_2_steered:.3f}, repeat rate "
        f"{res.repeat_rate_base:.3f} → {res.repeat_rate_steered:.3f}: "
        f"{html.escape('; '.join(res.side_effect_warnings)) or 'healthy'}.</p>",
        f"<table>{rows}</table>",
    ]
    for i, (title, fig) in enumerate(figs):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("<h2>Samples</h2><h3>base</h3>")
    parts += [f"<pre>{html.escape(s)}</pre>" for s in base_samples]
    parts.append("<h3>steered</h3>")
    parts += [f"<pre>{html.escape(s)}</pre>" for s in steered_samples]
    parts.append("</body></html>")
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))


def summary_text(res: DemoResult) -> str:
    """A few human-readable lines summarising a :class:`DemoResult`."""
    return "\n".join([
        f"vector at {res.hook} for {res.word!r} on {res.model} ({res.n_train} training sentences)",
        f"rate of {res.word!r}: base {res.base_rate:.1%} -> steered {res.steered_rate:.1%}",
        f"own samples: KL to base {res.kl_to_base:.3f} nats/token, distinct-2 {res.distinct_2_base:.3f} -> "
        f"{res.distinct_2_steered:.3f}, repeat rate {res.repeat_rate_base:.3f} -> "
        f"{res.repeat_rate_steered:.3f} ({'; '.join(res.side_effect_warnings) or 'healthy'})",
        f"held-out loss (nats/token): base {res.heldout_loss_base:.3f} -> steered {res.heldout_loss_steered:.3f}",
        f"best rank of a {res.word!r} token in the raw vector lens: {res.word_token_rank_raw}",
        f"first generated position's share of the next-token change: {res.first_position_share:.1%}",
        f"train {res.seconds_train:.1f} s, total {res.seconds_total:.1f} s; report: {res.out}/report.html",
        json.dumps({"base_rate": res.base_rate, "steered_rate": res.steered_rate}),
    ])
