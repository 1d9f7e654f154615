"""The Sinii layout's SFT step on a ``TransformerBridge`` vs a ``HookedTransformer`` vs peft LoRA (issue 19, P4).

Does steering TransformerLens's ``TransformerBridge`` (Hugging Face's own modules with hook points) close
the SFT step's gap to the LoRA step that ``profile_tl_vs_hf.py`` locates in the HookedTransformer's
element-wise work? Three runs on the same random-weight SmolLM2-135M-shaped model
(``smollm2_135m_config.json``) and batch, interleaved, best of ``--repeats``: ``sl.train.sft`` with vectors
at all 30 ``hook_mlp_out`` on the HookedTransformer and on a ``TransformerBridge.boot_transformers(...,
hf_model=)`` of the same weights (``bench_sft_step.vector_runner``), and the rank-4 peft LoRA step on all
projections (``bench_sft_step.lora_runner``, the reference).

    cd benchmarks && python ab_bridge_sft.py --batch 4 --seq 128 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import bench_sft_step as b
import torch
from _models import config_models
from _report import add_args, header, write_json

CONFIG = Path(__file__).with_name("smollm2_135m_config.json")


def bridge_of(hf, device: str):
    """A ``TransformerBridge`` over a copy of ``hf`` (TinyStories-656K's tokenizer: only ids are used)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(b.REAL)
    with tempfile.TemporaryDirectory() as d:
        hf.config.save_pretrained(d)
        bridge = TransformerBridge.boot_transformers(d, hf_model=copy.deepcopy(hf), device=device, tokenizer=tok)
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    add_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = header("ab_bridge_sft", "a rank-4 peft LoRA step on all projections, same weights and batch", args.device)
    tl, hf = config_models(CONFIG, args.device)
    bridge = bridge_of(hf, args.device)
    tokens = b.batch_tokens(args, int(tl.cfg.d_vocab))
    with torch.no_grad():
        diff = float((bridge(tokens[:, :16]) - tl(tokens[:, :16])).abs().max())
    hooks = [f"blocks.{i}.hook_mlp_out" for i in range(tl.cfg.n_layers)]
    runs = {"hooked_transformer": b.vector_runner(tl, tokens, hooks, args.steps),
            "transformer_bridge": b.vector_runner(bridge, tokens, hooks, args.steps),
            "lora_all": b.lora_runner(b.lora_model(hf, "lora_all"), tokens, args.steps)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for k, run in runs.items():
            best[k] = min(best[k], run())
    ratios = {f"{k}_vs_lora": v / best["lora_all"] for k, v in best.items() if k != "lora_all"}
    print(f"SFT step, 30 vectors, batch {args.batch} x {args.seq}, best of {args.repeats}: " + ", ".join(
        f"{k} {v:.3f} s" for k, v in best.items()) + "; " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
        + f"; bridge vs HookedTransformer max |logit diff| {diff:.1e}")
    write_json(args.json, head, {**{f"{k}_s": v for k, v in best.items()}, **ratios,
                                 "max_abs_logit_diff": diff}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
