"""Data-parallel scaling of vector training: steps/s on 1 vs N processes at a fixed global batch.

Launches ``tests/distributed_worker.py`` (TinyStories-656K, or a random-weight model with
``--random-config``) under ``torchrun`` once per process count (gloo on the CPU, NCCL on GPUs), for
SFT and RLOO, and reads each rank's timing of ``sft`` / ``rl`` (model loading excluded). Prints the
machine, thread count, versions, steps/s and the scaling efficiency ``speedup / N`` (1.0: perfect);
``--json out.json`` writes the figures. Every process gets ``OMP_NUM_THREADS`` threads (default 1),
so N processes need N free cores to scale.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py --nproc 2 --steps 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "tests" / "distributed_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(jobs: str, nproc: int, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of each job (the slowest rank's) on ``nproc`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
               str(WORKER), jobs, tmp, "--steps", str(args.steps), "--batch", str(args.batch)]
        if args.random_config:
            cmd += ["--random-config", args.random_config]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return {job: max(json.loads((Path(tmp) / f"{job}_rank{r}.json").read_text())["seconds"] for r in range(nproc))
                for job in jobs.split(",")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="global batch: SFT examples / RL prompts (x4 samples)")
    p.add_argument("--random-config", default=None, help='e.g. \'{"family": "llama", "n_layers": 4, "d_model": 256}\'')
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    import steer_lens

    info = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get(
        "OMP_NUM_THREADS", "1"), "torch": torch.__version__, "steer_lens": steer_lens.__version__,
        "python": platform.python_version(), "steps": args.steps, "global_batch": args.batch,
        "model": args.random_config or "raincandy-u/TinyStories-656K"}
    one, many = run("sft,rl", 1, args), run("sft,rl", args.nproc, args)
    figures = {}
    for job in ("sft", "rl"):
        s1, sn = args.steps / one[job], args.steps / many[job]
        figures[job] = {"steps_per_s_1": s1, f"steps_per_s_{args.nproc}": sn, "speedup": sn / s1,
                        "efficiency": sn / s1 / args.nproc}
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    for job, f in figures.items():
        print(f"{job:>5}: 1 proc {f['steps_per_s_1']:.2f} steps/s, {args.nproc} procs "
              f"{f[f'steps_per_s_{args.nproc}']:.2f} steps/s, speedup {f['speedup']:.2f}x, "
              f"efficiency {f['efficiency']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "nproc": args.nproc, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
