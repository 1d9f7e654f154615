"""The ``steer-lens`` command line.

Subcommands:

* ``steer-lens demo``: the end-to-end demo (:func:`steer_lens.demo.run_demo`).
* ``steer-lens train sft``: train a vector by SFT on a data file, write the vector folder and metrics.
* ``steer-lens train rl``: train a vector by RL (RLOO / GRPO / REINFORCE) with a built-in reward
  (``--reward contains:dog``) or a Python one (``--reward module:function``,
  ``--reward path/to/file.py:function``; :func:`steer_lens.cli_rl.load_reward`).

Training commands write every metric per step to ``OUT/metrics.jsonl``; the progress bar shows four
(:func:`steer_lens.train.loop.progress_fields`).
* ``steer-lens export VECTOR_DIR --format gguf|hf --out PATH``: a saved vector folder as a llama.cpp
  control vector or a Hugging Face checkpoint with biases (:mod:`steer_lens.export`).
* ``steer-lens import FILE.gguf --model NAME --out VECTOR_DIR``: a llama.cpp / repeng control vector
  as a vector folder.
* ``steer-lens report VECTOR_DIR [--model NAME] --out report.html``: one offline HTML report of a saved
  or imported vector (:mod:`steer_lens.report`).

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
    p.add_argument("--gguf-file", default=None,
                   help="GGUF file in that repository, for a GGUF model (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--layer", type=int, default=1, help="block index of the hook")
    p.add_argument("--hook", default="resid_pre",
                   help="hook kind at that layer: resid_pre, resid_mid, resid_post, attn_out, mlp_out")


def _add_export_parsers(sub) -> None:
    e = sub.add_parser("export", help="export a saved vector folder (llama.cpp GGUF or HF checkpoint)")
    e.add_argument("vector_dir", help="a folder written by SteeredTransformer.save")
    e.add_argument("--format", choices=["gguf", "hf"], required=True,
                   help="gguf: llama.cpp control vector file; hf: checkpoint with the vectors as biases")
    e.add_argument("--out", required=True, help="the .gguf file (gguf) or folder (hf) to write")
    e.add_argument("--model", default=None, help="model name (default: the one the folder records)")
    e.add_argument("--gguf-file", default=None, help="GGUF file of the model (default: the one recorded)")
    e.add_argument("--allow-other-model", action="store_true",
                   help="load the vectors onto --model even if the folder records another name")
    i = sub.add_parser("import", help="import a llama.cpp / repeng control vector as a vector folder")
    i.add_argument("file", help="the control vector .gguf file")
    i.add_argument("--model", required=True, help="Hugging Face name of the model to steer")
    i.add_argument("--gguf-file", default=None, help="GGUF file in that repository, if the model is GGUF")
    i.add_argument("--allow-other-model", action="store_true", help="accept another model_type hint")
    i.add_argument("--out", required=True, help="the vector folder to write")


def _add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="one offline HTML report of a saved vector folder")
    r.add_argument("vector_dir", help="a folder written by SteeredTransformer.save (or steer-lens import)")
    r.add_argument("--out", required=True, help="the HTML file to write")
    r.add_argument("--model", default=None, help="model name (default: the one the folder records)")
    r.add_argument("--gguf-file", default=None, help="GGUF file of the model (default: the one recorded)")
    r.add_argument("--allow-other-model", action="store_true", help="load the vectors onto another --model")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    r.add_argument("--prompts", default=None, help="text file, one prompt per line (default: a small set)")
    r.add_argument("--messages", action="store_true", help="send each prompt as a user message (chat template)")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--samples", type=int, default=4, help="sampled continuations per prompt (position shift)")
    r.add_argument("--k", type=int, default=10, help="tokens per side in the vector lens")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sae", default=None, help="add the SAE summary: RELEASE:ID (sae-lens) or an SAE folder")
    r.add_argument("--patching", action="store_true", help="add the steering-patching summary (first prompt)")


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
    d.add_argument("--kl-coef", type=float, default=1.0,
                   help="weight of the KL-to-base term on the model's own samples (0: off; default 1)")
    d.add_argument("--kl-every", type=int, default=2, help="steps between KL terms (default 2)")

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
    _add_export_parsers(sub)
    _add_report_parser(sub)
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

    model = sl.load_model(args.model, gguf_file=args.gguf_file, device=args.device)
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


def _recorded_model(vector_dir: Path) -> dict:
    from steer_lens.errors import ConfigError
    from steer_lens.vectors.io import read_json

    try:
        model = read_json(vector_dir / "config.json").get("model")
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ConfigError(
            f"{str(vector_dir)!r}: not a vector folder with a readable config.json ({e}). Fix: pass a folder "
            "written by SteeredTransformer.save (e.g. steer-lens train ... --out OUT writes OUT/vector)."
        ) from e
    return model if isinstance(model, dict) else {}


def _run_export(args) -> int:
    import steer_lens as sl
    from steer_lens.errors import ConfigError

    vector_dir = Path(args.vector_dir)
    recorded = _recorded_model(vector_dir)
    name = args.model or recorded.get("name")
    if not name:
        raise ConfigError(f"{vector_dir}/config.json records no model name. Fix: pass --model NAME.")
    gguf_file = args.gguf_file or (recorded.get("gguf_file") if name == recorded.get("name") else None)
    model = sl.load_model(name, gguf_file=gguf_file, device="cpu")
    steered = sl.SteeredTransformer.load(vector_dir, model, allow_other_model=args.allow_other_model)
    out = sl.export.export(steered, args.out, format=args.format)
    print(f"exported {len(steered.hook_names)} vector(s) of {name} as {args.format} to {out}")
    return 0


def _run_import(args) -> int:
    import steer_lens as sl

    model = sl.load_model(args.model, gguf_file=args.gguf_file, device="cpu")
    steered = sl.export.import_control_vector(args.file, model, allow_other_model=args.allow_other_model)
    out = steered.save(args.out)
    print(f"imported {len(steered.hook_names)} direction(s) onto {args.model}: {list(steered.hook_names)}; "
          f"saved to {out}")
    return 0


def _run_report(args) -> int:
    from steer_lens.report import read_prompts, vector_report

    prompts = read_prompts(args.prompts) if args.prompts else None
    out = vector_report(args.vector_dir, args.out, model=args.model, gguf_file=args.gguf_file,
                        allow_other_model=args.allow_other_model, device=args.device, prompts=prompts,
                        messages=args.messages, k=args.k, max_new_tokens=args.max_new_tokens,
                        n_samples=args.samples, seed=args.seed, sae=args.sae, patching=args.patching)
    print(f"report of {args.vector_dir} written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``steer-lens``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "demo":
            from steer_lens.demo import run_demo, summary_text

            res = run_demo(model_name=args.model, gguf_file=args.gguf_file, word=args.word, layer=args.layer,
                           hook=args.hook, steps=args.steps, lr=args.lr, texts=args.texts, out=args.out, device=args.device,
                           n_samples=args.samples, seed=args.seed, kl_coef=args.kl_coef, kl_every=args.kl_every)
            print(summary_text(res))
            return 0
        if args.command == "export":
            return _run_export(args)
        if args.command == "import":
            return _run_import(args)
        if args.command == "report":
            return _run_report(args)
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
