"""Core benchmark: what does a steering vector cost? Ratios measured side by side in one run.

For the real model (raincandy-u/TinyStories-656K) and a pythia-410m-shaped random model:

* forward: steered vs unsteered (goal <= 1.1x);
* generate (KV cache): steered vs the same sampler with the vectors off (goal <= 1.1x), and
  TransformerLens's own ``generate`` for reference;
* one SFT step of the vector (the library's loop) vs a plain forward+backward of the same model and
  batch without vectors (goal <= 1.1x), and vs a rank-4 LoRA step (peft, on the Hugging Face model of
  the same architecture and size);
* peak memory of one step above the loaded model (CUDA: max allocated; CPU: resident memory sampled
  every millisecond), each configuration in a fresh subprocess.

Timings interleave the variants (A B A B ...) and report medians, so drift on a shared machine hits
both sides alike. Run: ``make bench`` or ``python benchmarks/bench_core.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
from _report import add_args, header, write_json

REAL = "raincandy-u/TinyStories-656K"
PYTHIA_410M = dict(n_layers=24, d_model=1024, n_heads=16, d_vocab=50304, n_ctx=2048, rotary_dim=16)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, reps: int, device) -> dict[str, float]:
    """Median seconds of each function, calling them in turn ``reps`` times after one warm-up."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(kind: str, device: str):
    import steer_lens as sl

    if kind == "real":
        model = sl.load_model(REAL, device=device)
        hook = "blocks.1.hook_resid_pre"
    else:
        model = sl.random_model("neox", device=device, **PYTHIA_410M)
        hook = "blocks.12.hook_resid_pre"
    return model, hook


def hf_model(kind: str, device: str):
    if kind == "real":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(REAL).to(device)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048)
    return GPTNeoXForCausalLM(cfg).to(device)


def batch_for(model, kind, device, batch, pos):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, int(model.cfg.d_vocab), (batch, pos), generator=g).to(device)
    toks[:, 0] = 1
    return toks


def bench_speed(kind: str, device: str, reps: int, batch: int, pos: int, new: int) -> dict:
    import steer_lens as sl
    from steer_lens.train.loop import OptimConfig, run_loop

    model, hook = build(kind, device)
    steered = sl.SteeredTransformer(model, [hook], init="random", init_norm=1.0)
    toks = batch_for(model, kind, device, batch, pos)
    out: dict = {"model": kind, "device": device, "batch": batch, "pos": pos}

    with torch.no_grad():
        t = interleaved({"plain": lambda: model(toks), "steered": lambda: steered(toks)}, reps, device)
    out["forward_s"] = t
    out["forward_ratio"] = t["steered"] / t["plain"]

    prompt = toks[:, : min(8, pos)]

    def gen_off():
        with steered.disabled():
            steered.generate(prompt, new, seed=0, stop_at_eos=False)

    fns = {"unsteered": gen_off, "steered": lambda: steered.generate(prompt, new, seed=0, stop_at_eos=False)}
    fns["transformer_lens"] = lambda: model.generate(prompt, max_new_tokens=new, verbose=False,
                                                      stop_at_eos=False)
    t = interleaved(fns, max(2, reps // 2), device)
    out["generate_s"] = t
    out["generate_ratio"] = t["steered"] / t["unsteered"]
    out["generate_tokens_per_s_steered"] = batch * new / t["steered"]

    # one SFT step of the vector through the library's loop vs a plain forward+backward
    mask = torch.ones(batch, pos - 1, dtype=torch.bool, device=device)

    def ce(logits):
        logp = logits[:, :-1].float().log_softmax(-1)
        return -(logp.gather(-1, toks[:, 1:, None])[..., 0] * mask).sum() / mask.sum()

    def vector_steps(n):
        cfg = OptimConfig(steps=n, progress=False, lr=1e-3)
        res = run_loop(steered, lambda step: (ce(steered(toks)), {}), cfg, resid_rms={hook: 1.0})
        return res.seconds / n

    params = list(model.parameters())

    def plain_step():
        for p in params:
            p.requires_grad_(True)
        try:
            ce(model(toks)).backward()
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)

    hf = hf_model(kind, device)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if kind == "real" else ["query_key_value", "dense"]
    lora = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    def lora_step():
        opt.zero_grad(set_to_none=True)
        ce(lora(input_ids=toks).logits).backward()
        opt.step()

    n = max(3, reps)
    step_times = {"vector_sft_step": [], "plain_fwd_bwd": [], "lora_r4_step": []}
    vector_steps(1), plain_step(), lora_step()
    for _ in range(n):
        step_times["vector_sft_step"].append(vector_steps(1))
        for k, f in (("plain_fwd_bwd", plain_step), ("lora_r4_step", lora_step)):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            step_times[k].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in step_times.items()}
    out["train_step_s"] = t
    out["sft_vs_plain_ratio"] = t["vector_sft_step"] / t["plain_fwd_bwd"]
    out["sft_vs_lora_ratio"] = t["vector_sft_step"] / t["lora_r4_step"]
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssSampler:
    """Peak resident memory above a baseline, sampled every millisecond on a thread (CPU runs)."""

    def __init__(self):
        import threading

        self.base = _rss_mib()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            self._stop.wait(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mib())


