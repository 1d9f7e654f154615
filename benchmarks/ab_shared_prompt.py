"""A/B of the RL policy log-probs: each distinct prompt run once vs every row's whole sequence (issue 19, P5).

RL samples ``group_size`` completions of each prompt, and the update scores them all: the full forward
runs every row's prompt again. ``completion_logprobs(share_prompts=True)`` (the default,
``steer_lens.train.scored.shared_prompt_logits``) runs each distinct prompt once into a key/value cache
and the completions on it. Real SmolLM2-135M-Instruct, vectors at all 30 ``hook_mlp_out`` (the Sinii
recipe, small random values), notebook 09's few-shot arithmetic chat prompts (about 75 tokens,
left-padded), ``--prompts`` prompts x ``--group`` samples with random completion tokens of ``--new``
tokens (the same completions on both paths). Timed, interleaved, median of ``--repeats``: the update's
forward + backward (with grad) and the no-grad reference forward of the KL metric. The reference is the
same call with ``share_prompts=False`` (the full forward, the path before).

    cd benchmarks && HF_HUB_CACHE=../../shared/models/hub HF_HUB_OFFLINE=1 python ab_shared_prompt.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _report import add_args, header, write_json
from bench_rl_step import SHOTS, SMOL, SMOL_FILE

import steer_lens as sl
from steer_lens import recipes
from steer_lens.train.rl import completion_logprobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (the paper: 16)")
    ap.add_argument("--new", type=int, default=16, help="completion tokens per row")
    add_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = header("ab_shared_prompt", "completion_logprobs(share_prompts=False): every row's prompt run again",
                  "cpu")
    model = sl.load_model(SMOL, gguf_file=SMOL_FILE, device="cpu")
    steered = recipes.sinii2025(model).steered(model)
    for v in steered.vectors.parameters():
        torch.nn.init.normal_(v, std=0.01)
    convs = [[*SHOTS, {"role": "user", "content": f"What is {a} + {b}?"}] for a, b in
             [(7, 8), (12, 30), (5, 5), (101, 99), (3, 14), (42, 17), (9, 1), (250, 250)]][: args.prompts]
    ptoks, pmask = steered.left_pad([steered.prompt_tokens(c) for c in convs])
    ptoks, pmask = ptoks.repeat_interleave(args.group, 0), pmask.repeat_interleave(args.group, 0)
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(3, int(model.cfg.d_vocab), (ptoks.shape[0], args.new), generator=g)
    tokens, mask = torch.cat([ptoks, comp], 1), torch.cat([pmask, torch.ones_like(comp)], 1)
    plen = ptoks.shape[1]

    def update(share: bool):
        t = time.perf_counter()
        logp, _ = completion_logprobs(steered, tokens, mask, plen, entropy_grad=False, share_prompts=share)
        logp.sum().backward()
        grads = [v.grad.clone() for v in steered.vectors.parameters()]
        steered.vectors.zero_grad(set_to_none=True)
        return time.perf_counter() - t, logp.detach(), grads

    @torch.no_grad()
    def reference(share: bool):
        t = time.perf_counter()
        with steered.disabled():
            completion_logprobs(steered, tokens, mask, plen, with_entropy=False, share_prompts=share)
        return time.perf_counter() - t, None, None

    a, b = update(True), update(False)  # warm-up, and the two paths' values
    diff = float((a[1] - b[1]).abs().max())
    gdiff = max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a[2], b[2], strict=True))
    figures: dict = {"rows": int(tokens.shape[0]), "prompt_len": plen, "new": args.new,
                     "max_abs_logp_diff": diff, "max_rel_grad_diff": gdiff}
    for name, fn in (("update", update), ("reference", reference)):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for share in (True, False):
                times[share].append(fn(share)[0])
        fast, slow = statistics.median(times[True]), statistics.median(times[False])
        figures[name] = {"shared_s": fast, "full_s": slow, "ratio": fast / slow,
                         "runs": {"shared": times[True], "full": times[False]}}
        print(f"{name:9s} ({tokens.shape[0]} rows = {args.prompts} prompts x {args.group}, prompt {plen} + {args.new}): "
              f"shared prompts {fast:.2f} s, full forward {slow:.2f} s: ratio {fast / slow:.3f}", flush=True)
    print(f"max |logp diff| {diff:.1e}, max relative gradient diff {gdiff:.1e}")
    write_json(args.json, head, figures, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
