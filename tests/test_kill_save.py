"""A process killed (SIGKILL) at a random moment of ``SteeredTransformer.save`` leaves a folder that loads
as exactly one of the states that were saved, never a mix (issue 15 item 1).

Reference: the two states themselves. A child process saves state A (scale 1, every entry 1) and state
B (scale 2, every entry 2) alternately into one folder as fast as it can; the parent kills it at a random
moment, loads the folder and checks that (scale, vector) is exactly A or exactly B. A mixed folder (new
tensors, old config: the defect) would give scale 2 with entries 1 or the reverse. Stale half-written
siblings of killed children are removed by the next save.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import steer_lens as sl
from steer_lens.vectors.io import remove_stale_siblings

pytestmark = pytest.mark.cpu_only("the killed training runs in a CPU child process")

CHILD = textwrap.dedent("""
    import sys, torch, steer_lens as sl
    folder = sys.argv[1]
    model = sl.random_model("gpt2", n_layers=2, d_model=64, seed=0)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    states = [sl.SteeredTransformer(model, hooks, scale=float(k)) for k in (1, 2)]
    with torch.no_grad():
        for k, s in enumerate(states, 1):
            for h in hooks:
                s.vectors[h].fill_(float(k))
    i = 0
    while True:
        states[i % 2].save(folder)
        print(i, flush=True)
        i += 1
""")


@pytest.mark.slow
def test_sigkill_during_save_leaves_exactly_one_saved_state(tmp_path):
    folder = tmp_path / "vec"
    model = sl.random_model("gpt2", n_layers=2, d_model=64, seed=0)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loaded = []
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, env=env, text=True)
        assert child.stdout.readline() != "", "the saving child failed; run CHILD by hand to see why"
        for _ in range(rng.randint(0, 30)):                 # let it overwrite the folder a random number of times
            child.stdout.readline()
        time.sleep(rng.random() * 0.02)                     # ... and stop it somewhere inside the next save
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        steered = sl.SteeredTransformer.load(folder, model)
        k = steered.scale
        for h in steered.hook_names:
            assert torch.equal(steered.vectors[h].detach(), torch.full((64,), float(k))), (k, h)
        assert k in (1.0, 2.0)
        loaded.append(k)
    assert set(os.listdir(folder)) >= {"vectors.safetensors", "config.json"}
    remove_stale_siblings(folder)                           # what the next save does first
    assert [p for p in os.listdir(tmp_path) if p != "vec"] == []
