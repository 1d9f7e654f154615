"""A/B of activation recomputation for a vector training step: none vs ``"selective"`` vs ``"full"`` (issue 19, P4).

One forward + loss + backward into the vectors (no optimiser, no loop bookkeeping: the part recomputation
changes), the three settings interleaved, medians of ``--repeats``; and the bytes each forward leaves
alive for its backward (:class:`~steer_lens.train.recompute.HeldMemory`, deterministic). SmolLM2-135M
shape (``--model-config``, random weights) or the real TinyStories-656K; vectors at one
``blocks.{n//2}.hook_resid_post`` and at all ``hook_mlp_out`` (the Sinii layout); ``--batch`` x ``--seq``
random tokens, every position a target.

    python benchmarks/ab_recompute.py --model-config benchmarks/smollm2_135m_config.json --batch 4 --seq 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _models import config_models
from _report import add_args, header, write_json

import steer_lens as sl
from steer_lens.train.recompute import HeldMemory, recompute_context

MODES = (False, "selective", "full")


def step(steered, tokens, mode) -> tuple[float, float, float]:
    """(forward s, backward s, MiB held for the backward) of one training forward + backward."""
    t0 = time.perf_counter()
    with recompute_context(steered, mode):
        with HeldMemory(steered.model) as held:
            logits = steered(tokens, grad=True)
            loss = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).mean()
            del logits
        t1 = time.perf_counter()
        loss.backward()
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    steered.vectors.zero_grad(set_to_none=True)
    return t1 - t0, time.perf_counter() - t1, held.bytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    add_args(ap, model_config=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    head = header("ab_recompute (P4)", "the same vector training forward + backward without recomputation",
                  args.device)
    if args.model_config:
        tl, _ = config_models(args.model_config, args.device, args.dtype)
    else:
        tl = sl.load_model("raincandy-u/TinyStories-656K", device=args.device)
    n = tl.cfg.n_layers
    tokens = torch.randint(1, tl.cfg.d_vocab, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    figures: dict = {}
    for layout, hooks in (("one", [f"blocks.{n // 2}.hook_resid_post"]),
                          ("mlp_out", [f"blocks.{i}.hook_mlp_out" for i in range(n)])):
        steered = sl.SteeredTransformer(tl, hooks, init="random", init_norm=1.0, seed=0)
        for m in MODES:
            step(steered, tokens, m)  # warm-up
        runs: dict = {str(m): [] for m in MODES}
        for _ in range(args.repeats):
            for m in MODES:
                runs[str(m)].append(step(steered, tokens, m))
        base = None
        for m in MODES:
            r = runs[str(m)]
            fwd, bwd = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
            held = r[-1][2]
            base = base or (fwd + bwd, held)
            figures[f"{layout}_{m}"] = {"forward_s": fwd, "backward_s": bwd, "total_s": fwd + bwd, "held_mib": held,
                                        "time_vs_none": (fwd + bwd) / base[0], "held_vs_none": held / base[1]}
            print(f"| {layout} | {m} | {fwd:.3f} | {bwd:.3f} | {fwd + bwd:.3f} | {(fwd + bwd) / base[0]:.2f}x | "
                  f"{held:.1f} | {held / base[1]:.2f}x |", flush=True)
    write_json(args.json, head, figures, args)


if __name__ == "__main__":
    main()
