"""Benchmark of steer_lens.lora: the cost of ``compare`` relative to two plain forward passes.

Measured side by side in one run, on the real model (raincandy-u/TinyStories-656K, when it is in the
Hugging Face cache; otherwise a random Llama-like model of the same shape), over the real stories cut
into sentences (or random tokens), same batches for every measurement:

* two plain forward passes over the texts (base + merged LoRA model: the floor for comparing them);
* ``compare`` (merging, LoRA and base passes with caches, the constant-vector pass, statistics) for a
  rank-4 LoRA on one down projection, and for one on every q/k/v/o/gate/up/down projection;
* ``compare`` with a steering vector (one more forward pass for its loss);
* ``mean_delta_vector`` and ``adapter_activations``;
* ``train_adapter`` (``--train-steps`` steps of rank 4 on layer 1's ``down_proj``, batch 16, on the shared
  loop ``train.loop.run_loop``) against a bare peft + AdamW loop over the same batches (forward,
  backward, clipping, step: the floor), to show what the shared loop's bookkeeping costs.

Goal: ``compare`` <= 3x the two forward passes; ``train_adapter`` <= 1.2x the bare loop. Each number is
the best of ``--repeat`` runs.

``--study`` runs the real-model study of docs/lora.md instead: per seed, 48 stories sampled from the
model after "Once upon a time, there was a dog" (those that mention a dog again; the first 32 train),
a rank-4 LoRA on layer 1's ``down_proj`` (peft, 150 steps) and a steering vector at
``blocks.1.hook_mlp_out`` (``train.sft``, 150 steps, ``--vector-lr``) trained on the same texts, both compared with
``compare`` on the training texts and on held-out dog texts (the real stories' dog sentences and the
remaining samples).

Usage::

    HF_HUB_CACHE=../shared/models/hub HF_HUB_OFFLINE=1 python benchmarks/bench_lora.py [--repeat 3] [--device cuda]
    HF_HUB_CACHE=../shared/models/hub HF_HUB_OFFLINE=1 python benchmarks/bench_lora.py --study [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import time
import warnings

import torch
from _report import add_args, header, write_json

import steer_lens as sl

REAL = "raincandy-u/TinyStories-656K"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def real_sentences(n: int) -> list[str]:
    data = os.environ.get("STEER_LENS_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                          "data", "tinystories"))
    text = " ".join(open(f).read().replace("<|endoftext|>", " ") for f in sorted(glob.glob(os.path.join(data, "*.txt"))))
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > 4]
    return sents[:n]


def load(device: str):
    """(TransformerLens model, Hugging Face model, name) — real when cached, else random of the same shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    try:
        model = sl.load_model(REAL, device=device)
        hf = AutoModelForCausalLM.from_pretrained(REAL, dtype=torch.float32).to(device)
        return model, hf, REAL
    except Exception as e:
        warnings.warn(f"real model not available ({e}); timing a random model of the same shape", stacklevel=1)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval().to(device)
    import tempfile

    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lp

    d = tempfile.mkdtemp()
    cfg.save_pretrained(d)
    tcfg = lp.get_pretrained_model_config(d, fold_ln=False, device=device, dtype=torch.float32)
    tcfg.tokenizer_name = None
    model = HookedTransformer(tcfg)
    model.load_and_process_state_dict(lp.get_pretrained_state_dict(d, tcfg, hf_model=hf), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.eval(), hf, "random llama (TinyStories-656K shape)"


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def train_timing(hf, tokens: list, steps: int, repeat: int) -> tuple[float, float]:
    """Seconds of ``train_adapter`` and of a bare peft + AdamW loop over the same batches (best of ``repeat``)."""
    import copy

    import peft

    examples = [(t[:1], t[1:]) for t in tokens]
    cfg = sl.lora.LoraTrainConfig(rank=4, target_modules=("down_proj",), layers=(1,), steps=steps, batch_size=16,
                                  lr=1e-3)

    def ours():
        sl.lora.train_adapter(hf, examples, cfg)

    def bare():
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["down_proj"], layers_to_transform=[1], lora_dropout=0.0))
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0)).tolist()
        pm.train()
        for step in range(steps):
            rows = [tokens[order[(step * 16 + j) % len(order)]] for j in range(16)]
            n = max(len(r) for r in rows)
            toks = torch.zeros(len(rows), n, dtype=torch.long)
            attn = torch.zeros(len(rows), n, dtype=torch.long)
            for i, r in enumerate(rows):
                toks[i, : len(r)], attn[i, : len(r)] = r, 1
            toks, attn = toks.to(pm.device), attn.to(pm.device)
            logits = pm(input_ids=toks, attention_mask=attn).logits
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]
            mask = attn[:, 1:].bool()
            loss = -(logp * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    with torch.enable_grad():
        t_ours = t_bare = float("inf")
        for _ in range(repeat):  # interleaved, so that load on a shared CPU hits both alike
            t_bare = min(t_bare, best_of(bare, 1))
            t_ours = min(t_ours, best_of(ours, 1))
    return t_ours, t_bare


def study(seeds: list[int], steps: int, vector_lr: float) -> None:
    """The real-model study (see the module docstring); prints one block per seed and split."""
    from steer_lens.train import SFTConfig, sft

    model = sl.load_model(REAL, device="cpu")
    prompt = "Once upon a time, there was a dog"
    text = " ".join(real_sentences(10_000))
    real_dog = [s.strip() for s in re.findall(r"[^.!?]*\bdogs?\b[^.!?]*[.!?]", text, re.I)]
    for seed in seeds:
        gen = sl.SteeredTransformer(model, hooks=["blocks.1.hook_mlp_out"])
        samples = gen.generate([prompt] * 48, 60, seed=seed, temperature=1.0)
        dog = [s for s in samples if re.search(r"\bdogs?\b", s[len(prompt):], re.I)]
        train, held = dog[:32], real_dog + dog[32:]
        res = sl.lora.train_adapter(REAL, train, sl.lora.LoraTrainConfig(
            rank=4, target_modules=("down_proj",), layers=(1,), steps=steps, batch_size=8, lr=3e-3, seed=seed))
        lora = sl.lora.load_adapter(model, res)
        steered = sl.SteeredTransformer(model, hooks=["blocks.1.hook_mlp_out"])
        sft(steered, train, SFTConfig(steps=steps, batch_size=8, seed=seed, lr=vector_lr, progress=False))
        for split, texts in (("train", train), ("held-out", held)):
            cmp = sl.lora.compare(model, lora, texts, steered=steered)
            st = cmp.stats["blocks.1.hook_mlp_out"]
            (w,) = cmp.weights
            print(f"seed {seed} {split:>8} ({len(texts)} texts, {cmp.n_tokens} tokens): "
                  f"L base/LoRA/const/vector {cmp.loss_base:.3f}/{cmp.loss_lora:.3f}/{cmp.loss_const:.3f}/"
                  f"{cmp.loss_steered:.3f}  frac const {cmp.frac_recovered:.3f}  frac vector "
                  f"{cmp.frac_recovered_steered:.3f}  KL(LoRA||const) {cmp.kl_lora_const:.3f}  "
                  f"KL(LoRA||vector) {cmp.kl_lora_steered:.3f}  KL(LoRA||base) {cmp.kl_lora_base:.3f}")
            print(f"    mean|cos| {st['mean_abs_cos']:.3f}  mean energy {st['mean_energy']:.3f}  top SV energy "
                  f"{st['top_sv_energy']:.3f}  top PC share {st['top_pc_share']:.3f}  cos(mean, vector) "
                  f"{st['cos_steering']:.3f}  dW: top SV energy {w['top_sv_energy']:.3f}  |cos(u1, vector)| "
                  f"{w['cos_u1_steering']:.3f}  |cos(u1, mean)| {w['cos_u1_mean_delta']:.3f}")


def main() -> None:
    import copy

    import peft

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier ratios on a shared CPU)")
    ap.add_argument("--study", action="store_true", help="run the real-model study instead of the timing")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--vector-lr", type=float, default=1e-2, help="train.sft lr (relative units)")
    ap.add_argument("--train-steps", type=int, default=30, help="steps of the train_adapter timing (0: skip it)")
    add_args(ap)
    args = ap.parse_args()
    if args.study:
        study(args.seeds, args.steps, args.vector_lr)
        return
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    head = header("bench_lora", "two plain forward passes (base + merged LoRA) over the same batches; "
                  "a bare peft + AdamW loop for train_adapter", args.device)
    model, hf, name = load(args.device)
    if getattr(model, "tokenizer", None) is not None:
        texts = real_sentences(args.texts)
    else:
        g = torch.Generator().manual_seed(0)
        texts = [torch.randint(3, 2048, (int(n),), generator=g) for n in torch.randint(8, 40, (args.texts,), generator=g)]
    batches = sl.lora.prepare_texts(model, texts, args.batch_size)
    n_tok = int(sum(int(r.sum()) for _, r in batches))
    print(f"model: {name}; {len(texts)} texts, {n_tok} tokens, batch {args.batch_size}, device {args.device}, {args.threads} thread(s)")

    rows = []
    for label, targets, layers in (("down_proj, layer 1", ["down_proj"], [1]), ("all 7 projections, 2 layers", ALL, None)):
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=targets, layers_to_transform=layers, init_lora_weights=False)).eval()
        lora = sl.lora.load_adapter(model, pm)
        merged = sl.lora.merged_model(model, lora)

        def two_forward(merged=merged):
            for toks, _ in batches:
                model(toks)
                merged(toks)

        t_fwd = best_of(two_forward, args.repeat)
        t_cmp = best_of(lambda lora=lora: sl.lora.compare(model, lora, texts, batch_size=args.batch_size), args.repeat)
        vec = sl.lora.mean_delta_vector(model, lora, texts, batch_size=args.batch_size)
        t_steer = best_of(lambda lora=lora, vec=vec: sl.lora.compare(model, lora, texts, steered=vec,
                                                                     batch_size=args.batch_size), args.repeat)
        t_mean = best_of(lambda lora=lora: sl.lora.mean_delta_vector(model, lora, texts, batch_size=args.batch_size),
                         args.repeat)
        t_acts = best_of(lambda lora=lora: sl.lora.adapter_activations(model, lora, texts,
                                                                       batch_size=args.batch_size), args.repeat)
        rows.append((label, t_fwd, t_cmp, t_steer, t_mean, t_acts))

    print(f"\n{'adapter':<30} {'2 fwd (s)':>10} {'compare':>10} {'ratio':>7} {'+steered':>10} {'ratio':>7} "
          f"{'mean_delta':>11} {'ratio':>7} {'activations':>12} {'ratio':>7}")
    for label, t_fwd, t_cmp, t_steer, t_mean, t_acts in rows:
        print(f"{label:<30} {t_fwd:>10.3f} {t_cmp:>10.3f} {t_cmp / t_fwd:>6.2f}x {t_steer:>10.3f} "
              f"{t_steer / t_fwd:>6.2f}x {t_mean:>11.3f} {t_mean / t_fwd:>6.2f}x {t_acts:>12.3f} {t_acts / t_fwd:>6.2f}x")
    keys = ("two_forward_s", "compare_s", "compare_steered_s", "mean_delta_vector_s", "adapter_activations_s")
    figures = {"model": name, "n_texts": len(texts), "n_tokens": n_tok,
               "adapters": [{"adapter": r[0], **dict(zip(keys, r[1:], strict=True)),
                             "compare_over_two_forward": r[2] / r[1]} for r in rows]}
    worst = max(r[2] / r[1] for r in rows)
    print(f"\ngoal: compare <= 3x two forward passes -> worst {worst:.2f}x: {'MET' if worst <= 3 else 'NOT MET'}")
    if args.train_steps:
        tokens = [toks[i, : int(real[i].sum())].cpu() for toks, real in batches for i in range(toks.shape[0])]
        t_ours, t_bare = train_timing(hf, tokens, args.train_steps, args.repeat)
        ratio = t_ours / t_bare
        print(f"train_adapter {args.train_steps} steps: {t_ours:.3f} s ({t_ours / args.train_steps * 1e3:.1f} ms/step); "
              f"bare peft + AdamW loop {t_bare:.3f} s; ratio {ratio:.2f}x (goal <= 1.2x: "
              f"{'MET' if ratio <= 1.2 else 'NOT MET'})")
        figures["train_adapter"] = {"steps": args.train_steps, "ours_s": t_ours, "bare_peft_s": t_bare,
                                    "ratio": ratio}
    write_json(args.json, head, figures, args)


if __name__ == "__main__":
    main()
