"""``RLConfig(sampler="hf")``: the rollouts come from :class:`~steer_lens.hf_generation.HFSampler`.

That the HF sampler draws from the steered model's distribution is tested in
``tests/test_hf_generation.py`` (logits equal at every step to 1e-4). Here: the trainer really uses it
(a rollout's tokens equal the sampler's own for the rollout's seed, and differ from the TransformerLens
sampler's), and what the HF sampler cannot express is refused before any step.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens.errors import ConfigError
from steer_lens.hf_generation import HFSampler
from steer_lens.train.rl.rollout import sample_shard

V = 53


def _steered(**kw):
    hf = hf_model("llama", n_layers=2, seed=0, vocab=V)
    g = torch.Generator().manual_seed(1)
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    return hf, sl.SteeredTransformer(tl_model(hf), hooks=hooks, init={h: torch.randn(64, generator=g) for h in hooks}, **kw)


def _prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, V, (5,), generator=g) for _ in range(4)]


def test_the_rollouts_are_the_hf_samplers_own():
    hf, steered = _steered()
    HFSampler(steered, hf_model=hf)  # the HF model this TL model came from; later samplers reuse it
    items = _prompts()
    cfg = sl.train.RLConfig(sampler="hf", group_size=2, prompts_per_step=2, max_new_tokens=6)
    got = sample_shard(steered, items, cfg, seed=11, lo=1, hi=3)
    toks = torch.stack(items)
    want = HFSampler(steered).sample_tokens(
        toks[1:3], torch.ones_like(toks[1:3]), None, 6, do_sample=True, seed=12, stop_at_eos=True)
    assert torch.equal(got.tokens, want.tokens)
    tl = sample_shard(steered, items, sl.train.RLConfig(group_size=2, prompts_per_step=2, max_new_tokens=6),
                      seed=11, lo=1, hi=3)
    assert not torch.equal(got.tokens, tl.tokens)  # another sampler, another draw


def test_sampler_names_and_what_hf_cannot_sample_are_refused_before_any_step():
    with pytest.raises(ConfigError, match="sampler"):
        sl.train.RLConfig(sampler="vllm")
    _, steered = _steered(positions="prompt")
    before = {h: v.detach().clone() for h, v in steered.vectors.items()}
    cfg = sl.train.RLConfig(sampler="hf", group_size=2, prompts_per_step=2, max_new_tokens=4, steps=1)
    with pytest.raises(ConfigError, match="positions"):
        sl.train.rl(steered, torch.stack(_prompts()), lambda p, c: [1.0] * len(c), cfg)
    assert all(torch.equal(before[h], v) for h, v in steered.vectors.items())
