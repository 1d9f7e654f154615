"""Tokenization methods of :class:`~steer_lens.SteeredTransformer` (a mixin; split out of ``steering.py``).

Padding and EOS ids, texts and chat conversations to token ids, and left padding of prompt batches;
they read only ``self.model`` (its tokenizer) and ``self.device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens._utils import Conversation, Prompt, is_conversation
from steer_lens.errors import ConfigError, EmptyInputError
from steer_lens.prompts import chat_text, chat_tokens

__all__ = ["TokenizationMixin", "pass_token_ids"]


class TokenizationMixin:
    """Tokenization for a wrapper with ``model`` (a HookedTransformer) and ``device`` attributes."""

    @property
    def pad_token_id(self) -> int:
        """Id used for padding (the tokenizer's pad, else EOS, else 0)."""
        tok = getattr(self.model, "tokenizer", None)
        if tok is not None:
            if tok.pad_token_id is not None:
                return int(tok.pad_token_id)
            if tok.eos_token_id is not None:
                return int(tok.eos_token_id)
        return 0

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's EOS id (``None`` without a tokenizer)."""
        tok = getattr(self.model, "tokenizer", None)
        return None if tok is None or tok.eos_token_id is None else int(tok.eos_token_id)

    def to_tokens(self, text: str, *, prepend_bos: bool = True) -> Int[Tensor, " pos"]:
        """Token ids of one text (BOS first when ``prepend_bos``), on the model's device.

        Raises:
            ConfigError: the model has no tokenizer.
        """
        if getattr(self.model, "tokenizer", None) is None:
            raise ConfigError("this model has no tokenizer; pass token ids instead of text.")
        return self.model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0]

    def left_pad(
        self, sequences: Sequence[Tensor]
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Left-pad 1-D token tensors into ``(tokens, attention_mask)``, both ``[batch, max_len]``."""
        n = max(int(s.shape[0]) for s in sequences)
        toks = torch.full((len(sequences), n), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(sequences), n), dtype=torch.long, device=self.device)
        for i, s in enumerate(sequences):
            toks[i, n - s.shape[0] :] = s.to(self.device)
            mask[i, n - s.shape[0] :] = 1
        return toks, mask

    def chat_text(self, messages: Conversation, *, add_generation_prompt: bool = True) -> str:
        """A conversation rendered by the tokenizer's own chat template (:func:`steer_lens.prompts.chat_text`).

        Raises:
            ConfigError: no tokenizer or no chat template, or ``messages`` is not a conversation.
        """
        return chat_text(self.model, messages, add_generation_prompt=add_generation_prompt)

    def chat_tokens(self, messages: Conversation, *, add_generation_prompt: bool = True) -> Int[Tensor, " pos"]:
        """Token ids of a conversation through its chat template, no BOS added on top, on the model's
        device (:func:`steer_lens.prompts.chat_tokens`).

        Raises:
            As :meth:`chat_text`.
        """
        return chat_tokens(self.model, messages, add_generation_prompt=add_generation_prompt).to(self.device)

    def prompt_tokens(self, prompt: Prompt) -> Int[Tensor, " pos"]:
        """Token ids of one prompt: a text (BOS first) or a conversation (:meth:`chat_tokens`)."""
        return self.chat_tokens(prompt) if is_conversation(prompt) else self.to_tokens(prompt)

    def _prompt_batch(self, prompts) -> tuple[Tensor, Tensor, list[str] | None]:
        if isinstance(prompts, str) or is_conversation(prompts):
            prompts = [prompts]
        if isinstance(prompts, Tensor):
            toks = prompts if prompts.ndim == 2 else prompts[None]
            if toks.shape[0] == 0 or toks.shape[1] == 0:
                raise EmptyInputError("prompts: got an empty token tensor; give at least one token.")
            return toks.to(self.device), torch.ones_like(toks, device=self.device), None
        prompts = list(prompts)
        if not prompts:
            raise EmptyInputError("prompts: got an empty list; give at least one prompt.")
        toks, mask = self.left_pad([self.prompt_tokens(p) for p in prompts])
        texts = [self.chat_text(p) if is_conversation(p) else p for p in prompts]
        return toks, mask, texts


def pass_token_ids(tokens: Any) -> Tensor | None:
    """``tokens`` when it is a ``[batch, pos]`` integer tensor (the ids of a pass), else ``None``."""
    if isinstance(tokens, Tensor) and tokens.ndim == 2 and not tokens.is_floating_point():
        return tokens
    return None
