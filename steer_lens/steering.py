"""The steered model: a HookedTransformer with learned vectors added at hook points during each call.

:class:`SteeredTransformer` wraps a model (anything with TransformerLens's hook API) and a
:class:`~steer_lens.vectors.SteeringVectors` module. Every call (forward, :meth:`generate`,
:meth:`run_with_cache`, :meth:`run_with_hooks`) installs one forward hook per vector through the
model's own ``hooks()`` context manager, which removes them when the call ends, also when it raises.
Between calls the wrapped model is exactly the model it was: run it directly (``steered.model``) or
use ``with steered.disabled():`` for the base run.

**Gradients.** Like a frozen TransformerLens model, a call records no autograd graph unless asked:
outside training the vectors enter as constants, so ``steered(tokens)``, ``run_with_cache``,
``generate`` and the analyses return tensors with ``requires_grad=False`` and hold no graph. To get
gradients into the vectors run the call inside ``with steered.gradients():`` (or pass ``grad=True``);
torch's own switches apply inside it (``torch.no_grad()`` still wins). The trainers
(``sl.train.sft``, ``rl``, ``one_shot``) do this for you. A call whose activations already require
grad (a float input that requires grad, a hook that makes a leaf, as attribution patching does) keeps
the vectors on that graph too.

At hook ``h`` the activation becomes ``act + scale * mask[b, t] * delta_h(act)`` where ``delta_h`` is
the vector (cast to the activation's dtype) and ``mask`` selects positions:

* ``"all"``: every position (the default, as in ActAdd / CAA and "Small Vectors, Big Effects");
* ``"prompt"``: positions whose *input* token belongs to the prompt;
* ``"generated"``: positions whose input token was generated (or, in training, is a completion
  token). The first generated token is predicted from the last prompt position, so under
  ``"generated"`` it is produced by an unsteered pass;
* an explicit boolean mask ``[pos]`` or ``[batch, pos]`` over absolute positions (positions past its
  end are not steered).

Methods: activation addition (Turner et al. 2023), contrastive activation addition (Rimsky et al.
2024), and learned steering vectors (Subramani et al. 2022; Sinii et al. 2025).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from steer_lens import _steering_settings as _settings
from steer_lens._utils import Conversation, Prompt, check_token_ids, device_of, is_conversation
from steer_lens.caa import difference_of_means
from steer_lens.errors import ConfigError, HookNameError, NonFiniteError, ShapeMismatchError  # noqa: F401 (the last two: named in the docstrings' Raises, linked by the API docs)
from steer_lens.generation import Generation, sample_tokens
from steer_lens.hooks import (
    PositionContext,
    PositionSpec,
    acting_thread,
    frozen_parameters,
    hook_shapes,
    shared_weights,
    vector_shapes,
)
from steer_lens.models import ModelInfo, model_info
from steer_lens.prompts import one_of
from steer_lens.steering_tokens import TokenizationMixin, pass_token_ids
from steer_lens.vector_folder import folder_config, read_folder, write_folder
from steer_lens.vectors import SteeringVectors

__all__ = [
    "Conversation",
    "Generation",
    "PositionSpec",
    "Prompt",
    "SteeredTransformer",
    "difference_of_means",
    "frozen_parameters",
    "hook_shapes",
    "is_conversation",
]

class SteeredTransformer(TokenizationMixin, nn.Module):
    """A model plus learned steering vectors at hook points, applied only while a call runs.

    Calling it like the model (``steered(tokens)``) returns logits ``[batch, pos, d_vocab]`` with the
    vectors on and, like a frozen TransformerLens model, no autograd graph (``requires_grad=False``).
    Inside ``with steered.gradients():`` (or with ``grad=True``) gradients flow into the vectors,
    never into the model: its parameters are frozen (``requires_grad=False``) only while a steered
    call runs and restored as they were when it ends (also on an exception), so the user's model is
    left as it was found. Steering applies only in the
    thread that runs the call: another thread using the same model meanwhile sees it unsteered. The wrapped model is not registered as a submodule: ``steered.parameters()`` are the
    vectors only, so an optimiser over them holds no state for the model.

    Args:
        model: a ``HookedTransformer`` (or anything with the same hook API).
        hooks: hook names, e.g. ``["blocks.1.hook_resid_pre"]``. Each vector takes its hook's shape
            after ``[batch, pos]``: ``[d_model]`` on the residual stream (resid_pre/mid/post,
            attn_out, mlp_out), ``[n_heads, d_head]`` at ``attn.hook_z`` (a per-head vector),
            ``[d_mlp]`` at ``mlp.hook_post`` (see :class:`~steer_lens.hook_sites.HookSite`).
        scale: multiplier on every vector (finite float).
        positions: ``"all"``, ``"prompt"``, ``"generated"``, or a boolean mask ``[pos]`` /
            ``[batch, pos]`` (see the module docstring).
        init: ``"zeros"``, ``"random"`` (with ``init_norm``), a tensor of the hook's shape or a dict
            hook -> tensor; for the CAA vector pass ``difference_of_means(...)``.
        init_norm: norm of a random init (residual-stream units).
        vectors: a ready :class:`SteeringVectors` (or subclass) instead of ``init``.
        seed: seed of a random init.

    Raises:
        HookNameError: a hook is not in the model (closest names suggested), never fires for this
            model, or is an attention-pattern hook.
        ConfigError: bad ``scale``, ``positions`` or ``init``.
        ShapeMismatchError, NonFiniteError: a bad init tensor.

    Example:
        >>> steered = SteeredTransformer(model, hooks=["blocks.1.hook_resid_pre"])
        >>> logits = steered(tokens)              # vectors on
        >>> with steered.disabled():
        ...     base = steered(tokens)            # the same call, vectors off
        >>> with steered.gradients():             # record the graph into the vectors
        ...     steered(tokens).logsumexp(-1).sum().backward()
    """

    def __init__(
        self,
        model,
        hooks: Sequence[str] | str,
        *,
        scale: float = 1.0,
        positions: PositionSpec = "all",
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        init_norm: float | None = None,
        vectors: SteeringVectors | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        hooks = _settings.check_hooks(hooks)
        d_model = int(model.cfg.d_model)
        shapes = vector_shapes(model, hooks)
        _settings.check_scale(scale)
        positions = _settings.check_positions(positions)
        vectors = _settings.checked_vectors(vectors, hooks, d_model, shapes, init=init, init_norm=init_norm, seed=seed)
        object.__setattr__(self, "model", model)  # not a submodule: parameters() = vectors only
        self.vectors = vectors.to(device_of(model))
        self._scale = float(scale)
        self._positions = positions
        self._enabled = True
        self._grad = False  # see gradients()
        self._active: frozenset[str] | None = None  # see only_hooks
        self._ctx = PositionContext()
        self.training_config: dict[str, Any] | None = None

    # -- properties -----------------------------------------------------------------------------
    @property
    def hook_names(self) -> tuple[str, ...]:
        """The hook points that carry a vector."""
        return tuple(self.vectors.hook_names)

    @property
    def scale(self) -> float:
        """Multiplier applied to every vector (settable; must be finite)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        _settings.check_scale(value)
        self._scale = float(value)

    @property
    def positions(self) -> PositionSpec:
        """Which positions are steered (settable): ``"all"``, ``"prompt"``, ``"generated"`` or a mask."""
        return self._positions

    @positions.setter
    def positions(self, value: PositionSpec) -> None:
        self._positions = _settings.check_positions(value)

    @property
    def cfg(self):
        """The wrapped model's config (``d_model``, ``n_layers``, ``n_ctx`` ...)."""
        return self.model.cfg

    @property
    def info(self) -> ModelInfo:
        """Name, architecture and weight processing of the wrapped model."""
        return model_info(self.model)

    @property
    def device(self) -> torch.device:
        """Device of the wrapped model."""
        return device_of(self.model)

    @property
    def enabled(self) -> bool:
        """Whether calls add the vectors (see :meth:`disabled`)."""
        return self._enabled

    @property
    def records_gradients(self) -> bool:
        """Whether calls record the autograd graph into the vectors now (inside :meth:`gradients`)."""
        return self._grad

    # -- hooks ----------------------------------------------------------------------------------
    def _hook_fn(self, hook_name: str):
        owner = threading.get_ident()  # steering is confined to the thread that made the hooks

        def hook(act: Tensor, hook) -> Tensor:
            if acting_thread() != owner:  # (acting_for: the backward recomputation of recompute.py)
                return act
            vectors = self.vectors
            # kinds that select by the pass's tokens; looked up on the class (a missing attribute on an
            # nn.Module instance costs ~5 us per call, through Module.__getattr__'s AttributeError)
            by_token = hasattr(type(vectors), "delta_in")
            grad = self._grad or act.requires_grad
            # no graph to keep out when grad mode is already off (decoding loops): skip the no_grad context
            with contextlib.nullcontext() if grad or not torch.is_grad_enabled() else torch.no_grad():
                delta = vectors.delta_in(hook_name, act, self._ctx) if by_token else vectors.delta(hook_name, act)
            if not grad:  # inference: the vectors are constants, so no graph is recorded (see gradients())
                delta = delta.detach()  # (the plain kind returns the parameter itself)
            delta = delta.to(act.device)  # no-op on one device; a block on another GPU (n_devices > 1)
            if self._scale != 1.0:
                delta = delta * self._scale
            mask = self._ctx.mask(self._positions, act.shape[0], act.shape[1], act.device)
            if mask is not None:
                delta = delta * mask.view(*mask.shape, *([1] * (act.ndim - 2)))
            return act + delta.to(act.dtype)

        return hook

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """The ``(hook_name, fn)`` pairs that add the vectors; for ``model.hooks(fwd_hooks=...)``.

        Prefer the wrapper's own methods, which install and remove these for you; this is for code
        that must compose them with other hooks in one ``model.hooks`` context (wrap it in
        :func:`frozen_parameters` when gradients flow). The hooks act only in the thread that called
        this method.
        """
        if not self._enabled:
            return []
        return [(h, self._hook_fn(h)) for h in self.hook_names if self._active is None or h in self._active]

    @contextlib.contextmanager
    def steering(self, *, offset: int = 0, prompt_end: Tensor | None = None,
                 tokens: Tensor | None = None) -> Iterator[SteeredTransformer]:
        """Context manager: the vectors are on for direct calls of ``steered.model`` inside it.

        For code that drives the model itself (a decoding loop, a patching sweep): the hooks are
        installed through the model's own ``hooks()`` context, which removes them on exit, also on
        an exception. Inside it, :meth:`set_offset` tells the hooks where the next pass starts.

        Args:
            offset: absolute position of the first input token of the next pass.
            prompt_end: ``[batch]`` absolute index where each prompt ends (for
                ``positions="prompt"/"generated"``); ``None``: every token is prompt.
            tokens: ``[batch, pos]`` token ids of the next pass, for kinds that select by token.
        """
        prev = self._ctx
        self._ctx = PositionContext(offset=offset, prompt_end=prompt_end, tokens=pass_token_ids(tokens))
        try:
            with frozen_parameters(self.model), self.model.hooks(fwd_hooks=self.fwd_hooks()):
                yield self
        finally:
            self._ctx = prev

    def set_offset(self, offset: int, prompt_end: Tensor | None = None, tokens: Tensor | None = None) -> None:
        """Inside :meth:`steering`: the next pass's first input token is at absolute position ``offset``.

        A decoding loop with a key/value cache calls it before each one-token step, so that masks
        over absolute positions (``positions="generated"``, an explicit mask) stay aligned.
        ``prompt_end`` keeps the current value when ``None``; ``tokens`` are the next pass's token ids
        (for kinds that select by token; ``None``: unknown).
        """
        if prompt_end is None:
            prompt_end = self._ctx.prompt_end
        self._ctx = PositionContext(offset=int(offset), prompt_end=prompt_end, tokens=pass_token_ids(tokens))

    @property
    def position_context(self) -> PositionContext:
        """Where the current pass lies for the steering hooks (set by :meth:`steering` / :meth:`set_offset`).

        Settable, to restore a context read earlier (``recompute_blocks`` replays a forward's context in
        the backward recomputation); a value that is not a ``PositionContext`` raises :class:`ConfigError`.
        """
        return self._ctx

    @position_context.setter
    def position_context(self, ctx: PositionContext) -> None:
        if not isinstance(ctx, PositionContext):
            raise ConfigError(f"position_context: expected a PositionContext, got {type(ctx).__name__}.")
        self._ctx = ctx

    @contextlib.contextmanager
    def only_hooks(self, hooks: Sequence[str]) -> Iterator[SteeredTransformer]:
        """Context manager: only the vectors at ``hooks`` are added inside it (the others add nothing).

        Used by the analyses that switch subsets of vectors on (persistence, pairwise interaction).

        Raises:
            HookNameError: a name in ``hooks`` carries no vector (the vector hooks are listed).
        """
        unknown = [h for h in hooks if h not in self.hook_names]
        if unknown:
            raise HookNameError(
                f"only_hooks: {unknown} carry no vector; the vectors are at {list(self.hook_names)}."
            )
        prev = self._active
        self._active = frozenset(hooks)
        try:
            yield self
        finally:
            self._active = prev

    @contextlib.contextmanager
    def disabled(self) -> Iterator[SteeredTransformer]:
        """Context manager: calls on this wrapper run the base model (no vectors) inside it.

        ``steered.model`` is always the base model too; this is for code that takes a wrapper.
        """
        prev = self._enabled
        self._enabled = False
        try:
            yield self
        finally:
            self._enabled = prev

    @contextlib.contextmanager
    def gradients(self, enabled: bool = True) -> Iterator[SteeredTransformer]:
        """Context manager: calls inside it record the autograd graph into the vectors (for training).

        Outside it a call treats the vectors as constants: with the model's parameters frozen during
        the call, the outputs of ``steered(tokens)``, :meth:`run_with_cache`, :meth:`run_with_hooks`
        and of the analyses do not require grad and hold no graph, as ``model(tokens)`` of a frozen
        TransformerLens model. Inside it torch's grad mode decides (``torch.no_grad()`` still turns
        recording off). The trainers (``sl.train.sft``, ``rl``, ``one_shot``) enter it themselves;
        ``enabled=False`` turns recording off again inside an outer ``gradients()``.

        Example:
            >>> with steered.gradients():
            ...     loss = -steered(tokens).log_softmax(-1)[0, -1, token_id]
            ...     loss.backward()                 # steered.vectors[hook].grad is set
        """
        prev = self._grad
        self._grad = bool(enabled)
        try:
            yield self
        finally:
            self._grad = prev

    @contextlib.contextmanager
    def scaled(self, scale: float) -> Iterator[SteeredTransformer]:
        """Context manager: use ``scale`` for the calls inside it, then restore the previous scale."""
        _settings.check_scale(scale)
        prev = self._scale
        self._scale = float(scale)
        try:
            yield self
        finally:
            self._scale = prev

    # -- calls ----------------------------------------------------------------------------------
    def _prompt_end(self, prompt_lengths, batch: int | None = None) -> Tensor | None:
        if prompt_lengths is None:
            return None
        pl = torch.as_tensor(prompt_lengths, device=self.device).reshape(-1)
        return pl

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"] | str | list[str],
        *args: Any,
        prompt_lengths: Int[Tensor, " batch"] | Sequence[int] | None = None,
        grad: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the model with the vectors on; arguments as ``HookedTransformer.forward``.

        Args:
            tokens: token ids ``[batch, pos]`` (or text, tokenized by the model).
            prompt_lengths: per sequence, how many leading tokens are prompt (for
                ``positions="prompt"/"generated"``); default: all tokens are prompt.
            grad: record the autograd graph into the vectors for this call (as inside
                :meth:`gradients`); by default the output does not require grad.
            *args, **kwargs: passed to the model (``return_type``, ``attention_mask`` ...).

        Returns:
            What the model returns: logits ``[batch, pos, d_vocab]`` by default (no graph unless
            ``grad=True`` or inside :meth:`gradients`).

        Raises:
            ConfigError: token ids that are not integers or lie outside ``[0, d_vocab)``.
            SequenceTooLongError: more than ``n_ctx`` positions.
        """
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens)[None]
        if isinstance(tokens, Tensor) and not tokens.is_floating_point():  # (float: residual input)
            check_token_ids(tokens, self.model.cfg)
        with self._grad_call(grad), self.steering(prompt_end=self._prompt_end(prompt_lengths), tokens=tokens), \
                self._training_weights():
            return self.model(tokens, *args, **kwargs)

    def _training_weights(self) -> contextlib.AbstractContextManager:
        """:func:`shared_weights` for a call that records gradients (no weight copies kept for the backward)."""
        return shared_weights(self.model) if self._grad and torch.is_grad_enabled() else contextlib.nullcontext()

    def _grad_call(self, grad: bool) -> contextlib.AbstractContextManager:
        if not isinstance(grad, bool):
            raise ConfigError(f"grad: expected True or False, got {grad!r}.")
        return self.gradients() if grad else contextlib.nullcontext()

    def run_with_cache(
        self, *args: Any, prompt_lengths: Sequence[int] | Tensor | None = None, grad: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``model.run_with_cache`` with the vectors on: the cache holds steered activations.

        At a steered hook the cached value already includes the vector. The output records no graph
        unless ``grad=True`` or inside :meth:`gradients` (the cache is detached, as TransformerLens
        keeps it).

        Returns:
            ``(output, ActivationCache)`` as TransformerLens returns them.
        """
        with self._grad_call(grad), self.steering(prompt_end=self._prompt_end(prompt_lengths),
                                                  tokens=args[0] if args else kwargs.get("input")):
            return self.model.run_with_cache(*args, **kwargs)

    def run_with_hooks(
        self, *args: Any, prompt_lengths: Sequence[int] | Tensor | None = None, grad: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``model.run_with_hooks`` with the vectors on (user hooks at a steered hook see it steered).

        No graph into the vectors unless ``grad=True`` or inside :meth:`gradients`; a user hook that
        makes a leaf requiring grad gets its gradient as with the bare model.
        """
        with self._grad_call(grad), self.steering(prompt_end=self._prompt_end(prompt_lengths),
                                                  tokens=args[0] if args else kwargs.get("input")):
            return self.model.run_with_hooks(*args, **kwargs)

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
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
        use_kv_cache: bool = True,
    ) -> Generation:
        """Sample continuations with the vectors on (batched, left-padded, KV cache).

        Prompts of different lengths are left-padded and masked; each sequence stops at its own EOS
        (later positions hold the pad id and are masked). ``positions`` is honoured while decoding:
        the hook knows each step's absolute position. Every step unembeds the last position only
        (the prompt's too, as ``generate``'s ``logits_to_keep=1``; not with a vector at the final norm or
        the unembedding): no ``[batch, prompt, d_vocab]`` logits are allocated
        (:func:`steer_lens.generation.last_position_logits`). A prompt given several times (RL's
        groups of samples) is prefilled once and its key/value cache rows copied
        (:func:`steer_lens.generation.distinct_prompts`); its rows still sample independently.

        Args:
            prompts: one text, a list of texts, or token ids ``[batch, pos]`` (no padding); a
                conversation (a list of ``{"role", "content"}`` dicts) or a list of them is rendered
                with the tokenizer's chat template (:meth:`chat_tokens`).
            max_new_tokens: tokens to generate per sequence.
            messages: a conversation or a list of conversations, instead of ``prompts``
                (``steered.sample(messages=[{"role": "user", "content": "What is 2 + 3?"}])``).
            temperature: softmax temperature (> 0) when sampling.
            top_p: nucleus sampling mass in (0, 1].
            top_k: keep only the k most likely tokens (``None``: all).
            do_sample: ``False`` for greedy decoding.
            seed: seed of a private ``torch.Generator`` (same seed, same samples on the same device).
            stop_at_eos: stop each sequence at the tokenizer's EOS.
            use_kv_cache: reuse keys/values (HookedTransformer); ``False`` recomputes every step.

        Returns:
            A :class:`Generation`.

        Raises:
            EmptyInputError: no prompts.
            SequenceTooLongError: prompt plus ``max_new_tokens`` exceeds ``n_ctx``.
            ConfigError: bad sampling parameters; both or neither of ``prompts`` and ``messages``;
                a conversation for a model without a chat template.
        """
        tokens, attn, texts = self._prompt_batch(one_of(prompts, messages))
        return sample_tokens(
            self, tokens, attn, texts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            do_sample=do_sample, seed=seed, stop_at_eos=stop_at_eos, use_kv_cache=use_kv_cache,
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt] | Int[Tensor, "batch pos"] | None = None,
        max_new_tokens: int = 40,
        *,
        messages: Conversation | Sequence[Conversation] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | Int[Tensor, "batch seq"]:
        """Generate text with the vectors on.

        Like TransformerLens's ``generate``: a string gives a string (prompt + continuation), a list
        gives a list, token ids give token ids ``[batch, pos + new]``. A conversation
        (``messages=[{"role": "user", "content": ...}]``, or one passed as ``prompts``) gives the
        assistant's reply only, as chat pipelines do; a list of conversations a list of replies.
        Keyword arguments as :meth:`sample` (``temperature``, ``top_p``, ``top_k``, ``do_sample``,
        ``seed`` ...).
        Use ``with steered.disabled():`` for the unsteered continuation.

        Raises:
            As :meth:`sample`.
        """
        prompts = one_of(prompts, messages)
        out = self.sample(prompts, max_new_tokens, **kwargs)
        if isinstance(prompts, Tensor) or out.completions is None:
            return out.tokens
        if is_conversation(prompts):
            return out.completions[0]
        if not isinstance(prompts, str) and all(is_conversation(p) for p in prompts):
            return list(out.completions)
        texts = out.texts() or []
        return texts[0] if isinstance(prompts, str) else texts

    # -- save / load ------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The JSON config written next to the tensors by :meth:`save`."""
        return folder_config(self)

    def save(self, path: str | Path) -> Path:
        """Save the vectors to a folder: ``vectors.safetensors`` and ``config.json``.

        The folder is written as a whole (:func:`~steer_lens.vectors.io.atomic_folder`): into a
        sibling folder swapped in when complete, so an interrupted save leaves the old folder (or
        none), never new tensors beside an old config. The config records the model name,
        architecture, d_model, dtype, weight processing, hook names, positions, scale, training config
        and library version (:mod:`steer_lens.vector_folder`).

        Returns:
            The folder's path.
        """
        return write_folder(self, path)

    @classmethod
    def load(
        cls, path: str | Path, model, *, allow_other_model: bool = False
    ) -> SteeredTransformer:
        """Load vectors saved by :meth:`save` onto ``model``.

        Args:
            path: the folder written by :meth:`save`.
            model: the model to steer.
            allow_other_model: accept a model with another name (same d_model and processing), e.g.
                to study how a vector transfers; a warning is logged.

        Raises:
            IncompatibleVectorError: d_model, model name or weight processing differ (the message
                names both sides), or the folder is not a steer_lens vector folder or is damaged.
            NonFiniteError: the saved vectors hold NaN or inf.
            FileNotFoundError: the folder or one of its files does not exist.
        """
        saved = read_folder(path, model, allow_other_model=allow_other_model)
        steered = cls(model, saved.hook_names, scale=saved.scale, positions=saved.positions, vectors=saved.vectors)
        steered.training_config = saved.training
        return steered

    def __repr__(self) -> str:
        """A short summary: model, kind, scale, positions, and per hook the vector's shape and norm."""
        return _settings.summary_repr(self)

    def _repr_html_(self) -> str:
        """Jupyter view: the summary line and a table of hooks, vector shapes and norms."""
        return _settings.summary_html(self)
