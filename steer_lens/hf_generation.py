"""Steered sampling on the Hugging Face model: ``generate`` with the wrapper's vectors added by hooks.

TransformerLens's one-token decoding step is slower than transformers' (issue 19, goal P3: on
SmolLM2-135M-Instruct, batch 16 × 64 new tokens, :meth:`~steer_lens.SteeredTransformer.sample` ran
at 0.36× the tokens/s of ``generate`` on the same weights; the hooks were not the cost). RL spends
most of a step sampling, so :class:`HFSampler` samples rollouts with the transformers model of the
same weights and ``generate`` (its KV cache, its sampling code), with the wrapper's vectors added by
forward hooks on the decoder's modules. The vectors are read when each call starts, so an optimiser
step between two calls is seen by the next one; the hooks are removed when the call ends.

Where a vector is added (a constant at a sub-layer's output projection is a constant added to the
residual stream after that sub-layer, the mapping of :func:`steer_lens.export.hf.bias_vectors`):

* ``blocks.L.hook_mlp_out`` and ``blocks.L.hook_resid_post`` → the output of layer L's MLP output
  projection (Llama ``mlp.down_proj``, GPT-2 ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``);
* ``blocks.L.hook_attn_out`` and ``blocks.L.hook_resid_mid`` (sequential blocks) → the output of layer
  L's attention output projection (``self_attn.o_proj``, ``attn.c_proj``, ``attention.dense``);
* ``blocks.L.hook_resid_pre`` → as ``mlp_out`` of layer L − 1; for L = 0 the input embedding's output.

What is equal to :func:`steer_lens.generation.sample_tokens`: the next-token logits at every step
(≤ 1e-4 in fp32, ``tests/test_hf_generation.py``), the filtering (temperature, then top-k, then
top-p keeping the smallest set of mass ≥ ``top_p``), and the :class:`~steer_lens.generation.Generation`
returned (tokens after a sequence's EOS hold the pad id, masks, the length: ``sample_tokens`` checks
for "all finished" every 8 steps, and the completion is padded to the length it would have).
A prompt repeated in the batch (RL's groups) is prefilled once: its tokens but the last run into a
``DynamicCache`` whose rows are copied to the batch (``DynamicCache.batch_select_indices``), and
``generate`` runs each row's last prompt token on it (``generate`` itself would run every row's prompt).
What differs: the random numbers. ``generate`` draws ``torch.multinomial`` from the global generator
(forked and seeded here when ``seed`` is given, so a seed reproduces a sample and the caller's RNG is
untouched); ``sample_tokens`` draws exponential noise from a private generator. The same seed gives
different (equally distributed) tokens on the two paths, and ``sample_tokens``'s sharded ``rows=`` has
no counterpart here. Refused (ConfigError, before anything runs): positions other than ``"all"``,
token-dependent kinds (gated, ablate-then-add), processed weights, per-head / neuron hooks, and
architectures not in :data:`steer_lens.export.hf.SUPPORTED`; use ``steered.sample`` for those.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from steer_lens._utils import Conversation, Prompt, check_token_ids, is_conversation
from steer_lens.errors import ConfigError, EmptyInputError, IncompatibleVectorError, SequenceTooLongError
from steer_lens.export.hf import SUPPORTED, bias_vectors, load_hf_model
from steer_lens.generation import Generation, check_sampling_args, distinct_prompts
from steer_lens.prompts import one_of

__all__ = ["HFSampler", "check_same_weights", "generation_from_new_tokens"]

_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # TL model -> its transformers model
_USE_TL = ("Fix: sample with steered.sample(...) (the TransformerLens sampler), which adds every kind of "
           "vector at every hook and position mask.")


def _cache_kwarg(hf: Any) -> str:
    """The name transformers gives the key/value cache argument: ``cache`` (5.x) or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float().to(a.device), rtol=1e-4, atol=1e-6)


