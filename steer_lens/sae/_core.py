"""Shared plumbing of :mod:`steer_lens.sae`: the lazy sae-lens import, input checks, batching of
texts and activation capture at a hook, used by the SAE analyses (here and in
:mod:`steer_lens.analysis.shift`).

Nothing here is public API; the public names live in :mod:`steer_lens.sae`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from steer_lens._utils import device_of
from steer_lens.errors import (
    ConfigError,
    EmptyInputError,
    HookNameError,
    MissingDependencyError,
    ShapeMismatchError,
)
from steer_lens.hook_sites import HookSite
from steer_lens.models import check_hook_names, model_info

__all__: list[str] = []


#: a sae-lens ``SAE`` (any architecture) or a :class:`~steer_lens.sae.TrainedSAE`
SAELike = Any
#: a TransformerLens ``HookedTransformer`` (or a ``SteeredTransformer``, whose base model is used)
ModelLike = Any


class SAEModelMismatchWarning(UserWarning):
    """The SAE's metadata names another model than the one it is used with (same width)."""


class HookMismatchWarning(UserWarning):
    """The steering vector sits at another hook point than the SAE reads."""


# ---------------------------------------------------------------------------------------------------
# optional dependency
# ---------------------------------------------------------------------------------------------------
def sae_lens():
    """Import sae-lens lazily, with an error that names the extra to install."""
    try:
        import sae_lens as _sae_lens
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            f"steer_lens.sae needs sae-lens, which is not installed ({e}). "
            "Fix: pip install 'steer-lens[sae]' (or pip install 'sae-lens>=6,<7')."
        ) from e
    return _sae_lens


def as_sae(sae: Any):
    """Accept a sae-lens ``SAE`` or a :class:`~steer_lens.sae.TrainedSAE` (its ``.sae``)."""
    inner = getattr(sae, "sae", None)
    if inner is not None and hasattr(inner, "W_dec"):
        sae = inner
    if not (hasattr(sae, "W_dec") and hasattr(sae, "encode") and hasattr(sae, "decode")):
        raise ConfigError(
            f"sae: expected a sae-lens SAE (with W_dec, encode, decode) or a TrainedSAE, got "
            f"{type(sae).__name__}. Fix: load one with sl.sae.load(...) or train one with sl.sae.train(...)."
        )
    return sae


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------
def sae_hook(sae, hook: str | None = None) -> str:
    """The hook point an SAE reads: ``hook`` if given, else the SAE's ``metadata.hook_name``."""
    meta_hook = getattr(sae.cfg.metadata, "hook_name", None)
    if hook is not None:
        if meta_hook is not None and meta_hook != hook:
            raise ConfigError(
                f"hook: the SAE was trained on {meta_hook!r} (its metadata.hook_name), got hook={hook!r}. "
                "Fix: pass the SAE's own hook, or leave hook=None to use it."
            )
        return hook
    if meta_hook is None:
        raise ConfigError(
            "the SAE does not say which hook it reads (metadata.hook_name is empty). Fix: load it with "
            "sl.sae.load(path, hook='blocks.L.hook_resid_post') or pass hook=... here."
        )
    return str(meta_hook)


def hook_width(model, hook: str) -> tuple[int, ...]:
    """Shape of the activation at ``hook`` for a 2-token input (raises HookNameError)."""
    from steer_lens.steering import hook_shapes

    return hook_shapes(model, [hook])[hook]


