"""Data-parallel training of steering vectors on ``torch.distributed`` (``torchrun``, accelerate, SLURM).

:func:`~steer_lens.train.sft` and :func:`~steer_lens.train.rl` run unchanged under
``torchrun --nproc_per_node=N script.py`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). Every process holds the whole model and its
own copy of the vectors; each takes its contiguous shard of every *global* batch (SFT: examples, RL:
prompts with their whole groups of samples, so group advantages stay local); the objectives divide
their summed token losses by the token count of the **global** batch, so the shards' gradients
*add up* to the one-process gradient, and :func:`all_reduce_gradients` sums them with one
``all_reduce`` of all the vectors' gradients (a few kB) per step. Every process then takes the same
AdamW step and keeps identical vectors; only rank 0 (:func:`is_main_process`) writes checkpoints,
logs and the progress bar. This is DistributedDataParallel's arithmetic (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training") with the average replaced by a
sum over globally normalised shards, as verl does for token-mean losses (``agg_loss(...,
global_batch_size / dp_size)``, volcengine/verl ``verl/trainer/ppo/core_algos.py:1055-1058`` at
b178a3c).

**Initialisation.** :func:`init_distributed` joins the process group from the launcher's
environment (NCCL on CUDA, gloo on the CPU) and, on CUDA, makes ``cuda:LOCAL_RANK`` the current
device; it returns the device to load the model on. Call it before loading the model. ``sft`` and
``rl`` call it themselves when ``WORLD_SIZE > 1`` and no group is initialised (as accelerate and
the Hugging Face Trainer do), so a plain script works under torchrun; a group the user initialised
is used as it is. Without a launcher (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper here is
a no-op and training is exactly the one-process code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from steer_lens.errors import ConfigError

__all__ = [
    "all_reduce_gradients",
    "all_reduce_sum",
    "broadcast_parameters",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank",
    "require_shardable",
    "shard",
    "shard_range",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is rank 0, the process that writes checkpoints, logs, bars and reports."""
    return rank() == 0


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group a launcher described (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` ...).

    A no-op when a group is already initialised or ``WORLD_SIZE`` is unset or 1. Otherwise
    ``init_process_group(backend, init_method="env://")`` with ``backend`` defaulting to ``"nccl"``
    when CUDA is available and ``"gloo"`` otherwise; on CUDA ``cuda:LOCAL_RANK`` then becomes the
    current device.

    Returns:
        The device to load this process's model on: ``cuda:LOCAL_RANK`` under CUDA, else the CPU.

    Raises:
        ConfigError: ``WORLD_SIZE > 1`` but ``RANK`` or ``MASTER_ADDR`` is missing (a launcher
            that does not set the usual variables: set them or call ``init_process_group``).
    """
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if cuda:
        torch.cuda.set_device(device)
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: expected a launcher's "
            "environment (torchrun, accelerate, srun with the variables exported). Fix: launch with "
            "`torchrun --nproc_per_node=N script.py`, or call torch.distributed.init_process_group yourself."
        )
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), init_method="env://")
    return device


def shard_range(n: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous share of ``n`` items: ``[r*n//W, (r+1)*n//W)``.

    Shares differ by at most one item; every item belongs to exactly one rank, in order.
    """
    r, w = rank(), world_size()
    return r * n // w, (r + 1) * n // w


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of a global batch (:func:`shard_range`); all of it on one process."""
    lo, hi = shard_range(len(items))
    return list(items[lo:hi])


def require_shardable(n: int, field: str) -> None:
    """Check that a global batch of ``n`` items gives every process at least one.

    Raises:
        ConfigError: ``n < world_size()``.
    """
    if n < world_size():
        raise ConfigError(
            f"{field}: expected at least one item per process ({world_size()} processes), got {n}. "
            f"Fix: {field}={world_size()} or more (the global batch is split across processes)."
        )


def all_reduce_sum(values: Tensor) -> Tensor:
    """The element-wise sum of ``values`` over all processes (``values`` itself on one process).

    One ``all_reduce`` (SUM); the result is identical on every rank. Use it for quantities that
    shards contribute parts of: token counts, globally normalised partial losses, rewards placed at
    their global rows of a zero buffer.
    """
    if not is_distributed():
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], extra: Tensor | None = None,
                         *, average: bool = False) -> Tensor | None:
    """Sum (or average) the parameters' gradients over processes with one ``all_reduce``; in place.

    The gradients (a missing one counts as zero) and ``extra`` (e.g. the step's loss, to log the
    global value) are flattened into one fp32 buffer on the first parameter's device, reduced, and
    written back. ``average=False`` is for objectives whose shards normalise by the global batch
    (their gradients add up to the full-batch gradient); ``average=True`` for objectives that every
    process computes whole (the mean of equal gradients is that gradient).

    Returns:
        ``extra`` reduced the same way (``None`` without it); on one process ``extra`` as given.
    """
    params = [p for p in params if p.requires_grad]
    if not is_distributed() or not params:
        return extra
    dev = params[0].device
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().to(dev) for p in params]
    if extra is not None:
        parts.append(extra.detach().reshape(-1).float().to(dev))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat /= world_size()
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i : i + n].view_as(p).to(device=p.device, dtype=p.dtype).clone()
        i += n
    return None if extra is None else flat[i:].view_as(extra).to(extra.device)


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of ``params`` to every process (one ``broadcast`` per parameter).

    Run before the first step so that randomly initialised vectors (low-rank, gated kinds) start
    equal everywhere; a no-op on one process.
    """
    if not is_distributed():
        return
    for p in params:
        buf = p.detach().clone()
        dist.broadcast(buf, src=0)
        p.copy_(buf)
