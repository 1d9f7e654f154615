"""How a word tokenizes, alone and inside running text, with the advice that follows from it.

Targets of steering ("the next token is *dog*"), word-rate rewards and token-id metrics all depend on
how the tokenizer splits a word, and tokenizers differ in ways that silently break them: some put a
space in front of every text (TinyStories-656K's SentencePiece tokenizer: ``" Tom"`` alone →
``['▁', 'Tom']``, decoded ``['', 'Tom']``), some attach spaces to the *preceding* token (``'She '``,
``'ed it '``: ``" dog"`` is then never a token), some (GPT-2, Llama 3, SmolLM2) put the space in front
(``' dog'``). :func:`word_tokens` shows all three facts for one word and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from steer_lens._utils import token_pieces, unwrap
from steer_lens.errors import ConfigError
from steer_lens.results import Result

__all__ = ["WordTokens", "word_tokens"]

_CONTEXT = "The {} ran."


@dataclass(frozen=True)
class WordTokens(Result):
    """How ``word`` tokenizes.

    Attributes:
        word: the word as given.
        ids, pieces: its token ids and their texts when tokenized alone (no special tokens added).
        in_context_ids, in_context_pieces: the ids and texts of the tokens that overlap the word's
            characters inside ``"The <word> ran."`` (a token ``' dog'`` counts: the space rides along).
        prefix_space: whether the tokenizer puts a space in front of every text (SentencePiece's
            dummy prefix: ``"dog"`` alone → ``'▁'``, ``'dog'`` on TinyStories-656K).
        space_before_next: whether spaces attach to the *preceding* token (``'The '``, then ``'dog'``).
        advice: what follows for targets and rewards, one sentence each.
    """

    word: str
    ids: list[int]
    pieces: list[str]
    in_context_ids: list[int]
    in_context_pieces: list[str]
    prefix_space: bool
    space_before_next: bool
    advice: list[str]

    def _summary(self) -> str:
        return f"<b>WordTokens</b> {self.word!r}: alone {self.pieces}, in text {self.in_context_pieces}"

    def __repr__(self) -> str:
        lines = [f"{self.word!r} alone -> {self.pieces} (ids {self.ids})",
                 f"{self.word!r} in running text -> {self.in_context_pieces} (ids {self.in_context_ids})"]
        return "\n".join(lines + [f"  * {a}" for a in self.advice])


def _span(tokenizer, text: str, start: int, end: int) -> tuple[list[int], list[str]]:
    """The ids and pieces of ``text``'s tokens that overlap the characters ``[start, end)``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    out_ids, out_pieces, pos = [], [], 0
    for i, p in zip(ids, pieces, strict=True):
        if pos < end and pos + len(p) > start and p:
            out_ids.append(i)
            out_pieces.append(p)
        pos += len(p)
    return out_ids, out_pieces


def word_tokens(model, word: str) -> WordTokens:
    """How ``word`` tokenizes alone and in running text, and the advice for targets and rewards.

    Args:
        model: a model (or wrapper) with a Hugging Face tokenizer.
        word: the word, with or without a leading space (e.g. ``" Tom"``).

    Returns:
        A :class:`WordTokens`; its repr prints the pieces and the advice.

    Raises:
        ConfigError: the model has no tokenizer, or ``word`` is empty or not a string.
    """
    tokenizer = getattr(unwrap(model), "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("word_tokens: this model has no tokenizer; its inputs are token ids already.")
    if not isinstance(word, str) or not word.strip():
        raise ConfigError(f"word: expected a non-empty string, got {word!r}.")
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    text = _CONTEXT.format(word.strip())
    start = text.index(word.strip())
    ctx_ids, ctx_pieces = _span(tokenizer, text, start, start + len(word.strip()))
    dog = tokenizer.convert_ids_to_tokens(tokenizer("dog", add_special_tokens=False)["input_ids"][:1])
    prefix_space = bool(dog) and isinstance(dog[0], str) and dog[0].startswith(("▁", "Ġ"))
    the = token_pieces(tokenizer, tokenizer("The dog", add_special_tokens=False)["input_ids"])
    space_before_next = any(p.endswith(" ") for p in the)
    return WordTokens(word=word, ids=ids, pieces=pieces, in_context_ids=ctx_ids, in_context_pieces=ctx_pieces,
                      prefix_space=prefix_space, space_before_next=space_before_next,
                      advice=_advice(word, ctx_ids, ctx_pieces, prefix_space, space_before_next))


def _advice(word, ctx_ids, ctx_pieces, prefix_space, space_before_next) -> list[str]:
    out = []
    if len(ctx_ids) == 1:
        out.append(f"In running text {word.strip()!r} is one token ({ctx_pieces[0]!r}, id {ctx_ids[0]}): "
                   "use that id as a next-token target.")
    else:
        out.append(f"In running text {word.strip()!r} is {len(ctx_ids)} tokens {ctx_pieces}: a next-token "
                   f"target can only be its first token {ctx_pieces[0]!r} (id {ctx_ids[0]}); score whole words "
                   "on decoded text instead.")
    if prefix_space:
        out.append("The tokenizer puts a space in front of every text (SentencePiece's dummy prefix, even with "
                   "add_special_tokens=False): a word tokenized alone starts with a '▁' piece (an empty token "
                   "or another token than in running text), so take target ids from the running-text "
                   "tokenization above, not from the word alone.")
    if space_before_next:
        out.append("Spaces attach to the preceding token ('The ' then the word), so a token with a leading "
                   "space does not exist: count words on decoded text with word boundaries "
                   "(steer_lens.train.rewards.contains), not by token ids.")
    return out
