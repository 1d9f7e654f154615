"""Prompts as users write them: plain texts, or conversations rendered by the model's own chat template.

A conversation is ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``. It is rendered
by ``tokenizer.apply_chat_template`` exactly (the template writes its own special tokens, so no BOS is
prepended on top: TransformerLens's ``to_tokens`` would add a second ``<|im_start|>`` on ChatML
models such as SmolLM2).
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens._utils import Conversation, is_conversation
from steer_lens.errors import ConfigError

__all__ = ["chat_text", "chat_tokens", "one_of"]


def _chat_tokenizer(model, messages):
    tok = getattr(model, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        raise ConfigError(
            "messages: this model's tokenizer has no chat template, so a conversation cannot be "
            "rendered. Fix: pass plain text prompts, or load a chat model (its tokenizer carries the "
            "template)."
        )
    if not is_conversation(messages):
        raise ConfigError(
            'messages: expected a list of {"role": ..., "content": ...} dicts, got '
            f"{type(messages).__name__}."
        )
    return tok


def chat_text(model, messages: Conversation, *, add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the model's chat template (``tokenize=False``).

    Args:
        model: a model with a ``tokenizer`` that has a chat template.
        messages: the conversation.
        add_generation_prompt: end with the template's assistant header, ready for the reply.

    Raises:
        ConfigError: no tokenizer or no chat template, or ``messages`` is not a conversation.
    """
    tok = _chat_tokenizer(model, messages)
    return tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)


def chat_tokens(model, messages: Conversation, *, add_generation_prompt: bool = True) -> Int[Tensor, " pos"]:
    """Token ids ``[pos]`` (CPU) of the conversation: ``apply_chat_template(..., tokenize=True)`` exactly.

    Raises:
        As :func:`chat_text`.
    """
    tok = _chat_tokenizer(model, messages)
    ids = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    if not isinstance(ids, list):  # a BatchEncoding in transformers >= 5
        ids = ids["input_ids"]
    return torch.tensor(list(ids), dtype=torch.long)


def one_of(prompts, messages):
    """``prompts`` or ``messages``, whichever was given.

    Raises:
        ConfigError: both or neither were given.
    """
    if (prompts is None) == (messages is None):
        raise ConfigError(
            "give exactly one of prompts= (texts or token ids) and messages= (a conversation or a list "
            f"of them); got {'both' if prompts is not None else 'neither'}."
        )
    return prompts if messages is None else messages
