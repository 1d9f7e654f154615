"""Benchmark of issue 19 goal P4: one vector training step (SFT) against one rank-4 peft LoRA step.

Measured side by side in one run, on the same batch (``--batch`` x ``--seq`` random token ids, every token
after the first ``--prompt-len`` (default 1) a target: a chat SFT batch with ``--prompt-len P``; the LoRA
step's labels are -100 on the prompt) and the same weights (``--model-config``: a random-weight model of that Hugging
Face config, TransformerLens converted from it, see ``benchmarks/_models.py``; otherwise the real
raincandy-u/TinyStories-656K and its Hugging Face model):

* **vector, one hook**: a :class:`~steer_lens.SteeredTransformer` with one vector at ``--hooks`` (default
  ``blocks.{n_layers // 2}.hook_resid_post``), trained by the library's own ``sl.train.sft`` (``--steps``
  steps, side-effect measures and held-out evaluation off); a step's time is ``SFTResult.seconds / steps``,
  the loop alone (``run_loop``'s clock starts after tokenising, the residual-RMS probe and the optimiser
  set-up): forward with the vectors, masked cross-entropy, backward into the vectors, clipping at 1, AdamW,
  and the loop's per-step bookkeeping (one device sync, metrics);
* **vector, every ``hook_mlp_out``** (the Sinii et al. layout), the same way;
* **LoRA, all projections**: peft ``LoraConfig(r=4, lora_alpha=8, lora_dropout=0, target_modules=q/k/v/o/
  gate/up/down)`` on every layer of the Hugging Face model (the usual peft fine-tune), one step = forward
  with ``labels`` (Hugging Face's shifted cross-entropy), backward, ``clip_grad_norm_(1)``, AdamW
  (lr 1e-3); the reference of the goal;
* with ``--recompute``, the two vector steps again with ``SFTConfig(recompute="full")`` (``vector_one_rc``,
  ``vector_mlp_out_rc``: the blocks from the first vector on keep only their input and rerun their forward
  in the backward pass) and with ``SFTConfig(recompute="selective")`` (``vector_one_sel``,
  ``vector_mlp_out_sel``: they keep their matrix products' outputs and rerun the element-wise ops), see
  :func:`~steer_lens.train.recompute.recompute_blocks`;
* **LoRA, one down_proj**: the same on the ``down_proj`` of layer ``n_layers // 2`` only (the LoRA
  closest to the one-hook vector).

Goal (issue 19, P4): vector step <= 1.0x the LoRA step's time; peak memory <= 1.2x the LoRA step's.
Time is the best of ``--repeats`` runs of ``--steps`` steps. Peak memory of one measurement, above what
the built models hold: on CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before it
(in this process, peak stats reset per measurement); on CPU each measurement runs in a fresh subprocess,
which builds the model, records its resident set (``VmRSS``), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs`` 5) and reports ``VmHWM`` minus that after its steps (``ru_maxrss`` where the
reset is refused), with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_=65536``) so that
every tensor above that size is its own mapping, returned to the kernel when freed: the RSS then follows
the live tensors instead of the allocator's retained heap. ``--no-memory`` skips it. Also, on every device
and deterministic: **held MiB**, the bytes of the tensors a training forward (up to the loss) leaves alive
for the backward pass, parameters excluded (:class:`~steer_lens.train.recompute.HeldMemory`), for the
vector steps and the LoRA step alike.

Usage::

    HF_HUB_CACHE=../shared/models/hub HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_sft_step.py
    python benchmarks/bench_sft_step.py --model-config benchmarks/smollm2_135m_config.json --batch 4 --seq 64
    python benchmarks/bench_sft_step.py ... --recompute   # also the vector steps with recompute="full" and "selective"
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _models import DTYPES, config_models
from _report import add_args, header, write_json

import steer_lens as sl

REAL = "raincandy-u/TinyStories-656K"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("vector_one", "vector_mlp_out", "lora_all", "lora_down")
# with --recompute: SFTConfig(recompute="full") (_rc) and recompute="selective" (_sel)
RECOMPUTED = ("vector_one_rc", "vector_mlp_out_rc", "vector_one_sel", "vector_mlp_out_sel")


def recompute_mode(kind: str) -> bool | str:
    """The ``SFTConfig.recompute`` setting of measurement ``kind``."""
    return {"_rc": "full", "_sel": "selective"}.get(kind[kind.rfind("_"):], False)


def kinds(args) -> tuple[str, ...]:
    """The measurements of this run: :data:`KINDS`, plus :data:`RECOMPUTED` with ``--recompute``."""
    return KINDS + (RECOMPUTED if args.recompute else ())


def build(args, need: str):
    """(TransformerLens model or None, Hugging Face model or None): only what measurement ``need`` uses."""
    if args.model_config:
        tl, hf = config_models(args.model_config, args.device, args.dtype)
    else:
        from transformers import AutoModelForCausalLM

        tl = sl.load_model(REAL, device=args.device) if need != "lora" else None
        hf = AutoModelForCausalLM.from_pretrained(REAL, dtype=DTYPES[args.dtype]).to(args.device) \
            if need != "vector" else None
    if need == "vector":
        hf = None
    elif need == "lora":
        tl = None
    gc.collect()
    return tl, hf


prompt_len = [1]  # --prompt-len: tokens per row that are prompt (not targets); set by main()


def lora_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels of the batch: the prompt positions ignored (-100), as the vector's targets."""
    labels = tokens.clone()
    labels[:, : prompt_len[0]] = -100
    return labels