def _memory_child(kind, device, which, batch, pos, q):
    import steer_lens as sl

    torch.manual_seed(0)
    if which == "lora":
        model = hf_model(kind, device)
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if kind == "real" else ["query_key_value", "dense"]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        vocab = model.config.vocab_size
    else:
        model, hook = build(kind, device)
        vocab = int(model.cfg.d_vocab)
    toks = torch.randint(3, vocab, (batch, pos)).to(device)
    steered = sl.SteeredTransformer(model, [hook]) if which == "vector" else None
    if which == "plain":
        for p in model.parameters():
            p.requires_grad_(True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_cuda = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None
    with _RssSampler() as rss:
        if which == "plain":
            model(toks).logsumexp(-1).mean().backward()
        elif which == "vector":
            steered(toks, grad=True).logsumexp(-1).mean().backward()
        elif which == "lora":
            model(input_ids=toks).logits.logsumexp(-1).mean().backward()
        elif which == "forward":
            with torch.no_grad():
                model(toks)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    out = {"rss_step_mib": rss.peak - rss.base, "rss_base_mib": rss.base}
    if device.startswith("cuda"):
        out["cuda_step_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    q.put(out)


def bench_memory(kind, device, batch, pos) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for which in ("forward", "plain", "vector", "lora"):
        q = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=(kind, device, which, batch, pos, q))
        p.start()
        out[which] = q.get(timeout=900)
        p.join()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="real model only, fewer repetitions")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_args(ap)
    args = ap.parse_args(argv)
    from steer_lens.models import resolve_device

    device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    head = header("bench_core", "the same model and calls with the vectors off; TransformerLens generate; "
                  "a peft rank-4 LoRA step on the Hugging Face model", device)
    torch.set_grad_enabled(True)
    results = []
    configs = [("real", 8 if args.quick else 20, 16, 32, 40)]
    if not args.quick:
        big = (8, 64, 32) if device.startswith("cuda") else (2, 32, 16)
        configs.append(("pythia410m", 3 if device == "cpu" else 10, *big))
    for kind, reps, batch, pos, new in configs:
        r = bench_speed(kind, device, reps, batch, pos, new)
        r["memory"] = {} if args.no_memory else bench_memory(kind, device, batch, pos)
        results.append(r)
        print(f"\n== {kind} on {device}: batch {batch} x {pos} tokens ==")
        print(f"forward          steered/plain   = {r['forward_ratio']:.3f}x  "
              f"({r['forward_s']['steered'] * 1e3:.2f} ms vs {r['forward_s']['plain'] * 1e3:.2f} ms)")
        g = r["generate_s"]
        print(f"generate ({new} tok) steered/unsteered = {r['generate_ratio']:.3f}x  "
              f"({g['steered']:.3f} s vs {g['unsteered']:.3f} s; {r['generate_tokens_per_s_steered']:.0f} tok/s)"
              + (f"; TransformerLens generate {g['transformer_lens']:.3f} s" if "transformer_lens" in g else ""))
        t = r["train_step_s"]
        print(f"SFT step         vector/plain fwd+bwd = {r['sft_vs_plain_ratio']:.3f}x  "
              f"({t['vector_sft_step'] * 1e3:.1f} ms vs {t['plain_fwd_bwd'] * 1e3:.1f} ms)")
        print(f"SFT step         vector/LoRA r=4 step = {r['sft_vs_lora_ratio']:.3f}x  "
              f"(LoRA {t['lora_r4_step'] * 1e3:.1f} ms)")
        m = r["memory"]
        if not m:
            continue
        key = "cuda_step_mib" if device.startswith("cuda") else "rss_step_mib"
        print(f"peak memory of one step above the loaded model (MiB, {key}): "
              + ", ".join(f"{k} {v[key]:.0f}" for k, v in m.items()))
    write_json(args.json, head, results, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
