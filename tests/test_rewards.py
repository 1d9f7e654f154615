"""Built-in rewards and the reward checker."""

from __future__ import annotations

import pytest
import torch

from steer_lens.errors import ConfigError, RewardError
from steer_lens.train import rewards as R


def test_contains_word_boundaries_and_case():
    r = R.contains("dog")
    comps = ["a dog.", "Dog!", "dogs run", "hotdog", "the dog dog", "", "DOG-house"]
    torch.testing.assert_close(r(["p"] * 7, comps), torch.tensor([1.0, 1, 0, 0, 1, 0, 1]))
    assert R.contains("dog", case_sensitive=True)(["p"], ["Dog"]).tolist() == [0.0]
    assert R.contains("dog", count=True)(["p"], ["dog, dog and a dog"]).tolist() == [3.0]
    assert R.contains("a+b")(["p"], ["x a+b y"]).tolist() == [1.0]  # taken literally
    with pytest.raises(ConfigError):
        R.contains(" ")


def test_regex():
    r = R.regex(r"\d{3}")
    assert r(["p", "p"], ["call 911", "no"]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError):
        R.regex("(")


def test_extract_boxed_nested():
    assert R.extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert R.extract_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert R.extract_boxed(r"\boxed{3} and \boxed{unclosed") == "3"
    assert R.extract_boxed("none") is None


def test_exact_answer():
    r = R.exact_answer({"q1": "0.5", "q2": r"\frac{1}{2}"})
    comps = [r"it is \boxed{.50}", r"\boxed{ \dfrac{1}{2} }", r"\boxed{0.6}"]
    assert r(["q1", "q2", "q1"], comps).tolist() == [1.0, 1.0, 0.0]
    assert R.exact_answer("42")(["a", "b"], [r"\boxed{42}.", "42"]).tolist() == [1.0, 0.0]
    with pytest.raises(RewardError, match="no reference answer"):
        r(["q3"], [r"\boxed{1}"])
    with pytest.raises((ConfigError, TypeError)):  # TypeError: jaxtyping/beartype at test time
        R.exact_answer(42)


def test_length_penalty_and_combine():
    lp = R.length_penalty(3, per_word=0.5)
    assert lp(["p", "p"], ["a b", "a b c d e"]).tolist() == [0.0, -1.0]
    c = R.combine({R.contains("dog"): 2.0, lp: 1.0})
    assert c(["p", "p"], ["dog", "dog a b c d e"]).tolist() == [2.0, 0.5]
    with pytest.raises(ConfigError):
        R.combine({})
    with pytest.raises(ConfigError):
        R.combine([(R.contains("dog"), float("nan"))])


def test_score_catches_raising_reward_and_names_completion():
    def picky(prompts, completions):
        return torch.tensor([1.0 / (len(c) - 3) for c in completions])  # ZeroDivision on 3 chars

    with pytest.raises(RewardError, match=r"picky.*ZeroDivisionError.*completion 1: 'abc'"):
        R.score(picky, ["p", "p"], ["hello", "abc"])


def test_score_catches_wrong_shape_and_nan():
    with pytest.raises(RewardError, match=r"shape \[2, 1\].*\[batch\]=\[2\]"):
        R.score(lambda p, c: torch.ones(len(c), 1), ["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match=r"nan for completion 1: 'bad one'"):
        R.score(lambda p, c: torch.tensor([1.0, float("nan")]), ["p", "p"], ["ok", "bad one"])
    with pytest.raises(RewardError, match="returned str"):
        R.score(lambda p, c: "high", ["p"], ["a"])
    # inside combine the failing part is named
    with pytest.raises(RewardError, match="inf"):
        R.combine([(lambda p, c: torch.tensor([float("inf")]), 1.0)])(["p"], ["a"])


def test_score_accepts_lists_and_ints():
    assert R.score(lambda p, c: [1, 0], ["p", "p"], ["a", "b"]).dtype == torch.float32
    assert R.score(lambda p, c: [True, False], ["p", "p"], ["a", "b"]).tolist() == [1.0, 0.0]


def test_from_spec():
    assert R.from_spec("contains:dog") == R.contains("dog")
    assert R.from_spec("regex:a.c")(["p"], ["abc"]).tolist() == [1.0]
    assert R.from_spec("boxed:4")(["p"], [r"\boxed{4}"]).tolist() == [1.0]
    with pytest.raises(ConfigError):
        R.from_spec("nope")
    with pytest.raises(ConfigError):
        R.from_spec("unknown:x")


def test_builtin_rewards_satisfy_protocol():
    assert isinstance(R.contains("x"), R.Reward)


@pytest.mark.parametrize("reference, completion, equal", [
    ("0.5", r"so the answer is \boxed{\frac{1}{2}}", True),
    ("0.5", r"\boxed{\frac12}.", True),
    (r"\frac{1}{2}", r"\boxed{0.5}", True),
    ("42", r"27 + 15 = \boxed{42}", True),
    ("42", r"\boxed{43}", False),
    ("42", r"first \boxed{42}, no wait, \boxed{41}", False),  # the LAST box counts
    ("-7", r"\boxed{-7}", True),
    ("12", r"\boxed{12.0}", True),
    ("1/3", r"\boxed{0.333}", False),
    ("42", "42, no box", False),
    ("x+1", r"\boxed{1+x}", True),
])
def test_math_answer_on_equivalent_and_different_answers(reference, completion, equal):
    from steer_lens.train.rewards import math_answer

    signed = math_answer(reference)
    assert float(signed(["q"], [completion])[0]) == (1.0 if equal else -1.0)
    assert float(math_answer(reference, signed=False)(["q"], [completion])[0]) == (1.0 if equal else 0.0)


def test_math_answer_per_prompt_table_and_spec():
    from steer_lens.errors import RewardError
    from steer_lens.train.rewards import from_spec, math_answer

    r = math_answer({"What is 2 + 3?": "5", "What is 1/2 of 1?": "0.5"})
    out = r(["What is 2 + 3?", "What is 1/2 of 1?", "What is 2 + 3?"], [r"\boxed{5}", r"\boxed{1/2}", r"\boxed{6}"])
    assert out.tolist() == [1.0, 1.0, -1.0]
    with pytest.raises(RewardError, match="no reference answer"):
        r(["unknown"], [r"\boxed{5}"])
    assert from_spec("math:0.5")(["q"], [r"\boxed{\frac{1}{2}}"]).tolist() == [1.0]