def batch_tokens(args, vocab: int) -> torch.Tensor:
    """The one batch every measurement uses: ``[batch, seq]`` random ids (seeded), on the device."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab, (args.batch, args.seq), generator=g).to(args.device)


def vector_hooks(kind: str, n_layers: int, hooks: str | None) -> list[str]:
    if kind.removesuffix("_rc").removesuffix("_sel") == "vector_mlp_out":
        return [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    return hooks.split(",") if hooks else [f"blocks.{n_layers // 2}.hook_resid_post"]


def vector_runner(tl, tokens: torch.Tensor, hooks: list[str], steps: int, recompute: bool | str = False):
    """A function running ``sl.train.sft`` for ``steps`` steps; returns seconds per step (the loop's own clock)."""
    steered = sl.SteeredTransformer(tl, hooks)
    p = prompt_len[0]  # the first p tokens of a row its prompt, the rest its targets
    examples = [(row[:p].tolist(), row[p:].tolist()) for row in tokens.cpu()]
    cfg = sl.train.SFTConfig(steps=steps, batch_size=len(examples), measure_side_effects=False,
                             eval_every=10**6, progress=False, recompute=recompute)
    return lambda: sl.train.sft(steered, examples, cfg).seconds / steps


def lora_model(hf, kind: str):
    import peft

    n = hf.config.num_hidden_layers
    extra = {"target_modules": ALL} if kind == "lora_all" else \
        {"target_modules": ["down_proj"], "layers_to_transform": [n // 2]}
    return peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **extra))


def lora_runner(pm, tokens: torch.Tensor, steps: int):
    """A function running ``steps`` bare peft steps (forward with labels, backward, clip at 1, AdamW); s/step."""
    params = [p for p in pm.parameters() if p.requires_grad]
    pm.train()

    def run() -> float:
        opt = torch.optim.AdamW(params, lr=1e-3)
        _sync(tokens.device)
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = pm(input_ids=tokens, labels=lora_labels(tokens)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            float(loss.detach())  # one sync per step, like the library's loop
        return (time.perf_counter() - t) / steps

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runner(kind: str, tl, hf, tokens, args, steps: int):
    """The timed function of measurement ``kind`` (seconds per step)."""
    if kind.startswith("vector"):
        return vector_runner(tl, tokens, vector_hooks(kind, tl.cfg.n_layers, args.hooks), steps,
                             recompute=recompute_mode(kind))
    return lora_runner(lora_model(hf, kind), tokens, steps)


def held_mib(kind: str, tl, hf, tokens, args) -> float:
    """MiB a training forward of ``kind`` (up to its loss) leaves alive for the backward (``HeldMemory``)."""
    from steer_lens.train.recompute import HeldMemory, recompute_context
    from steer_lens.train.scored import scored_logits

    if kind.startswith("lora"):
        pm = lora_model(hf, kind)
        pm.train()
        with HeldMemory(pm) as held:
            loss = pm(input_ids=tokens, labels=lora_labels(tokens)).loss
    else:
        steered = sl.SteeredTransformer(tl, vector_hooks(kind, tl.cfg.n_layers, args.hooks))
        with recompute_context(steered, recompute_mode(kind)), HeldMemory(tl) as held:
            with steered.gradients():  # the SFT loss's path: the target positions alone unembedded
                logits = scored_logits(steered, tokens, lambda x: x[:, prompt_len[0] - 1 : -1])
            loss = -logits.float().log_softmax(-1).gather(-1, tokens[:, prompt_len[0]:, None]).mean()
            del logits
    del loss
    return held.bytes / 2**20


def forward_runner(model, tokens: torch.Tensor, steps: int):
    """A function timing ``steps`` plain no-grad forwards (the floor of each side); s/forward."""
    @torch.no_grad()
    def run() -> float:
        _sync(tokens.device)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(tokens)
            float(getattr(out, "logits", out)[0, 0, 0])
        return (time.perf_counter() - t) / steps

    return run


def timings(tl, hf, tokens, args) -> dict[str, float]:
    """Best seconds per step of every measurement; the repeats interleave the kinds (a shared CPU's noise hits all)."""
    runs = {k: runner(k, tl, hf, tokens, args, args.steps) for k in kinds(args)}
    runs.update(tl_forward=forward_runner(tl, tokens, args.steps), hf_forward=forward_runner(hf, tokens, args.steps))
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for k, run in runs.items():
            best[k] = min(best[k], run())
    return best


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_memory_child(args) -> None:
    """In a fresh process: build, reset the peak-RSS mark, run ``args.child``'s steps, print the MiB above the build."""
    need = "vector" if args.child.startswith("vector") else "lora"
    tl, hf = build(args, need)
    vocab = tl.cfg.d_vocab if tl is not None else hf.config.vocab_size
    tokens = batch_tokens(args, vocab)
    if need == "lora":  # the deep copy of the base is part of the set-up, not of the step
        hf = lora_model(hf, args.child)
        gc.collect()
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        peak = lambda: _status_kib("VmHWM")
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (lora_runner(hf, tokens, 1) if need == "lora" else runner(args.child, tl, hf, tokens, args, 1))()
    print(json.dumps({"peak_mib": (peak() - base) / 1024}))


def cpu_memory(kind: str, argv: list[str]) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS follows the live tensors (module docstring)
    out = subprocess.run([sys.executable, __file__, *argv, "--child", kind], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def cuda_memory(kind: str, tl, hf, tokens, args) -> float:
    dev = tokens.device
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    runner(kind, tl, hf, tokens, args, 1)()
    # a LoRA measurement's deep copy of the model is in the peak: subtract the base's size
    copy_b = sum(p.numel() * p.element_size() for p in hf.parameters()) if kind.startswith("lora") else 0
    return (torch.cuda.max_memory_allocated(dev) - before - copy_b) / 2**20


def parse() -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--hooks", default=None, help="comma-separated hooks of the one-hook vector "
                                                  "(default blocks.{n_layers//2}.hook_resid_post)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--recompute", action="store_true", help="also measure the vector steps with "
                                                             "SFTConfig(recompute='full') and 'selective'")
    ap.add_argument("--prompt-len", type=int, default=1, help="tokens per row that are prompt, not targets "
                                                                "(a chat SFT batch; default 1: plain text)")
    ap.add_argument("--full-unembed", action="store_true", help="A/B: the vector steps unembed every position "
                                                                 "(the SFT loss before it scored the targets alone)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_args(ap, model_config=True)
    args = ap.parse_args()
    if not 1 <= args.prompt_len < args.seq:
        ap.error(f"--prompt-len must be in [1, --seq), got {args.prompt_len}")
    prompt_len[0] = args.prompt_len
    if args.full_unembed:
        from steer_lens.train import scored

        scored.unembeds_apart = lambda steered: False
    argv = [a for a in sys.argv[1:] if a != "--no-memory"]
    if "--json" in argv:
        i = argv.index("--json")
        argv = argv[:i] + argv[i + 2:]
    return args, argv


def main() -> None:
    args, argv = parse()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        return cpu_memory_child(args)
    head = header("sft_step (P4)", "a rank-4 peft LoRA step (forward + CE + backward + clip + AdamW) on the "
                  "Hugging Face model, same weights, same batch", args.device)
    tl, hf = build(args, "both")
    tokens = batch_tokens(args, tl.cfg.d_vocab)
    n = tl.cfg.n_layers
    print(f"# model: {args.model_config or REAL}, {n} layers, d_model {tl.cfg.d_model}, {args.dtype}; batch "
          f"{args.batch} x {args.seq}; best of {args.repeats} x {args.steps} steps")
    figures: dict = {"n_layers": n, "one_hook": vector_hooks("vector_one", n, args.hooks)}
    figures.update({f"{k}_step_s": v for k, v in timings(tl, hf, tokens, args).items()})
    for kind in kinds(args):
        figures[f"{kind}_held_mib"] = held_mib(kind, tl, hf, tokens, args)
    if not args.no_memory:
        for kind in kinds(args):
            figures[f"{kind}_peak_mib"] = cuda_memory(kind, tl, hf, tokens, args) if args.device.startswith("cuda") \
                else cpu_memory(kind, argv)
    report(figures)
    write_json(args.json, head, figures, args)


def report(f: dict) -> None:
    mem = "lora_all_peak_mib" in f
    print("| step | s/step | vs LoRA all | vs LoRA down_proj | held MiB | vs LoRA all |"
          + (" peak MiB | vs LoRA all | vs LoRA down_proj |" if mem else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|" if mem else ""))
    for kind in KINDS + tuple(k for k in RECOMPUTED if f"{k}_step_s" in f):
        t, h = f[f"{kind}_step_s"], f[f"{kind}_held_mib"]
        row = (f"| {kind} | {t:.4f} | {t / f['lora_all_step_s']:.2f}x | {t / f['lora_down_step_s']:.2f}x | "
               f"{h:.1f} | {h / f['lora_all_held_mib']:.2f}x |")
        if mem:
            m = f[f"{kind}_peak_mib"]
            row += f" {m:.1f} | {m / f['lora_all_peak_mib']:.2f}x | {m / f['lora_down_peak_mib']:.2f}x |"
        print(row)
    print(f"no-grad forward floors: TransformerLens {f['tl_forward_step_s']:.4f} s, Hugging Face "
          f"{f['hf_forward_step_s']:.4f} s")
    for kind in ("vector_one", "vector_mlp_out", *(k for k in RECOMPUTED if f"{k}_step_s" in f)):
        f[f"{kind}_time_ratio_vs_lora_all"] = f[f"{kind}_step_s"] / f["lora_all_step_s"]
        f[f"{kind}_held_ratio_vs_lora_all"] = f[f"{kind}_held_mib"] / f["lora_all_held_mib"]
        if mem:
            f[f"{kind}_memory_ratio_vs_lora_all"] = f[f"{kind}_peak_mib"] / f["lora_all_peak_mib"]


if __name__ == "__main__":
    main()
