"""Rewards for reinforcement learning of steering vectors: typed callables on decoded text.

A reward is any callable ``(prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]``
(the :class:`Reward` protocol): one real number per completion, larger is better. The built-ins are
small frozen dataclasses, so they print, compare and record themselves in a saved vector's config:

* :func:`contains` - 1 when the completion contains a word (word boundaries on decoded text);
* :func:`regex` - 1 when a regular expression matches;
* :func:`exact_answer` - 1 when the last ``\\boxed{...}`` answer equals the reference answer (the
  verifiable reward of math RL, as in "Small Vectors, Big Effects", Sinii et al. 2025, and
  DeepSeekMath's GRPO);
* :func:`math_answer` - +1 / -1 (or 1 / 0) when the last ``\\boxed{...}`` answer is mathematically
  equal to the reference, checked by the ``math-verify`` package (``\\frac{1}{2}`` equals ``0.5``),
  the reward of "Small Vectors, Big Effects" (Sinii et al. 2025);
* :func:`length_penalty` - minus a cost per word beyond a budget;
* :func:`combine` - a weighted sum of rewards.

Words are matched on *decoded text* because tokenizers attach spaces differently (in TinyStories'
tokenizer " dog" is not one token): a token-level reward would miss most occurrences.

:func:`score` runs a reward and checks what it returns; a reward that raises, returns the wrong shape
or a NaN/inf becomes a :class:`~steer_lens.errors.RewardError` that names the reward and the
offending completion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens.errors import ConfigError, RewardError

__all__ = [
    "Reward",
    "Contains",
    "Regex",
    "ExactAnswer",
    "MathAnswer",
    "LengthPenalty",
    "Combined",
    "contains",
    "regex",
    "exact_answer",
    "math_answer",
    "length_penalty",
    "combine",
    "extract_boxed",
    "reward_name",
    "score",
    "from_spec",
]


@runtime_checkable
class Reward(Protocol):
    """A reward: one number per completion (larger is better), as a float tensor ``[batch]``.

    ``prompts[i]`` is the prompt that ``completions[i]`` continues (prompts repeat within an RL
    group). Completions are decoded text without the EOS token.
    """

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]: ...


def _as_tensor(values: Sequence[float | int]) -> Float[Tensor, " batch"]:
    return torch.tensor(list(values), dtype=torch.float32)


@dataclass(frozen=True, kw_only=True)
class Contains:
    """1.0 when the completion contains ``word`` as a whole word, else 0.0 (see :func:`contains`)."""

    word: str
    case_sensitive: bool = False
    count: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.word, str) or not self.word.strip():
            raise ConfigError(f"contains: expected a non-empty word, got {self.word!r}.")

    @property
    def pattern(self) -> re.Pattern[str]:
        """The compiled pattern: the escaped word between non-word look-arounds."""
        flags = 0 if self.case_sensitive else re.IGNORECASE
        return re.compile(rf"(?<!\w){re.escape(self.word)}(?!\w)", flags)

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]:
        pat = self.pattern
        if self.count:
            return _as_tensor([len(pat.findall(c)) for c in completions])
        return _as_tensor([1.0 if pat.search(c) else 0.0 for c in completions])


def contains(word: str, *, case_sensitive: bool = False, count: bool = False) -> Contains:
    """Reward 1.0 for completions that contain ``word`` as a whole word (0.0 otherwise).

    Matching is on decoded text with word boundaries: ``contains("dog")`` matches "a dog." and
    "Dog!" but not "dogs" or "hotdog". With ``count=True`` the reward is the number of occurrences.

    Args:
        word: the word (or phrase) to look for; regex characters are taken literally.
        case_sensitive: match case exactly (default: case-insensitive).
        count: reward the number of occurrences instead of 0/1.

    Raises:
        ConfigError: empty ``word``.
    """
    return Contains(word=word, case_sensitive=case_sensitive, count=count)


@dataclass(frozen=True, kw_only=True)
class Regex:
    """1.0 when ``re.search(pattern, completion)`` matches, else 0.0 (see :func:`regex`)."""

    pattern: str
    flags: int = 0

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern, self.flags)
        except (re.error, TypeError) as e:
            raise ConfigError(f"regex: {self.pattern!r} is not a valid regular expression ({e}).") from e

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]:
        pat = re.compile(self.pattern, self.flags)
        return _as_tensor([1.0 if pat.search(c) else 0.0 for c in completions])


def regex(pattern: str, flags: int = 0) -> Regex:
    """Reward 1.0 for completions in which the regular expression ``pattern`` matches (``re.search``).

    Raises:
        ConfigError: the pattern does not compile.
    """
    return Regex(pattern=pattern, flags=flags)


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces balanced), or ``None``.

    ``extract_boxed(r"so \\boxed{\\frac{1}{2}}.")`` is ``"\\frac{1}{2}"``. An unclosed box gives
    ``None``.
    """
    key = "\\boxed{"
    start = text.rfind(key)
    while start != -1:
        i = start + len(key)
        depth = 1
        j = i
        while j < len(text):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
            j += 1
        start = text.rfind(key, 0, start)  # unclosed: try an earlier box
    return None


