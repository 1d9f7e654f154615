"""Benchmark of steer_lens.sae: throughput of activation_shift and attribute, and bounded memory.

Measured side by side in one run, on the real model (raincandy-u/TinyStories-656K, when it is in the
Hugging Face cache) or a random Llama-like model of the same size:

* tokens/s of two plain forward passes (base + steered: the floor for any comparison of the two);
* tokens/s of ``activation_shift`` and of ``attribute`` (without and with the ablation check), and
  their ratio to the plain forward passes;
* peak resident memory above the baseline while ``activation_shift`` streams a corpus of N and of 8N
  texts (the ratio stays ~1 when memory is bounded, i.e. activations are not all kept);
* optionally (``--train``) the time and quality of training a 128 -> 1024 TopK k=16 SAE on stories
  sampled from the model, evaluated on the real text.

Usage::

    HF_HUB_CACHE=../shared/models/hub HF_HUB_OFFLINE=1 python benchmarks/bench_sae.py [--train] [--device cuda]
"""

from __future__ import annotations

import argparse
import glob
import os
import threading
import time
import warnings

import torch
from _report import add_args, header, write_json

import steer_lens as sl
from steer_lens.metrics import logit_diff

REAL = "raincandy-u/TinyStories-656K"


def real_texts() -> list[str]:
    data = os.environ.get("STEER_LENS_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                          "data", "tinystories"))
    out = []
    for f in sorted(glob.glob(os.path.join(data, "*.txt"))):
        for part in open(f).read().replace("<|endoftext|>", "\n").split("\n"):
            if part.strip():
                out.append(part.strip())
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--texts", type=int, default=32, help="texts per throughput measurement")
    ap.add_argument("--train", action="store_true", help="also time SAE training on sampled stories")
    ap.add_argument("--threads", type=int, default=None)
    add_args(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = header("bench_sae", "two plain forward passes (base + steered) over the same corpus", args.device)
    warnings.simplefilter("ignore")
    texts = real_texts()
    try:
        model = sl.load_model(REAL, device=args.device)
        name = REAL
    except Exception as e:
        print(f"(real model unavailable: {type(e).__name__}; using a random model of the same size)")
        model = sl.random_model("llama", d_model=128, n_heads=8, d_vocab=2048, n_ctx=512, device=args.device)
        name = "random-llama-128"
        texts = [torch.randint(3, 2048, (200,)) for _ in range(64)]
    hook = "blocks.0.hook_resid_post"
    import sae_lens

    torch.manual_seed(0)
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=128, d_sae=1024, k=16, device=args.device))
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = sl.model_info(model).name
    steered = sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_pre"], init="random", init_norm=4.0)
    corpus = (texts * (args.texts // max(1, len(texts)) + 1))[: args.texts]
    n_tok = 0
    for b in sl.sae._core.iter_batches(model, corpus, batch_size=16):
        n_tok += int(b.attention_mask.sum())

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    def plain():
        with torch.no_grad():
            for b in sl.sae._core.iter_batches(model, corpus, batch_size=16):
                model(b.tokens, attention_mask=b.attention_mask)
                steered(b.tokens, attention_mask=b.attention_mask)

    rows = []
    t_plain = timed(plain, 2)
    rows.append(("2 plain forwards (base + steered)", t_plain))
    rows.append(("activation_shift", timed(lambda: sl.analysis.activation_shift(steered, sae, corpus), 2)))
    rows.append(("attribute (no ablation)", timed(
        lambda: sl.sae.attribute(steered, sae, corpus, metric, ablation=False), 2)))
    rows.append(("attribute (no ablation, metrics.logit_diff)", timed(
        lambda: sl.sae.attribute(steered, sae, corpus, logit_diff(5, 6), ablation=False), 2)))
    rows.append(("attribute (ablation 1,5,10,20 x (top + 3 random) + all)", timed(
        lambda: sl.sae.attribute(steered, sae, corpus, metric), 1)))
    print(f"\nmodel {name}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{len(corpus)} texts, {n_tok} tokens")
    print(f"{'what':58s} {'seconds':>8s} {'tokens/s':>10s} {'x plain':>8s}")
    for what, t in rows:
        print(f"{what:58s} {t:8.2f} {n_tok / t:10.0f} {t / t_plain:8.2f}")

    figures = {"model": name, "n_texts": len(corpus), "n_tokens": n_tok,
               "rows": [{"what": w, "seconds": t, "tokens_per_s": n_tok / t, "over_plain": t / t_plain}
                        for w, t in rows]}
    # memory: streamed, so 8x the corpus should need about the same peak memory
    small = corpus
    large = corpus * 8
    sl.analysis.activation_shift(steered, sae, small[:4])  # warm-up allocations
    with PeakRSS() as m1:
        sl.analysis.activation_shift(steered, sae, small, per_token_texts=0)
    with PeakRSS() as m8:
        sl.analysis.activation_shift(steered, sae, large, per_token_texts=0)
    print(f"\npeak RSS above baseline, activation_shift: {len(small)} texts {m1.mib:.1f} MiB, "
          f"{len(large)} texts {m8.mib:.1f} MiB (ratio {m8.mib / max(m1.mib, 0.1):.2f}; "
          "all activations of the large corpus would take "
          f"{8 * n_tok * (1024 + 128) * 4 * 2 / 2**20:.0f} MiB)")
    figures["activation_shift_peak_rss_mib"] = {"n": m1.mib, "8n": m8.mib}

    if args.train and name == REAL:
        t = time.perf_counter()
        stories = sl.sae.sample_corpus(model, n_texts=1024, max_new_tokens=256, batch_size=256)
        t_sample = time.perf_counter() - t
        res = sl.sae.train(model, hook, stories, d_sae=1024, k=16, eval_texts=texts)
        q = res.quality
        print(f"\nSAE training ({hook}, 128 -> 1024 TopK k=16): sampling {t_sample:.0f} s, training "
              f"{res.seconds:.0f} s on {res.n_training_tokens} activations; on real text FVU {q.fvu:.3f}, "
              f"L0 {q.l0:.1f}, dead {q.dead_features}/1024, loss recovered {q.loss_recovered:.3f} "
              f"(CE clean {q.ce_clean:.3f}, spliced {q.ce_spliced:.3f}, zero-ablated {q.ce_zero_ablation:.3f})")
        figures["train"] = {"sample_s": t_sample, "train_s": res.seconds, "fvu": q.fvu, "l0": q.l0,
                            "dead": q.dead_features, "loss_recovered": q.loss_recovered}
    write_json(args.json, head, figures, args)


if __name__ == "__main__":
    main()
