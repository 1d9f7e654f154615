"""The one reporting helper of benchmarks/: what a run is compared with, where it ran, and its JSON.

Every ``benchmarks/bench_*.py`` calls :func:`header` once (it prints the reference, the machine, the
thread count and the versions) and :func:`write_json` at the end (``--json PATH``, added by
:func:`add_args`), so that the tables in ``docs/benchmarks/`` can be regenerated from runs. The JSON
holds ``{"benchmark", "reference", "machine", "args", "figures"}``; ``figures`` is whatever the script
measured (seconds, tokens/s, MiB, ratios), with units in the key names. The file is strict JSON: a
figure that was not measured (NaN) or is infinite is written as ``null``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformer-lens", "transformers", "steer-lens", "peft", "sae-lens")


def add_args(ap: argparse.ArgumentParser, *, model_config: bool = False) -> None:
    """Add ``--json PATH`` (and ``--model-config PATH`` / ``--dtype`` where a script can use them)."""
    if not any(a.dest == "json" for a in ap._actions):
        ap.add_argument("--json", default=None, help="write the figures (and machine, versions) to this file")
    if model_config:
        ap.add_argument("--model-config", default=None,
                        help="a Hugging Face config JSON (e.g. benchmarks/smollm2_135m_config.json): use a "
                             "random-weight model of that exact shape instead of loading the real one")
        ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype of the --model-config model")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a figure depends on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine(device: str | torch.device | None = None) -> dict[str, Any]:
    """Platform, CPUs, torch threads and, on CUDA, the GPU's name and memory."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    out: dict[str, Any] = {
        "platform": platform.platform(), "python": sys.version.split()[0], "processor": platform.machine(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": str(device) if device is not None else None,
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   gpu_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return out


def header(benchmark: str, reference: str, device: str | torch.device | None = None) -> dict[str, Any]:
    """Print what this run measures against, the machine and the versions; return them as a dict."""
    m, v = machine(device), versions()
    where = m.get("gpu") or f"{m['cpus_usable']}/{m['cpu_count']} CPUs"
    print(f"# {benchmark}: reference = {reference}")
    print(f"# machine: {m['platform']}, {where}, device {m['device']}, torch threads {m['torch_threads']} "
          f"(OMP_NUM_THREADS={m['OMP_NUM_THREADS']})")
    print("# versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), flush=True)
    return {"benchmark": benchmark, "reference": reference, "machine": m, "versions": v}


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``), recursively.

    Walks dicts (keys kept), lists and tuples (tuples become lists, as JSON writes them); every other
    value is returned as it is. Strict JSON has no ``NaN`` / ``Infinity``, which ``json.dumps`` would
    otherwise write for a skipped figure.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike | None, head: dict[str, Any], figures: Any,
               args: argparse.Namespace | None = None) -> None:
    """Write ``head`` (from :func:`header`), the arguments and ``figures`` to ``path`` (None: nothing).

    The file is strict JSON: NaN and infinite floats (a skipped figure) become ``null``
    (:func:`finite_or_null`); objects JSON cannot hold are written as their ``str``.
    """
    if not path:
        return
    doc = {**head, "args": vars(args) if args is not None else None, "figures": figures}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(finite_or_null(doc), indent=1, default=str, allow_nan=False) + "\n")
    print(f"# figures written to {path}")