def _normalise_answer(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = s.rstrip(".").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "")
    s = s.replace("\\right", "").replace("\\!", "").replace(",", "") if re.fullmatch(r"[\d,.\-]+", s) else s
    return s


def _same_answer(a: str, b: str) -> bool:
    na, nb = _normalise_answer(a), _normalise_answer(b)
    if na == nb:
        return True
    try:
        fa, fb = float(na), float(nb)
    except ValueError:
        return False
    return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-9)


@dataclass(frozen=True, kw_only=True)
class ExactAnswer:
    """1.0 when the completion's last ``\\boxed{}`` answer equals the reference (see :func:`exact_answer`)."""

    answers: str | tuple[tuple[str, str], ...]

    def answer_for(self, prompt: str) -> str:
        """The reference answer of ``prompt``.

        Raises:
            RewardError: a per-prompt table has no answer for this prompt.
        """
        if isinstance(self.answers, str):
            return self.answers
        table = dict(self.answers)
        if prompt not in table:
            raise RewardError(
                f"exact_answer has no reference answer for prompt {prompt[:80]!r}; its table has "
                f"{len(table)} prompts. Fix: add the prompt to the answers mapping."
            )
        return table[prompt]

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]:
        out = []
        for p, c in zip(prompts, completions, strict=True):
            got = extract_boxed(c)
            out.append(1.0 if got is not None and _same_answer(got, self.answer_for(p)) else 0.0)
        return _as_tensor(out)


def exact_answer(answers: str | Mapping[str, str]) -> ExactAnswer:
    """Reward 1.0 when the last ``\\boxed{...}`` of a completion equals the reference answer.

    The boxed content is read with balanced braces (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``);
    answers are compared after stripping spaces, ``$`` and a final period, and numerically when both
    parse as numbers (``"0.50"`` equals ``".5"``). A completion without a box gets 0.0. This is the
    verifiable reward of math RL (DeepSeekMath's GRPO; Sinii et al. 2025).

    Args:
        answers: one answer for every prompt, or a mapping prompt -> answer.

    Raises:
        ConfigError: ``answers`` is neither a string nor a mapping of strings.
    """
    if isinstance(answers, str):
        return ExactAnswer(answers=answers)
    if isinstance(answers, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in answers.items()
    ):
        return ExactAnswer(answers=tuple(answers.items()))
    raise ConfigError(
        f"exact_answer: expected a string or a mapping prompt -> answer string, got {type(answers).__name__}."
    )


