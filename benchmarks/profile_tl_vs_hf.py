"""Where a steered training step spends more than Hugging Face's model: torch.profiler, op by op (issue 19, P4).

One forward + backward of the SmolLM2-135M-shaped model (random weights, ``smollm2_135m_config.json``) with
the Sinii layout (vectors at all 30 ``hook_mlp_out``; gradients to the vectors only, the final residual's
mean square as the loss) through TransformerLens, against the same forward + backward of the Hugging Face
model with the same weights (gradient to the input embeddings, so that the backward crosses every block).
Prints both times (best of ``--repeats``) and, for each aten op (the matrix products and fused attention
kernels summed in one row), the self time of each side and the difference, largest first: the ops
TransformerLens runs that Hugging Face does not (or runs cheaper).

    python benchmarks/profile_tl_vs_hf.py --batch 4 --seq 128 --threads 1 [--device cuda]

``--decode N`` profiles sampling instead (issue 19, P3): ``steered.sample``'s loop
(:func:`steer_lens.generation.sample_tokens`, TransformerLens's KV-cache decoding, 30 vectors) of ``N`` new
tokens after a ``--seq``-token prompt, against ``generate`` of the Hugging Face model with the same weights
(no hooks), same batch, temperature 1, no EOS stop:

    python benchmarks/profile_tl_vs_hf.py --decode 32 --batch 8 --seq 40 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _models import config_models
from _report import add_args, header, write_json
from torch.profiler import ProfilerActivity, profile

import steer_lens as sl
from steer_lens.generation import sample_tokens

CONFIG = Path(__file__).with_name("smollm2_135m_config.json")
# the matrix products and fused attention kernels, one row (TransformerLens uses addmm/bmm where HF uses mm/SDPA)
MATMULS = "matmuls + attention kernels"
_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def _self_times(step, device: str) -> dict[str, float]:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            key = MATMULS if e.key in _MATMUL_OPS or "scaled_dot_product" in e.key else e.key
            out[key] = out.get(key, 0.0) + getattr(e, attr) / 1e3
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--decode", type=int, default=0, help="profile sampling of this many new tokens instead")
    add_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = "generate" if args.decode else "forward + backward"
    head = header("profile_tl_vs_hf", f"the Hugging Face model's {ref} with the same weights", args.device)
    tl, hf = config_models(CONFIG, args.device)
    for p in [*tl.parameters(), *hf.parameters()]:
        p.requires_grad_(False)
    tokens = torch.randint(3, int(tl.cfg.d_vocab), (args.batch, args.seq), device=args.device)
    steered = sl.SteeredTransformer(tl, hooks=[f"blocks.{i}.hook_mlp_out" for i in range(tl.cfg.n_layers)])
    embed = hf.get_input_embeddings()

    def tl_step():
        with steered.gradients():
            resid = steered(tokens, stop_at_layer=int(tl.cfg.n_layers))
        resid.pow(2).mean().backward()

    def hf_step():
        x = embed(tokens).detach().requires_grad_(True)
        hf.model(inputs_embeds=x).last_hidden_state.pow(2).mean().backward()

    if args.decode:
        tl_step, hf_step = _decode_steps(steered, hf, tokens, args.decode)
    best = {}
    for name, step in (("tl", tl_step), ("hf", hf_step)):
        step()  # warm-up
        runs = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t)
        best[name] = min(runs)
    try:
        ops = {"tl": _self_times(tl_step, args.device), "hf": _self_times(hf_step, args.device)}
    except Exception as e:  # e.g. no CUPTI on a GPU machine: the times above still stand
        print(f"profiler unavailable ({type(e).__name__}: {e}); op table left out")
        ops = {"tl": {}, "hf": {}}
    rows = sorted(
        ({"op": k, "tl_ms": ops["tl"].get(k, 0.0), "hf_ms": ops["hf"].get(k, 0.0)} for k in ops["tl"].keys() | ops["hf"].keys()),
        key=lambda r: r["hf_ms"] - r["tl_ms"],
    )
    what = f"sampling {args.decode} new tokens after" if args.decode else "fwd+bwd,"
    print(f"{what} batch {args.batch} x {args.seq}, {args.threads} thread(s): TransformerLens (30 vectors) "
          f"{best['tl']:.3f} s, Hugging Face {best['hf']:.3f} s, ratio {best['tl'] / best['hf']:.3f}")
    print("\n| op | TL self (ms) | HF self (ms) | TL - HF (ms) |\n|---|---|---|---|")
    for r in rows[: args.top] + [r for r in rows[args.top :] if r["op"] == MATMULS]:
        print(f"| `{r['op']}` | {r['tl_ms']:.1f} | {r['hf_ms']:.1f} | {r['tl_ms'] - r['hf_ms']:+.1f} |")
    write_json(args.json, head, {"tl_s": best["tl"], "hf_s": best["hf"], "ratio": best["tl"] / best["hf"], "ops": rows},
               args)
    return 0


def _decode_steps(steered, hf, tokens, new: int):
    """(TransformerLens sampler, Hugging Face ``generate``) of ``new`` tokens after ``tokens``, no EOS stop."""
    mask = torch.ones_like(tokens)

    def tl_step():
        sample_tokens(steered, tokens, mask, None, new, temperature=1.0, top_p=1.0, top_k=None, do_sample=True,
                      seed=0, stop_at_eos=False, use_kv_cache=True)

    def hf_step():
        with torch.no_grad():
            hf.generate(tokens, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=new, min_new_tokens=new, use_cache=True, eos_token_id=None, pad_token_id=0)

    return tl_step, hf_step


if __name__ == "__main__":
    sys.exit(main())
