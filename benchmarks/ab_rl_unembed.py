"""A/B of the RL policy log-probs: the scored positions alone unembedded vs the whole forward (issue 19, P5).

Real SmolLM2-135M-Instruct, vectors at all 30 ``hook_mlp_out`` (small random values), batch 16 x (75 prompt
+ 13 completion) random tokens; forward + backward of ``completion_logprobs``, the two paths interleaved,
median of ``--repeats``. The reference is the same call with ``steer_lens.train.scored.unembeds_apart`` forced off (every
position unembedded, then sliced: the path before the saving).

    cd benchmarks && HF_HUB_CACHE=../../shared/models/hub HF_HUB_OFFLINE=1 python ab_rl_unembed.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _report import add_args, header, write_json
from bench_rl_step import SMOL, SMOL_FILE

import steer_lens as sl
from steer_lens import recipes
from steer_lens.train import scored
from steer_lens.train.rl import loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    add_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = header("ab_rl_unembed", "completion_logprobs with every position unembedded (the earlier path)", "cpu")
    model = sl.load_model(SMOL, gguf_file=SMOL_FILE, device="cpu")
    steered = recipes.sinii2025(model).steered(model)
    for v in steered.vectors.parameters():
        torch.nn.init.normal_(v, std=0.01)
    g = torch.Generator().manual_seed(0)
    prompt_len, new, batch = 75, 13, 16
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, prompt_len + new), generator=g)
    mask = torch.ones_like(tokens)
    saved = scored.unembeds_apart

    def step(apart: bool):
        scored.unembeds_apart = saved if apart else (lambda s: False)
        try:
            t = time.perf_counter()
            logp, ent = loss.completion_logprobs(steered, tokens, mask, prompt_len)
            (logp.sum() + 0 * ent.sum()).backward()
            steered.vectors.zero_grad(set_to_none=True)
            return time.perf_counter() - t, logp.detach()
        finally:
            scored.unembeds_apart = saved

    step(True), step(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for apart in (True, False):
            times[apart].append(step(apart)[0])
    diff = float((step(True)[1] - step(False)[1]).abs().max())
    fast, slow = statistics.median(times[True]), statistics.median(times[False])
    print(f"scored positions only {fast:.2f} s, every position {slow:.2f} s: ratio {fast / slow:.3f}; "
          f"max |logp diff| {diff:.1e}")
    write_json(args.json, head, {"scored_only_s": fast, "all_positions_s": slow, "ratio": fast / slow,
                                 "max_abs_logp_diff": diff, "runs": {str(k): v for k, v in times.items()}}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