@dataclass(frozen=True, kw_only=True)
class MathAnswer(ExactAnswer):
    """``correct`` when the last ``\\boxed{}`` answer is mathematically equal to the reference, else
    ``wrong`` (see :func:`math_answer`)."""

    correct: float = 1.0
    wrong: float = -1.0

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]:
        from math_verify import parse, verify

        out = []
        for p, c in zip(prompts, completions, strict=True):
            got = extract_boxed(c)
            ref = self.answer_for(p)
            gold = parse(ref if "$" in ref or "\\boxed" in ref else f"${ref}$")  # a bare "x+1" parses as math
            ok = got is not None and bool(verify(gold, parse("\\boxed{" + got + "}")))
            out.append(self.correct if ok else self.wrong)
        return _as_tensor(out)


def math_answer(answers: str | Mapping[str, str], *, signed: bool = True) -> MathAnswer:
    """Reward a completion whose last ``\\boxed{...}`` answer equals the reference, by ``math-verify``.

    The answer is the content of the *last* ``\\boxed{}`` (balanced braces, :func:`extract_boxed`),
    as the papers extract it; it and the reference are parsed and compared by the ``math-verify``
    package (Hugging Face), so ``\\frac{1}{2}``, ``\\frac12`` and ``0.5`` are equal and ``43`` is
    not ``42``. A completion without a box is wrong. Called like :func:`exact_answer`.

    Args:
        answers: one reference answer for every prompt, or a mapping prompt -> answer (for
            conversation prompts: keyed by the last user message).
        signed: ``+1`` / ``-1`` (Sinii et al. 2025's reward, the default) or ``1`` / ``0``.

    Raises:
        ConfigError: ``answers`` is neither a string nor a mapping of strings.
        MissingDependencyError: the ``math-verify`` package is not installed.
    """
    try:
        import math_verify  # noqa: F401
    except ImportError as e:
        from steer_lens.errors import MissingDependencyError

        raise MissingDependencyError(
            "math_answer needs the `math-verify` package. Fix: pip install math-verify (or steer-lens, "
            "which depends on it)."
        ) from e
    table = exact_answer(answers).answers
    return MathAnswer(answers=table, correct=1.0, wrong=-1.0 if signed else 0.0)


@dataclass(frozen=True, kw_only=True)
class LengthPenalty:
    """``-per_word * max(0, n_words - max_words)`` (see :func:`length_penalty`)."""

    max_words: int
    per_word: float = 0.1

    def __post_init__(self) -> None:
        if self.max_words < 0 or not math.isfinite(self.per_word) or self.per_word < 0:
            raise ConfigError(
                f"length_penalty: expected max_words >= 0 and a finite per_word >= 0, got "
                f"max_words={self.max_words}, per_word={self.per_word}."
            )

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]:
        return _as_tensor([-self.per_word * max(0, len(c.split()) - self.max_words) for c in completions])


def length_penalty(max_words: int, *, per_word: float = 0.1) -> LengthPenalty:
    """Reward ``-per_word`` for each whitespace-separated word beyond ``max_words`` (0 within it).

    Raises:
        ConfigError: negative ``max_words`` or ``per_word``.
    """
    return LengthPenalty(max_words=max_words, per_word=per_word)


@dataclass(frozen=True, kw_only=True)
class Combined:
    """A weighted sum of rewards (see :func:`combine`)."""

    parts: tuple[tuple[Callable[..., Tensor], float], ...]

    def __call__(self, prompts: list[str], completions: list[str]) -> Float[Tensor, " batch"]:
        total = torch.zeros(len(completions))
        for reward, weight in self.parts:
            total = total + weight * score(reward, prompts, completions)
        return total


def combine(
    weights: Mapping[Callable[..., Tensor], float] | Sequence[tuple[Callable[..., Tensor], float]],
) -> Combined:
    """A weighted sum of rewards: ``sum_k w_k * r_k(prompts, completions)``.

    Each part is checked on its own (:func:`score`), so an error names the part that failed.

    Args:
        weights: mapping reward -> weight, or a list of ``(reward, weight)`` pairs.

    Raises:
        ConfigError: no parts, a part that is not callable, or a non-finite weight.

    Example:
        >>> r = combine({contains("dog"): 1.0, length_penalty(30): 0.5})
    """
    parts = tuple(weights.items()) if isinstance(weights, Mapping) else tuple(weights)
    if not parts:
        raise ConfigError("combine: expected at least one (reward, weight) pair, got none.")
    for item in parts:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ConfigError(f"combine: expected (reward, weight) pairs, got {item!r}.")
        reward, weight = item
        if not callable(reward):
            raise ConfigError(f"combine: {reward!r} is not callable; a reward is f(prompts, completions).")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(
                f"combine: the weight of {reward_name(reward)} must be a finite number, got {weight!r}."
            )
    return Combined(parts=tuple((r, float(w)) for r, w in parts))


