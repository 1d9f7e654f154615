"""One process of the distributed tests (tests/test_distributed.py) and benchmark: launched by torchrun.

``python -m torch.distributed.run --nproc_per_node=N tests/distributed_worker.py sft,rl OUT [options]``
trains TinyStories-656K's vectors with ``sl.train.sft`` and/or ``sl.train.rl`` (global batch fixed
by the options, whatever N is) and writes ``OUT/<job>_rank<r>.safetensors`` (the vectors) and
``OUT/<job>_rank<r>.json`` (world size, losses, seconds) from every rank. ``--ckpt DIR`` checkpoints
into ``DIR/<job>/rank<r>`` and logs to ``DIR/<job>/log_rank<r>.jsonl``, so that a test can see which
ranks wrote; with ``--resume`` every rank resumes from ``DIR/<job>/rank0``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

MODEL = "raincandy-u/TinyStories-656K"
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
WORDS = ["The", "Once upon a time", "Lily had a big red", "One day, a little boy named Tom went to the",
         "The cat", "A girl saw a dog in the park and", "Ben", "Sue and her mom made a cake for"]
ENDINGS = [" dog ran.", " there was a dog who liked to play in the sun.", " ball.",
           " park to see the ducks and the big tree by the pond.", " sat on the mat.",
           " she smiled.", " was sad because his toy broke and he could not fix it.", " dad."]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("objective", help="comma-separated jobs: sft, rl, sft_localnorm (the mutation)")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="SFT examples / RL prompts per global batch")
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--random-config", default=None, help="JSON kwargs of sl.random_model instead of MODEL")
    return p.parse_args()


def _model(args):
    import steer_lens as sl

    if args.random_config:
        return sl.random_model(**json.loads(args.random_config))
    return sl.load_model(MODEL, device="cpu")


def _examples(model) -> tuple[list, list]:
    """SFT pairs and RL prompts of different lengths (texts, or token ids for a random model)."""
    if getattr(model, "tokenizer", None) is not None:
        return list(zip(WORDS, ENDINGS, strict=True)), WORDS
    g = torch.Generator().manual_seed(0)
    v = int(model.cfg.d_vocab)
    pairs = [(torch.randint(v, (1 + i % 3,), generator=g), torch.randint(v, (2 + 3 * (i % 4),), generator=g))
             for i in range(8)]
    return pairs, torch.randint(v, (8, 4), generator=g)


def _dog(prompts, completions):
    return torch.tensor([float(c.count("dog") + c.count("a")) for c in completions])


def _ids_reward(prompts, completions):
    return torch.tensor([float(sum(int(t) % 7 == 0 for t in c.split())) for c in completions])


def train(objective: str, model, *, steps: int, batch: int, micro: int | None = None, ckpt: str | None = None,
          log: str | None = None, resume: bool = False):
    """Train fresh vectors at ``HOOKS`` of ``model`` as every process of a run does: ``(steered, result)``.

    Absolute lr 1e-2: float32 summation order (which micro-batching and sharding change) moves the
    vectors by ~1e-7 of their size; Adam's first steps carry that to ~lr x 1e-5 (issue 17 part 2).
    """
    import steer_lens as sl
    from steer_lens.train import RLConfig, SFTConfig

    steered = sl.SteeredTransformer(model, HOOKS)
    pairs, prompts = _examples(model)
    common = dict(steps=steps, seed=3, micro_batch_size=micro, lr=1e-2, lr_units="absolute",
                  checkpoint_dir=ckpt, log_path=log, resume=resume)
    if objective == "sft":
        return steered, sl.train.sft(steered, pairs, SFTConfig(batch_size=batch, measure_side_effects=False, **common))
    reward = _dog if getattr(model, "tokenizer", None) is not None else _ids_reward
    cfg = RLConfig(prompts_per_step=batch, group_size=4, max_new_tokens=10, **common)
    return steered, sl.train.rl(steered, prompts, reward, cfg)


def _local_norm():
    """Mutation for the tests: each rank normalises by its own shard's tokens (what must not happen)."""
    from steer_lens.train import supervised

    batch_loss = supervised._batch_loss
    supervised._batch_loss = lambda s, items, obj, mb, whole=None: batch_loss(s, items, obj, mb)
    return batch_loss


def main() -> None:
    args = _args()
    from safetensors.torch import save_file

    from steer_lens.train import distributed

    distributed.init_distributed()
    r = distributed.rank()
    model = _model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for job in args.objective.split(","):  # several jobs in one launch: model loading is paid once
        objective = job.split("_")[0]
        ckpt = log = None
        if args.ckpt and job in ("sft", "rl"):
            ckpt = str(Path(args.ckpt) / job / ("rank0" if args.resume else f"rank{r}"))
            log = str(Path(args.ckpt) / job / f"log_rank{r}.jsonl")
        restore = _local_norm() if job.endswith("_localnorm") else None
        t0 = time.perf_counter()
        steered, res = train(objective, model, steps=args.steps, batch=args.batch, micro=args.micro, ckpt=ckpt,
                             log=log, resume=args.resume)
        seconds = time.perf_counter() - t0
        if restore is not None:
            from steer_lens.train import supervised

            supervised._batch_loss = restore
        save_file({h: steered.vectors[h].detach().contiguous() for h in HOOKS}, str(out / f"{job}_rank{r}.safetensors"))
        (out / f"{job}_rank{r}.json").write_text(json.dumps({
            "world_size": distributed.world_size(), "seconds": seconds, "loss": res.metrics["loss"].tolist(),
            "reward": res.metrics["reward"].tolist() if "reward" in res.metrics else None,
            "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
        }))


if __name__ == "__main__":
    main()
