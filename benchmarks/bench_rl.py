"""Benchmark of RL rollouts and steps: tokens/s with vs without steering, and a step's time split.

Run: ``python benchmarks/bench_rl.py [--device cpu|cuda] [--shape tinystories|pythia-410m|1b]``, or
``--model-config benchmarks/smollm2_135m_config.json [--dtype bfloat16]`` for a random-weight model of
SmolLM2-135M's exact shape (30 layers; the GPU check uses it, the GGUF being too large to send there).

* rollout throughput: ``steered.sample`` of ``batch x new`` tokens with the vectors on vs the same
  call under ``steered.disabled()`` (no hooks), interleaved, median of ``--repeats``; goal on >= 0.9.
* step time split: sampling, the base (KL reference) forward, and the training forward + backward
  + AdamW update, each timed on its own (median).
* memory: peak CUDA memory on a GPU; max RSS on the CPU.
* with ``--model-config``: Hugging Face ``generate`` on the same weights (its KV cache, same batch, same
  sampling settings, exactly ``new`` tokens, no hooks), interleaved with the two runs above: the
  reference of the issue's goal P3 (tokens/s >= 1.0x HF).

The real TinyStories-656K model is used when it is in the Hugging Face cache (``--shape
tinystories``); other shapes are random models with the given architecture (no download).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from _models import config_models
from _report import add_args, header, write_json

import steer_lens as sl
from steer_lens.train.rl import completion_logprobs, policy_loss, rloo_advantages

SHAPES = {
    # random models shaped like real ones (llama-style blocks; GPT-NeoX-like widths)
    "pythia-410m": dict(family="neox", n_layers=24, d_model=1024, n_heads=16, d_vocab=50304, n_ctx=2048),
    "1b": dict(family="llama", n_layers=16, d_model=2048, n_heads=32, d_vocab=32000, n_ctx=2048),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(shape: str, device: str):
    if shape == "tinystories":
        try:
            return sl.load_model("raincandy-u/TinyStories-656K", device=device)
        except Exception as e:
            print(f"(real model unavailable: {type(e).__name__}; using a random model of its shape)")
            return sl.random_model("llama", n_layers=2, d_model=128, n_heads=8, d_vocab=2048, n_ctx=512,
                                   device=device)
    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    return sl.random_model(family, device=device, **spec)


def _hf_generate(hf, prompts, new: int, seed: int):
    """HF ``generate``: multinomial sampling at temperature 1, exactly ``new`` tokens, KV cache."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                           pad_token_id=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="tinystories", choices=["tinystories", *SHAPES])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch default)")
    add_args(ap, model_config=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = "the same steered.sample call with the vectors off (steered.disabled())"
    head = header("bench_rl", ref + ("; Hugging Face generate on the same weights" if args.model_config else ""),
                  args.device)
    hf = None
    if args.model_config:
        model, hf = config_models(args.model_config, args.device, args.dtype)
        args.shape = f"config:{args.model_config}"
    else:
        model = _model(args.shape, args.device)
    dev = next(model.parameters()).device
    layer = model.cfg.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_pre"
    steered = sl.SteeredTransformer(model, [hook], init="random", init_norm=1.0)
    prompt_len = 8
    prompts = torch.randint(3, model.cfg.d_vocab, (args.batch, prompt_len),
                            generator=torch.Generator().manual_seed(0)).to(dev)
    prompts[:, 0] = 1

    def sample(seed: int):
        # stop_at_eos=False: every row generates exactly `new` tokens (same work in both runs)
        return steered.sample(prompts, args.new, seed=seed, stop_at_eos=False)

    sample(0)  # warm-up
    with steered.disabled():
        sample(0)
    if hf is not None:
        _hf_generate(hf, prompts, args.new, 0)  # warm-up
    on, off, ref_hf = [], [], []
    for r in range(args.repeats):
        if hf is not None:
            _sync(dev)
            t0 = time.perf_counter()
            _hf_generate(hf, prompts, args.new, r)
            _sync(dev)
            ref_hf.append(time.perf_counter() - t0)
        for enabled in (True, False):
            _sync(dev)
            t0 = time.perf_counter()
            if enabled:
                g = sample(r)
            else:
                with steered.disabled():
                    g = sample(r)
            _sync(dev)
            (on if enabled else off).append(time.perf_counter() - t0)
    n_tok = args.batch * args.new
    tps_on, tps_off = n_tok / statistics.median(on), n_tok / statistics.median(off)

    # step split
    opt = torch.optim.AdamW(steered.vectors.parameters(), lr=1e-3)
    rewards = torch.rand(args.batch, device=dev)
    adv = rloo_advantages(rewards.view(-1, 8) if args.batch % 8 == 0 else rewards.view(1, -1)).reshape(-1)
    t_ref, t_upd = [], []
    for _ in range(args.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), steered.disabled():
            ref, _ = completion_logprobs(steered, g.tokens, g.attention_mask, g.prompt_len, with_entropy=False)
        _sync(dev)
        t1 = time.perf_counter()
        opt.zero_grad()
        logp, ent = completion_logprobs(steered, g.tokens, g.attention_mask, g.prompt_len)
        loss, _ = policy_loss(logp, adv, g.completion_mask, ref_logp=ref, entropy=ent)
        loss.backward()
        opt.step()
        _sync(dev)
        t2 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_upd.append(t2 - t1)
    s, rf, up = statistics.median(on), statistics.median(t_ref), statistics.median(t_upd)
    total = s + rf + up
    mem = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = {
        "device": str(dev), "shape": args.shape, "threads": torch.get_num_threads(), "batch": args.batch,
        "new_tokens": args.new, "hook": hook,
        "tokens_per_s_steered": round(tps_on, 1), "tokens_per_s_unsteered": round(tps_off, 1),
        "ratio_steered_over_unsteered": round(tps_on / tps_off, 3),
        "step_s": round(total, 4), "sample_s": round(s, 4), "ref_forward_s": round(rf, 4),
        "update_s": round(up, 4), "sample_share": round(s / total, 3),
        "peak_memory_mib": round(mem, 1), "dtype": str(next(model.parameters()).dtype),
    }
    if ref_hf:
        tps_hf = n_tok / statistics.median(ref_hf)
        out.update(tokens_per_s_hf_generate=round(tps_hf, 1), ratio_steered_over_hf=round(tps_on / tps_hf, 3))
        print(f"Hugging Face generate (same weights, batch, sampling): {tps_hf:,.0f} tok/s; steered / HF "
              f"{tps_on / tps_hf:.3f} (goal >= 1.0)")
    print(f"rollout tokens/s: steered {tps_on:,.0f}  unsteered {tps_off:,.0f}  ratio {tps_on / tps_off:.3f} "
          f"(goal >= 0.9)")
    print(f"step {total:.3f} s = sampling {s:.3f} ({s / total:.0%}) + base forward {rf:.3f} + "
          f"update {up:.3f}; peak memory {mem:.0f} MiB ({'CUDA' if dev.type == 'cuda' else 'max RSS'})")
    print(json.dumps(out))
    write_json(args.json, head, out, args)


if __name__ == "__main__":
    main()