def check_same_weights(steered: Any, hf_model: Any) -> None:
    """Raise unless ``hf_model`` holds ``steered.model``'s (unprocessed) weights: compared on the
    embedding, the unembedding and the MLP output matrix of the first and the last layer.

    Raises:
        ConfigError: ``hf_model``'s architecture is not in :data:`steer_lens.export.hf.SUPPORTED`.
        IncompatibleVectorError: a compared matrix differs (beyond 1e-4 relative) or has another shape.
    """
    arch = type(hf_model).__name__
    if arch not in SUPPORTED:
        raise ConfigError(f"{arch}: the Hugging Face sampler knows the layouts of {sorted(SUPPORTED)}. {_USE_TL}")
    tl, lay = steered.model, SUPPORTED[arch]
    layers = _get(hf_model, lay.layers)
    pairs = [("embedding", tl.W_E, hf_model.get_input_embeddings().weight),
             ("unembedding", tl.W_U, hf_model.get_output_embeddings().weight.T)]
    if len(layers) != int(tl.cfg.n_layers):
        raise IncompatibleVectorError(f"the Hugging Face model has {len(layers)} layers, the steered model "
                                      f"{tl.cfg.n_layers}. Fix: pass the hf_model the TransformerLens model was made from.")
    for i in sorted({0, len(layers) - 1}):
        w = _get(layers[i], lay.mlp_out).weight
        w_out = getattr(tl.blocks[i].mlp, "W_out", None)
        if w_out is not None:
            pairs.append((f"layer {i} MLP output", w_out, w.T if isinstance(_get(layers[i], lay.mlp_out),
                                                                              torch.nn.Linear) else w))
    bad = [name for name, a, b in pairs if not _close(a.detach(), b.detach())]
    if bad:
        raise IncompatibleVectorError(
            f"the Hugging Face model ({arch}) does not hold the TransformerLens model's weights: {bad} differ. "
            "Fix: pass hf_model= the transformers model the TransformerLens model was converted from, and "
            "load the TransformerLens model without weight processing (sl.load_model(name))."
        )


