"""A training corpus sampled from the model itself (:func:`sample_corpus`), for models whose real
text is too small to train an SAE on.
"""

from __future__ import annotations

from collections.abc import Sequence

from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.sae._core import ModelLike

__all__ = ["sample_corpus"]


def sample_corpus(
    model: ModelLike,
    n_texts: int = 1000,
    max_new_tokens: int = 256,
    *,
    prompts: Sequence[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
) -> list[str]:
    """Sample texts from the (unsteered) model, as a training corpus for :func:`train`.

    Small models often come with little real text; an SAE trained on the model's own samples sees
    the activation distribution the model produces, and real text can then be kept for evaluation.
    Each batch is sampled with seed ``seed + batch_index`` (reproducible on one device).

    Args:
        model: a HookedTransformer with a tokenizer, or a SteeredTransformer (sampled with its
            vectors off).
        n_texts: number of texts.
        max_new_tokens: tokens per text (stops earlier at EOS).
        prompts: prompts cycled over the texts (default: the empty prompt, i.e. BOS only, which
            samples whole stories).
        temperature: softmax temperature.
        top_p: nucleus-sampling mass.
        batch_size: texts sampled in parallel.
        seed: base seed.

    Returns:
        ``n_texts`` strings (prompt + completion).

    Raises:
        ConfigError: bad counts, or a model without tokenizer.
        SequenceTooLongError: ``max_new_tokens`` plus prompt exceeds ``n_ctx``.
    """
    from steer_lens.steering import SteeredTransformer

    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts < 1:
        raise ConfigError(f"n_texts: expected a positive integer, got {n_texts!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}.")
    if isinstance(model, SteeredTransformer):
        steered = model
        base = model.model
    else:
        base = model
        if getattr(base, "tokenizer", None) is None:
            raise ConfigError("sample_corpus needs a model with a tokenizer.")
        flags = [p.requires_grad for p in base.parameters()]
        steered = SteeredTransformer(base, hooks=["blocks.0.hook_resid_pre"])
        for p, f in zip(base.parameters(), flags, strict=True):
            p.requires_grad_(f)
    prompts = list(prompts) if prompts is not None else [""]
    if not prompts:
        raise EmptyInputError("prompts: got an empty list; pass at least one prompt or None.")
    out: list[str] = []
    i = 0
    with steered.disabled():
        while len(out) < n_texts:
            b = min(batch_size, n_texts - len(out))
            batch_prompts = [prompts[(len(out) + j) % len(prompts)] for j in range(b)]
            texts = steered.sample(
                batch_prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i
            ).texts()
            out.extend(texts or [])
            i += 1
    return out