def check_sae(model, sae, hook: str | None = None) -> str:
    """Validate that ``sae`` can read ``model`` at its hook; return the hook name.

    Raises:
        HookNameError: the hook is not in the model.
        ShapeMismatchError: the hook's width is not the SAE's ``d_in``.
        ConfigError: the SAE has no hook name, or reshapes activations (``hook_z`` SAEs).
    Warns:
        SAEModelMismatchWarning: the SAE's metadata names a different model (both names given).
    """
    hook = sae_hook(sae, hook)
    try:
        check_hook_names(model, [hook])
    except HookNameError as e:
        raise HookNameError(
            f"the SAE reads hook {hook!r}, which is not a hook point of the model {model_info(model).name!r}. "
            + e.message
        ) from None
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise ConfigError(
            f"this SAE reshapes its input ({sae.cfg.reshape_activations!r}, e.g. attention hook_z); "
            "steer_lens.sae supports SAEs on [batch, pos, d] activations such as the residual stream."
        )
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise ConfigError(
            f"this SAE normalises each token at run time (normalize_activations={norm!r}), so its decode "
            "depends on the last encode's state and feature interventions are ill-defined. Fix: use an SAE "
            "with normalize_activations='none' (folded scaling, as sl.sae.train produces)."
        )
    shape = hook_width(model, hook)
    d_in = int(sae.cfg.d_in)
    if len(shape) != 3 or shape[-1] != d_in:
        raise ShapeMismatchError(
            f"the SAE has d_in={d_in} but hook {hook!r} of model {model_info(model).name!r} has "
            f"activations of shape {list(shape)} (batch 1, pos 2); expected [batch, pos, {d_in}]. "
            "Fix: use an SAE trained on this model and hook (sl.sae.train(model, hook, texts))."
        )
    mdev, sdev = device_of(model), sae.W_dec.device
    if mdev.type != sdev.type or (mdev.index or 0) != (sdev.index or 0):
        raise ConfigError(
            f"the SAE is on {sdev} but the model is on {mdev}. Fix: sae.to('{mdev}') (or load it with "
            f"sl.sae.load(..., device='{mdev}'))."
        )
    sae_model = getattr(sae.cfg.metadata, "model_name", None)
    name = model_info(model).name
    if sae_model and sae_model != name:
        warnings.warn(
            f"the SAE was trained on model {sae_model!r} but is used with model {name!r} (same width "
            f"{d_in}); its features may mean nothing here.",
            SAEModelMismatchWarning,
            stacklevel=3,
        )
    return hook


def hook_order(model, hooks: Sequence[str]) -> dict[str, int]:
    """Order in which ``hooks`` fire in a forward pass (0 = first)."""
    order: list[str] = []

    def record(act, hook):
        order.append(hook.name)

    tokens = torch.zeros(1, 2, dtype=torch.long, device=device_of(model))
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(h, record) for h in set(hooks)], return_type=None)
    return {h: order.index(h) for h in hooks}


def warn_if_vectors_after(steered, sae_hook_name: str) -> None:
    """Warn (:class:`HookMismatchWarning`) when every vector sits downstream of the SAE's hook."""
    order = hook_order(steered.model, [sae_hook_name, *steered.hook_names])
    if all(order[h] > order[sae_hook_name] for h in steered.hook_names):
        warnings.warn(
            f"every steering vector ({list(steered.hook_names)}) is downstream of the SAE's hook "
            f"{sae_hook_name!r}: the SAE's features cannot change. Use an SAE at or after the vector's hook.",
            HookMismatchWarning,
            stacklevel=3,
        )


def capture(run: Callable[..., Any], tokens: Tensor, hook: str, kw: dict[str, Any]) -> tuple[Tensor, Any]:
    """``run(tokens, fwd_hooks=[(hook, grab)], **kw)`` and the activation at ``hook`` (detached).

    Returns:
        ``(activation [batch, pos, d], the run's output)``.
    """
    store: dict[str, Tensor] = {}

    def grab(act, hook):
        store["x"] = act.detach()

    out = run(tokens, fwd_hooks=[(hook, grab)], **kw)
    return store["x"], out