def generation_from_new_tokens(
    steered: Any,
    tokens: Int[Tensor, "batch pos"],
    attn: Int[Tensor, "batch pos"],
    texts: Sequence[str] | None,
    new: Int[Tensor, "batch n"],
    max_new_tokens: int,
    eos: int | None,
) -> Generation:
    """The :class:`~steer_lens.generation.Generation` that ``sample_tokens`` returns when it draws ``new``.

    ``new`` holds the generated tokens as ``generate`` returns them (a row's tokens after its first
    ``eos`` are ignored; ``generate`` stops when every row has ended). As ``sample_tokens``: tokens
    after a row's EOS become the pad id, ``completion_mask`` is True up to and including EOS, and the
    completion is padded to the length ``sample_tokens`` stops at (it checks for "all finished" every 8
    steps: ``min(max_new_tokens, 8 · ceil(n / 8))`` when every row ended at step ``n``).
    """
    pad = steered.pad_token_id
    if eos is None:
        alive = torch.ones_like(new, dtype=torch.bool)
    else:
        is_eos = (new == eos).long()
        alive = (is_eos.cumsum(1) - is_eos) == 0
    n = int(new.shape[1])
    length = max_new_tokens if n >= max_new_tokens else min(max_new_tokens, -(-n // 8) * 8)
    extra = length - n
    new = torch.where(alive, new, torch.full_like(new, pad))
    if extra > 0:
        new = torch.cat([new, torch.full((new.shape[0], extra), pad, dtype=new.dtype, device=new.device)], 1)
        alive = torch.cat([alive, torch.zeros((alive.shape[0], extra), dtype=torch.bool, device=alive.device)], 1)
    return Generation(
        tokens=torch.cat([tokens, new.to(tokens.dtype)], 1),
        attention_mask=torch.cat([attn, alive.long()], 1),
        completion_mask=alive,
        prompt_len=int(tokens.shape[1]),
        prompts=None if texts is None else list(texts),
        completions=_decode(steered, new, alive, eos),
    )


def _decode(steered: Any, new: Tensor, alive: Bool[Tensor, "batch new"], eos: int | None) -> list[str] | None:
    tok = getattr(steered.model, "tokenizer", None)
    if tok is None:
        return None
    out = []
    for row, m in zip(new.tolist(), alive.tolist(), strict=True):
        out.append(tok.decode([t for t, keep in zip(row, m, strict=True) if keep and t != eos]))
    return out


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFSampler:
    """Sample from a :class:`~steer_lens.SteeredTransformer` with transformers' ``generate`` (see the module).

    Args:
        steered: the wrapper; its vectors (plain or low-rank, ``positions="all"``) are read at each call,
            with its ``scale``, ``disabled()`` and ``only_hooks()`` state.
        hf_model: the transformers model whose weights ``steered.model`` holds (default: loaded by
            :func:`steer_lens.export.hf.load_hf_model` in the model's dtype, on its device, checked, and
            kept for later samplers of the same TransformerLens model while that model lives, so that
            ``HFSampler(steered)`` once per rollout costs nothing after the first). A model passed here
            is kept the same way: pass it once before ``train.rl(..., RLConfig(sampler="hf"))`` to
            sample with a model you already hold.

    Raises:
        ConfigError: what the module refuses (the message says to use ``steered.sample``); an
            ``hf_model`` on another device than the steered model; a model that cannot be loaded by name.
        IncompatibleVectorError: ``hf_model`` does not hold the TransformerLens model's weights.

    Example:
        >>> sampler = HFSampler(steered)
        >>> g = sampler.sample(["Once upon a time"] * 16, 64, seed=0)   # a Generation, as steered.sample
    """

    def __init__(self, steered: Any, hf_model: Any = None) -> None:
        self.steered = steered
        self._targets(steered.hook_names)  # refuse what cannot be added, before loading anything
        if hf_model is None and steered.model in _LOADED:
            self.hf_model = _LOADED[steered.model]  # loaded and checked by an earlier sampler
            return
        own = hf_model is None
        if own:
            hf_model = load_hf_model(steered, steered.model.cfg.dtype).to(steered.device).eval()
        dev = next(hf_model.parameters()).device
        if dev != steered.device:
            raise ConfigError(f"hf_model is on {dev}, the steered model on {steered.device}. "
                              f"Fix: hf_model.to('{steered.device}').")
        check_same_weights(steered, hf_model)
        _LOADED[steered.model] = hf_model  # later samplers of this model (RLConfig(sampler="hf")) reuse it
        self.hf_model = hf_model

    def _targets(self, hooks: Sequence[str] | None = None) -> dict[tuple[str, int], Tensor]:
        """``{("mlp" | "attn" | "embed", layer): vector}`` of ``hooks`` (default: the active ones, as a
        call of the wrapper would add them), in the model's dtype, on its device."""
        active = [h for h, _ in self.steered.fwd_hooks()] if hooks is None else list(hooks)
        try:
            vectors = bias_vectors(self.steered, hooks=active, embedding=True)
        except ConfigError as e:
            raise ConfigError(f"the Hugging Face sampler cannot add these vectors: {e.message} {_USE_TL}") from e
        dt = self.steered.model.cfg.dtype
        return {k: v.to(self.steered.device, dt) for k, v in vectors.items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[Any]:
        """Context manager: ``hf_model`` with the wrapper's current vectors added (hooks removed on exit).

        Raises:
            ConfigError: as the constructor (e.g. ``positions`` was changed since).
        """
        lay = SUPPORTED[type(self.hf_model).__name__]
        layers = _get(self.hf_model, lay.layers)
        handles = []
        try:
            for (sub, layer), v in self._targets().items():
                module = (self.hf_model.get_input_embeddings() if sub == "embed"
                          else _get(layers[layer], lay.mlp_out if sub == "mlp" else lay.attn_out))
                handles.append(module.register_forward_hook(lambda _m, _a, out, v=v: out + v))
            yield self.hf_model
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _plain_generation_config(self) -> Iterator[None]:
        # every sampling setting comes from the call: none from the checkpoint's generation_config.json
        from transformers import GenerationConfig

        prev = self.hf_model.generation_config
        self.hf_model.generation_config = GenerationConfig()
        try:
            yield
        finally:
            self.hf_model.generation_config = prev

    def _check(self, tokens: Tensor, max_new_tokens: int, temperature: float, top_p: float, top_k, do_sample: bool,
               seed) -> None:
        check_sampling_args(max_new_tokens, seed, top_k)
        if do_sample and not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"temperature: expected a positive finite number, got {temperature}.")
        if not (0 < top_p <= 1):
            raise ConfigError(f"top_p: expected a value in (0, 1], got {top_p}.")
        check_token_ids(tokens, self.steered.model.cfg, "prompt tokens")
        n_ctx = int(self.steered.model.cfg.n_ctx)
        if tokens.shape[1] + max_new_tokens > n_ctx:
            raise SequenceTooLongError(
                f"prompt of {tokens.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"context n_ctx={n_ctx}. Fix: shorten the prompt or lower max_new_tokens."
            )

    @torch.no_grad()
    def generate_hf(
        self,
        tokens: Int[Tensor, "batch pos"],
        attn: Int[Tensor, "batch pos"],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        do_sample: bool = True,
        seed: int | None = None,
        stop_at_eos: bool = True,
        **hf_kwargs: Any,
    ) -> Any:
        """``hf_model.generate`` of left-padded ``tokens`` with the vectors on; what ``generate`` returns.

        The arguments mean what they mean in :meth:`sample`; ``hf_kwargs`` go to ``generate`` (e.g.
        ``output_logits=True, return_dict_in_generate=True`` for the raw logits of every step).

        Raises:
            ConfigError, SequenceTooLongError: as :func:`steer_lens.generation.sample_tokens`.
        """
        self._check(tokens, max_new_tokens, temperature, top_p, top_k, do_sample, seed)
        kw: dict[str, Any] = dict(
            attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
            eos_token_id=self.steered.eos_token_id if stop_at_eos else None, pad_token_id=self.steered.pad_token_id,
        )
        if do_sample:
            kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0 if top_k is None else top_k)
        with self._plain_generation_config(), self.applied() as hf, _seeded(seed, self.steered.device):
            name = _cache_kwarg(hf)
            cache = None if {"cache", "past_key_values"} & set(hf_kwargs) else self._shared_prefill(hf, tokens, attn, name)
            if cache is not None:
                kw[name] = cache
            return hf.generate(tokens, **kw, **hf_kwargs)

    @staticmethod
    @torch.no_grad()
    def _shared_prefill(hf: Any, tokens: Tensor, attn: Tensor, name: str) -> Any:
        """A prompt repeated in ``tokens`` (RL's groups): each distinct prompt but its last token run once
        into a ``DynamicCache``, whose rows are then copied to the batch; ``None`` when every prompt differs.

        ``generate`` then runs only the uncached last position of each row (its prefill), with the
        position ids it would give (``attention_mask.cumsum - 1``, 1 at padding).
        """
        shared = distinct_prompts(tokens, attn) if tokens.shape[1] > 1 else None
        if shared is None:
            return None
        from transformers import DynamicCache

        p_tokens, p_mask, index = shared[0][:, :-1], shared[1][:, :-1], shared[2]
        try:
            cache = DynamicCache(config=hf.config)
        except TypeError:  # transformers before 4.56 builds its DynamicCache without the config
            cache = DynamicCache()
        position_ids = (p_mask.long().cumsum(-1) - 1).masked_fill(p_mask == 0, 1)
        hf(input_ids=p_tokens, attention_mask=p_mask, position_ids=position_ids, use_cache=True, **{name: cache})
        cache.batch_select_indices(index)
        return cache

    def sample_tokens(
        self,
        tokens: Int[Tensor, "batch pos"],
        attn: Int[Tensor, "batch pos"],
        texts: Sequence[str] | None,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        do_sample: bool = True,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        """:func:`steer_lens.generation.sample_tokens` on the Hugging Face model (left-padded ``tokens``).

        Raises:
            ConfigError, SequenceTooLongError: as :func:`steer_lens.generation.sample_tokens`.
        """
        out = self.generate_hf(tokens, attn, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               do_sample=do_sample, seed=seed, stop_at_eos=stop_at_eos)
        eos = self.steered.eos_token_id if stop_at_eos else None
        return generation_from_new_tokens(self.steered, tokens, attn, texts, out[:, tokens.shape[1]:],
                                          max_new_tokens, eos)

    def sample(
        self,
        prompts: Prompt | Sequence[Prompt] | Int[Tensor, "batch pos"] | None = None,
        max_new_tokens: int = 40,
        *,
        messages: Conversation | Sequence[Conversation] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        do_sample: bool = True,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Sample continuations with the vectors on, as :meth:`steer_lens.SteeredTransformer.sample`.

        Same arguments (no ``use_kv_cache``: ``generate`` always uses its cache) and the same
        :class:`~steer_lens.generation.Generation`; a seed reproduces a sample here but gives other
        tokens than ``steered.sample`` with that seed (see the module).

        Raises:
            EmptyInputError: no prompts.
            SequenceTooLongError: prompt plus ``max_new_tokens`` exceeds ``n_ctx``.
            ConfigError: bad sampling parameters; both or neither of ``prompts`` and ``messages``;
                vectors the sampler cannot add (use ``steered.sample``).
        """
        tokens, attn, texts = self._prompt_batch(one_of(prompts, messages))
        return self.sample_tokens(tokens, attn, texts, max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, do_sample=do_sample, seed=seed, stop_at_eos=stop_at_eos)

    def _prompt_batch(self, prompts: Any) -> tuple[Tensor, Tensor, list[str] | None]:
        s = self.steered
        if isinstance(prompts, Tensor):
            toks = prompts if prompts.ndim == 2 else prompts[None]
            if toks.numel() == 0:
                raise EmptyInputError("prompts: got an empty token tensor; give at least one token.")
            return toks.to(s.device), torch.ones_like(toks, device=s.device), None
        if isinstance(prompts, str) or is_conversation(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise EmptyInputError("prompts: got an empty list; give at least one prompt.")
        toks, mask = s.left_pad([s.prompt_tokens(p) for p in prompts])
        return toks, mask, [s.chat_text(p) if is_conversation(p) else p for p in prompts]
