"""steer_lens leaves the user's global random stream as it found it (issue 15, item 8).

Reference: the global RNG state (``torch.random.get_rng_state``) before and after each call; seeded
results are still reproducible (the same seed gives the same weights), by comparison of two calls.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import tl_model

import steer_lens as sl


def _unchanged(fn):
    """``fn()``, asserting that torch's and numpy's global random states did not change.

    (Python's ``random`` is not checked: under pytest a third-party call inside ``train_adapter``
    advances it; steer_lens itself never uses it.)"""
    import numpy as np

    torch.manual_seed(1234)
    before = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    out = fn()
    assert torch.equal(torch.random.get_rng_state(), before[0]), "torch's global RNG state changed"
    assert (np.random.get_state()[1] == before[1]).all(), "numpy's global RNG state changed"
    return out


def test_random_model_leaves_the_global_rng_and_is_seeded():
    a = _unchanged(lambda: sl.random_model("llama", n_layers=1, d_model=16, n_heads=2, d_vocab=23, seed=3))
    b = sl.random_model("llama", n_layers=1, d_model=16, n_heads=2, d_vocab=23, seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # same seed, same weights, whatever the global stream


def test_lora_train_and_load_leave_the_global_rng():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    cfg = transformers.LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg).eval()
    tl = tl_model(hf)
    examples = [(torch.tensor([1, 5, 6]), torch.tensor([7, 7]))] * 4
    tc = sl.lora.LoraTrainConfig(rank=1, target_modules=("down_proj",), steps=2, batch_size=2, lr=1e-2)
    res = _unchanged(lambda: sl.lora.train_adapter(hf, examples, tc))
    again = sl.lora.train_adapter(hf, examples, tc)
    torch.testing.assert_close(res.losses, again.losses, rtol=0, atol=0)  # seeded: the same run twice
    lora = _unchanged(lambda: sl.lora.load_adapter(tl, res))
    assert lora.names == ["blocks.0.mlp.W_out"]
    assert peft is not None