# ---------------------------------------------------------------------------------------------------
# texts -> padded token batches
# ---------------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """One padded batch: ``tokens``/``attention_mask`` ``[b, p]``, ``count`` marks the positions whose
    activations enter statistics (real tokens, BOS excluded for text input), ``texts`` the sources."""

    tokens: Tensor
    attention_mask: Tensor
    count: Tensor
    texts: list[str] | None


def _text_of(item: Any) -> Any:
    if isinstance(item, dict):
        if "text" not in item:
            raise ConfigError(
                f"a dataset row has no 'text' field (fields: {sorted(item)}). Fix: pass "
                "dataset['your_column'] or a list of strings."
            )
        return item["text"]
    return item


def iter_batches(
    model, texts: Any, *, batch_size: int = 16, max_len: int | None = None, skip_bos: bool = True
) -> Iterator[TokenBatch]:
    """Stream ``texts`` as left-padded batches.

    ``texts``: a string, an iterable of strings (or of dataset rows with a ``"text"`` field, e.g. a
    Hugging Face dataset), an iterable of 1-D token tensors, or a token tensor ``[batch, pos]``.
    Strings get BOS prepended and are truncated to ``max_len`` (default ``n_ctx``); BOS positions are
    left out of statistics when ``skip_bos``. Token input is used as given (every position counts).

    Raises:
        EmptyInputError: no texts, or a text with no tokens.
        ConfigError: strings given to a model without a tokenizer.
    """
    n_ctx = int(model.cfg.n_ctx)
    max_len = n_ctx if max_len is None else min(int(max_len), n_ctx)
    device = device_of(model)
    tok = getattr(model, "tokenizer", None)
    pad_id = 0
    if tok is not None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Tensor):
        if texts.ndim == 1:
            texts = texts[None]
        if texts.ndim != 2 or texts.numel() == 0:
            raise EmptyInputError(
                f"texts: expected a non-empty token tensor [batch, pos], got shape {list(texts.shape)}."
            )
        for chunk in texts[:, :max_len].to(device).split(batch_size):
            ones = torch.ones_like(chunk)
            yield TokenBatch(chunk, ones, ones.bool(), None)
        return

    n_seen = 0
    chunk_ids: list[Tensor] = []
    chunk_texts: list[str] = []
    chunk_is_text: list[bool] = []

    def flush() -> TokenBatch:
        n = max(int(t.shape[0]) for t in chunk_ids)
        b = len(chunk_ids)
        tokens = torch.full((b, n), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((b, n), dtype=torch.long, device=device)
        count = torch.zeros((b, n), dtype=torch.bool, device=device)
        for j, (ids, is_text) in enumerate(zip(chunk_ids, chunk_is_text, strict=True)):
            L = int(ids.shape[0])
            tokens[j, n - L :] = ids.to(device)
            mask[j, n - L :] = 1
            first = n - L + (1 if (is_text and skip_bos and L > 1) else 0)
            count[j, first:] = True
        texts_out = chunk_texts if all(chunk_is_text) else None
        return TokenBatch(tokens, mask, count, texts_out)

    for item in texts:
        item = _text_of(item)
        if isinstance(item, str):
            if tok is None:
                raise ConfigError(
                    "texts: this model has no tokenizer, so strings cannot be tokenized. Fix: pass token "
                    "ids (a tensor [batch, pos] or a list of 1-D tensors)."
                )
            ids = model.to_tokens(item, prepend_bos=True, truncate=False)[0][:max_len]
            chunk_texts.append(item)
            chunk_is_text.append(True)
        elif isinstance(item, Tensor) and item.ndim == 1:
            ids = item[:max_len]
            chunk_texts.append("")
            chunk_is_text.append(False)
        else:
            raise ConfigError(
                f"texts: expected strings or 1-D token tensors, got an item of type {type(item).__name__}."
            )
        if ids.shape[0] == 0:
            raise EmptyInputError(f"texts: item {n_seen} has no tokens; remove empty texts.")
        chunk_ids.append(ids)
        n_seen += 1
        if len(chunk_ids) == batch_size:
            yield flush()
            chunk_ids, chunk_texts, chunk_is_text = [], [], []
    if chunk_ids:
        yield flush()
    if n_seen == 0:
        raise EmptyInputError("texts: got no texts; pass at least one string or token sequence.")


def reiterable(texts: Any) -> Any:
    """``texts`` as something that can be iterated more than once (a one-shot iterator is listed)."""
    if isinstance(texts, str | Tensor):
        return texts
    if isinstance(texts, Iterator):
        return list(texts)
    return texts


def check_nonempty(texts: Any) -> None:
    """Raise EmptyInputError for an empty list / tensor (lazy iterables are checked when streamed)."""
    if isinstance(texts, Tensor):
        if texts.numel() == 0:
            raise EmptyInputError("texts: got an empty token tensor; give at least one token.")
    elif isinstance(texts, Sequence) and not isinstance(texts, str) and len(texts) == 0:
        raise EmptyInputError("texts: got an empty list; pass at least one text.")
    elif isinstance(texts, str) and not texts:
        raise EmptyInputError("texts: got an empty string; pass at least one non-empty text.")


def run_kwargs(model, hook: str, batch: TokenBatch, *, stop: bool) -> dict[str, Any]:
    """Keyword arguments for a forward pass over ``batch`` (attention mask; early stop at the hook)."""
    kw: dict[str, Any] = {"attention_mask": batch.attention_mask}
    try:
        layer = HookSite.parse(hook).layer
    except HookNameError:  # a hook outside steer_lens's grammar (e.g. ln1.hook_normalized): run it all
        layer = None
    if stop and layer is not None and layer + 1 < int(model.cfg.n_layers):
        kw["stop_at_layer"] = layer + 1
    return kw


