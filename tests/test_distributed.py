"""Data-parallel training on torch.distributed (issue 17 part 2): 2 gloo processes equal 1 process.

Each test launches ``torchrun`` (``python -m torch.distributed.run --nproc_per_node=2``) on
``tests/distributed_worker.py`` and compares the vectors with a one-process run of the same global
batch, computed here in the test process with the same settings (``distributed_worker.train``). The
examples of the two ranks' shards have different numbers of target / generated tokens, so a rank
that normalised its loss by its own tokens would be caught (the mutation test checks that it is).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real_model,
              pytest.mark.cpu_only("torchrun children run gloo on the CPU; NCCL on GPUs is not tested here")]

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TOL = 1e-6  # max |difference| of the vectors, 2 processes vs 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str) -> dict[str, list[dict]]:
    """Run the worker's jobs on 2 gloo processes; ``{job: [rank 0's, rank 1's]}`` JSON and vectors."""
    jobs = args[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(WORKER), jobs, str(out), *args[1:]]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    return {job: [{**json.loads((out / f"{job}_rank{r}.json").read_text()), "stderr": proc.stderr,
                   "vectors": load_file(str(out / f"{job}_rank{r}.safetensors"))} for r in range(2)]
            for job in jobs.split(",")}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch of 2 processes: SFT (micro-batches of 1) and RLOO (micro-batches of 3) with
    checkpoints, 3 steps of a global batch of 4 each, and the SFT mutation (per-rank normalisation)."""
    tmp = tmp_path_factory.mktemp("dist")
    runs = _torchrun(tmp / "out", "sft,rl,sft_localnorm", "--steps", "3", "--batch", "4", "--micro", "1",
                     "--ckpt", str(tmp / "ck"))
    return tmp, runs


def _max_diff(vectors: dict, steered) -> float:
    return max(float((vectors[h] - steered.vectors[h].detach()).abs().max()) for h in vectors)


@pytest.fixture(scope="module")
def sft_runs(launched, real_model):
    """The 2-process SFT run and its 1-process twin (same global batch, seeds and lr)."""
    import distributed_worker as w

    tmp, runs = launched
    one, res = w.train("sft", real_model, steps=3, batch=4)
    return tmp, runs["sft"], one, res


def test_two_process_sft_equals_one_process(sft_runs):
    import distributed_worker as w

    _, ranks, one, res = sft_runs
    from steer_lens.train.data import epoch_order

    pairs, _ = w._examples(one.model)
    order = epoch_order(len(pairs), 12, 3)  # the runs' data order (seed 3); rank 0 takes 2 of each 4
    tokens = [[len(one.to_tokens(pairs[i][1], prepend_bos=False)) for i in order[s:s + 4]] for s in (0, 4, 8)]
    assert all(sum(t[:2]) != sum(t[2:]) for t in tokens)  # the shards' target-token counts differ at every step
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert _max_diff(ranks[0]["vectors"], one) <= TOL
    for h in w.HOOKS:  # every process ends with the very same vectors
        assert torch.equal(ranks[0]["vectors"][h], ranks[1]["vectors"][h])
        assert float(one.vectors[h].detach().norm()) > 1e-3  # they moved
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), res.metrics["loss"], rtol=1e-6, atol=1e-6)


def test_only_rank_zero_writes_checkpoints_logs_and_bars(sft_runs):
    tmp, ranks, _, _ = sft_runs
    for job in ("sft", "rl"):
        assert (tmp / "ck" / job / "rank0" / "latest.json").exists()
        assert not (tmp / "ck" / job / "rank1").exists()
        assert (tmp / "ck" / job / "log_rank0.jsonl").read_text().count("\n") == 3
        assert not (tmp / "ck" / job / "log_rank1.jsonl").exists()
    assert ranks[0]["stderr"].count("sft:   0%") == 2  # one bar per SFT job (sft, sft_localnorm): rank 0 only


def test_one_process_resumes_a_two_process_checkpoint(sft_runs, real_model):
    import distributed_worker as w

    tmp, _, _, _ = sft_runs
    uninterrupted, _ = w.train("sft", real_model, steps=5, batch=4)
    resumed, res = w.train("sft", real_model, steps=5, batch=4, ckpt=str(tmp / "ck" / "sft" / "rank0"), resume=True)
    assert res.steps == 5
    assert _max_diff({h: uninterrupted.vectors[h].detach() for h in w.HOOKS}, resumed) <= TOL


def test_per_rank_normalisation_would_be_caught(launched, sft_runs):
    """Mutation: each rank divides by its own shard's tokens; the vectors then leave the tolerance."""
    _, runs = launched
    _, _, one, _ = sft_runs
    assert _max_diff(runs["sft_localnorm"][0]["vectors"], one) > 100 * TOL


def test_two_process_rloo_equals_one_process(launched, real_model):
    import distributed_worker as w

    tmp, runs = launched
    ranks = runs["rl"]
    one, res = w.train("rl", real_model, steps=3, batch=4)
    torch.testing.assert_close(torch.tensor(ranks[0]["reward"]), res.metrics["reward"], rtol=0, atol=1e-6)  # same samples
    assert _max_diff(ranks[0]["vectors"], one) <= TOL
    for h in w.HOOKS:
        assert torch.equal(ranks[0]["vectors"][h], ranks[1]["vectors"][h])
    # the 2-process RL checkpoint resumed on 1 process continues as an uninterrupted run
    uninterrupted, _ = w.train("rl", real_model, steps=5, batch=4)
    resumed, _ = w.train("rl", real_model, steps=5, batch=4, ckpt=str(tmp / "ck" / "rl" / "rank0"), resume=True)
    assert _max_diff({h: uninterrupted.vectors[h].detach() for h in w.HOOKS}, resumed) <= TOL


def test_shard_sampling_draws_the_whole_batch_tokens():
    """``pick_next_token(rows=...)``: a shard's rows get the whole batch's draws; the race equals multinomial."""
    from steer_lens.generation import pick_next_token

    probs = torch.rand(6, 50, generator=torch.Generator().manual_seed(0)).softmax(-1)
    logits = probs.log()
    whole = pick_next_token(logits, True, 1.0, 1.0, None, torch.Generator().manual_seed(5))
    ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5))[:, 0]  # torch's own sampler
    assert torch.equal(whole, ref)
    part = pick_next_token(logits[2:5], True, 1.0, 1.0, None, torch.Generator().manual_seed(5), rows=(2, 6))
    assert torch.equal(part, whole[2:5])


def test_helpers_on_one_process():
    from steer_lens.errors import ConfigError
    from steer_lens.train import distributed as d

    assert (d.rank(), d.world_size(), d.is_main_process(), d.is_distributed()) == (0, 1, True, False)
    assert d.shard(list(range(5))) == [0, 1, 2, 3, 4] and d.shard_range(5) == (0, 5)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert d.all_reduce_gradients([p], torch.tensor(1.5)) == 1.5 and torch.equal(p.grad, torch.full((3,), 2.0))
    d.require_shardable(1, "batch_size")
    with pytest.raises(ConfigError, match="batch_size"):
        d.require_shardable(0, "batch_size")
