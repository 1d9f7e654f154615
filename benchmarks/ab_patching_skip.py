"""A/B of the patching sites that are not run: what the two skips of ``steer_lens.patching`` buy.

* **Minimal pair** (``activation_patch``): clean and corrupted prompts equal before a swapped token
  (an IOI-style name swap half-way): the sites before it are not run (``_changed_sites``).
* **Steering patch** (``steering_patch``): a vector at ``blocks.{L}.hook_resid_pre``; the ``resid_post``
  sites of the layers before it are not run (``_vector_layers``).

Each is timed with the skip (the library) and without it (the helper replaced by the identity, every
site run: the path before the skip), interleaved, median of ``--repeats``; the two results are compared.
Real SmolLM2-135M-Instruct (30 layers, dequantised GGUF) or, with ``--model-config``, a random-weight
model of that shape; batch 2 x 20 tokens, ``logit_diff``.

    cd benchmarks && HF_HUB_CACHE=../../shared/models/hub HF_HUB_OFFLINE=1 python ab_patching_skip.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from _report import add_args, header, write_json
from bench_patching import SMOL, SMOL_FILE

import steer_lens as sl
from steer_lens.patching import activation as act

IDENTITY = {  # the helpers replaced by "keep every site"
    "_changed_sites": lambda model, plan, *args: plan,
    "_vector_layers": lambda plan, *args: plan,
}


def _model(args):
    if args.model_config:
        from _models import config_models

        return config_models(args.model_config, args.device, args.dtype)[0]
    return sl.load_model(SMOL, gguf_file=SMOL_FILE, device=args.device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pos", type=int, default=20)
    ap.add_argument("--vector-layer", type=int, default=15, help="the steering vector's block (resid_pre)")
    add_args(ap, model_config=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    head = header("ab_patching_skip", "the same sweeps with every site run (the skip helpers disabled)", args.device)
    model = _model(args)
    vocab, n_layers = int(model.cfg.d_vocab), int(model.cfg.n_layers)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, vocab, (2, args.pos), generator=g).to(args.device)
    corrupted = clean.clone()
    corrupted[:, args.pos // 2] = (clean[:, args.pos // 2] + 1 + torch.arange(2, device=args.device)) % vocab
    metric = sl.patching.logit_diff(torch.tensor([5, 6]), torch.tensor([7, 8]))
    steered = sl.SteeredTransformer(
        model, hooks=[f"blocks.{args.vector_layer}.hook_resid_pre"], init="random", init_norm=8.0, seed=0
    )
    cases = {
        "minimal_pair": ("_changed_sites", lambda: sl.patching.activation_patch(model, clean, corrupted, metric)),
        "steering_patch": ("_vector_layers", lambda: sl.patching.steering_patch(steered, clean, metric, "resid_post")),
    }

    def run(case: str, skip: bool):
        helper, call = cases[case]
        saved = getattr(act, helper)
        if not skip:
            setattr(act, helper, IDENTITY[helper])
        try:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            values = call().values
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t, values
        finally:
            setattr(act, helper, saved)

    figures = {}
    for case in cases:
        run(case, True), run(case, False)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for skip in (True, False):
                times[skip].append(run(case, skip)[0])
        diff = float((run(case, True)[1] - run(case, False)[1]).abs().max())
        fast, slow = statistics.median(times[True]), statistics.median(times[False])
        figures[case] = {"skip_s": fast, "every_site_s": slow, "ratio": fast / slow, "max_abs_diff": diff,
                         "runs": {str(k): v for k, v in times.items()}}
        print(f"{case:15s} skip {fast:7.2f} s  every site {slow:7.2f} s  ratio {fast / slow:.3f}  "
              f"max|diff| {diff:.1e}  ({n_layers} layers, swap at {args.pos // 2}, vector at {args.vector_layer})",
              flush=True)
    write_json(args.json, head, figures, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