def reward_name(reward: Callable[..., object]) -> str:
    """A readable name for a reward: its repr for the built-ins, else its qualified name."""
    if isinstance(reward, Contains | Regex | ExactAnswer | LengthPenalty | Combined):
        return repr(reward)
    name = getattr(reward, "__qualname__", None) or getattr(reward, "__name__", None)
    return name or repr(reward)


def _shorten(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "..."


def score(
    reward: Callable[..., object], prompts: Sequence[str], completions: Sequence[str]
) -> Float[Tensor, " batch"]:
    """Run ``reward`` on a batch and check its output: a finite float tensor ``[batch]`` on the CPU.

    Sequences of numbers (lists, numpy arrays) are accepted and converted.

    Raises:
        RewardError: the reward raised (the message names the first completion on which it raises
            alone), returned something that is not ``[batch]`` numbers, or returned NaN/inf (the
            message names the offending completion).
    """
    prompts, completions = list(prompts), list(completions)
    name = reward_name(reward)
    try:
        out = reward(prompts, completions)
    except RewardError:
        raise
    except Exception as e:
        culprit = None
        for i in range(len(completions)):  # find a completion on which it fails on its own
            try:
                reward([prompts[i]], [completions[i]])
            except Exception:
                culprit = i
                break
        where = (
            f" It raises on completion {culprit}: {_shorten(completions[culprit])!r} "
            f"(prompt {_shorten(prompts[culprit], 60)!r})."
            if culprit is not None
            else ""
        )
        raise RewardError(
            f"reward {name} raised {type(e).__name__}: {e}.{where} Fix the reward so that it returns a "
            "number for every completion."
        ) from e
    try:
        values = out if isinstance(out, Tensor) else torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(
            f"reward {name} returned {type(out).__name__}; expected a float tensor [batch]="
            f"[{len(completions)}] (one number per completion)."
        ) from e
    first = _shorten(completions[0]) if completions else ""
    if values.shape != (len(completions),):
        raise RewardError(
            f"reward {name} returned shape {list(values.shape)}; expected [batch]=[{len(completions)}] "
            f"(one number per completion; first completion: {first!r})."
        )
    if values.is_complex() or not (values.is_floating_point() or values.dtype in _REAL_INT):
        raise RewardError(f"reward {name} returned dtype {values.dtype}; expected real numbers.")
    values = values.detach().to("cpu", torch.float32)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RewardError(
            f"reward {name} returned {float(values[i])} for completion {i}: {_shorten(completions[i])!r} "
            f"(prompt {_shorten(prompts[i], 60)!r}); expected finite numbers."
        )
    return values


_REAL_INT = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def from_spec(spec: str) -> Reward:
    """Parse a command-line reward: ``contains:WORD``, ``regex:PATTERN``, ``boxed:ANSWER``, ``math:ANSWER``.

    Raises:
        ConfigError: unknown reward kind or missing argument.
    """
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ConfigError(
            f"reward: expected KIND:ARG (contains:dog, regex:PATTERN, boxed:ANSWER), got {spec!r}."
        )
    if kind == "contains":
        return contains(arg)
    if kind == "regex":
        return regex(arg)
    if kind in ("boxed", "exact_answer"):
        return exact_answer(arg)
    if kind == "math":
        return math_answer(arg)
    raise ConfigError(f"reward: unknown kind {kind!r} in {spec!r}; expected contains, regex, boxed or math.")
