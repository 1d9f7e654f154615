"""The ``steer-lens`` command line.

Subcommands:

* ``steer-lens demo``: the end-to-end demo (:func:`steer_lens.demo.run_demo`).
* ``steer-lens train sft``: train a vector by SFT on a data file, write the vector folder and metrics.
* ``steer-lens train rl``: train a vector by RL (RLOO / GRPO / REINFORCE) with a built-in reward.

Errors from steer_lens are printed as one message (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from steer_lens.errors import SteerLensError

__all__ = ["build_parser", "main", "read_examples"]


def read_examples(path: str | Path) -> list:
    """Examples from a file: ``.jsonl`` with ``{"prompt", "completion"}`` or ``{"text"}`` per line,
    or a text file with one example per line (``<|endoftext|>`` also separates examples)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                out.append(obj["text"] if "text" in obj else obj)
        return out
    from steer_lens.demo import load_texts

    return load_texts([path])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="raincandy-u/TinyStories-656K", help="Hugging Face model name")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--layer", type=int, default=1, help="block index of the hook")
    p.add_argument("--hook", default="resid_pre",
                   help="hook kind at that layer: resid_pre, resid_mid, resid_post, attn_out, mlp_out")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``steer-lens``."""
    parser = argparse.ArgumentParser(prog="steer-lens", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a concept vector on real stories and write a report")
    _add_model_args(d)
    d.add_argument("--word", default="dog", help="the concept word (default: dog)")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--lr", type=float, default=1e-2, help="relative learning rate (see docs)")
    d.add_argument("--texts", nargs="*", default=[], help="text files with stories (default: model samples)")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--samples", type=int, default=64, help="continuations sampled to measure the rate")
    d.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train a steering vector")
    tsub = t.add_subparsers(dest="objective", required=True)
    s = tsub.add_parser("sft", help="supervised: cross-entropy on completion tokens")
    _add_model_args(s)
    s.add_argument("--data", required=True, help=".jsonl ({prompt, completion} or {text}) or .txt")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--lr", type=float, default=1e-2)
    s.add_argument("--lr-units", choices=["relative", "absolute"], default="relative")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--objective", dest="sft_objective", default="promotion",
                   choices=["promotion", "suppression", "mixed"])
    s.add_argument("--max-norm", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-dir", default=None)
    s.add_argument("--checkpoint-every", type=int, default=0)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--out", required=True, help="folder for the vector and metrics.jsonl")
    try:
        from steer_lens.cli_rl import add_rl_arguments
    except ImportError:  # pragma: no cover - RL command not available in this build
        add_rl_arguments = None
    if add_rl_arguments is not None:
        r = tsub.add_parser("rl", help="reinforcement learning (RLOO / GRPO / REINFORCE)")
        add_rl_arguments(r)
    return parser


def _run_sft(args) -> int:
    import steer_lens as sl
    from steer_lens.hook_sites import HookSite
    from steer_lens.train import SFTConfig, sft

    model = sl.load_model(args.model, device=args.device)
    steered = sl.SteeredTransformer(model, [HookSite.name_of(args.hook, args.layer)])
    out = Path(args.out)
    cfg = SFTConfig(steps=args.steps, lr=args.lr, lr_units=args.lr_units, batch_size=args.batch_size,
                    objective=args.sft_objective, max_norm=args.max_norm, seed=args.seed,
                    checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                    resume=args.resume, log_path=str(out / "metrics.jsonl"))
    result = sft(steered, read_examples(args.data), cfg)
    steered.save(out / "vector")
    print(f"trained {result.steps} steps, final loss {float(result.losses[-1]):.4f} nats/token; "
          f"vector saved to {out / 'vector'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``steer-lens``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "demo":
            from steer_lens.demo import run_demo, summary_text

            res = run_demo(model_name=args.model, word=args.word, layer=args.layer, hook=args.hook,
                           steps=args.steps, lr=args.lr, texts=args.texts, out=args.out, device=args.device,
                           n_samples=args.samples, seed=args.seed)
            print(summary_text(res))
            return 0
        if args.command == "train" and args.objective == "sft":
            return _run_sft(args)
        if args.command == "train" and args.objective == "rl":
            from steer_lens.cli_rl import run_rl_command

            return int(run_rl_command(args))
    except SteerLensError as e:
        print(f"steer-lens: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
