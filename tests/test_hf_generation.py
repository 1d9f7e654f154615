"""HFSampler: steered sampling with transformers' ``generate`` (issue 19, goal P3).

Reference: the steered TransformerLens model. The sampled continuation is teacher-forced through it
and its next-token logits must equal those ``generate`` produced at every step (<= 1e-4, fp32), on
left-padded batches, with vectors at ``resid_pre`` (embedding and block), ``mlp_out``, ``attn_out`` and
``resid_post``; the filtered scores (temperature, top-k, top-p) must equal the transcribed filter of
:func:`steer_lens.generation.pick_next_token`; and the :class:`Generation` built from HF's tokens must
equal what :func:`~steer_lens.generation.sample_tokens` returns when it draws the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
import steer_lens.generation as generation
from steer_lens.errors import ConfigError, IncompatibleVectorError
from steer_lens.hf_generation import HFSampler, generation_from_new_tokens

V = 53
HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post",
         "blocks.2.hook_resid_pre", "blocks.2.hook_resid_mid"]
REAL_HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre",
              "blocks.1.hook_resid_post"]


def _vecs(hooks, d: int, seed: int = 1, norm: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {h: norm * torch.randn(d, generator=g) for h in hooks}


def _steered(family: str, hooks=HOOKS, seed: int = 0, **kw):
    hf = hf_model(family, n_layers=3, seed=seed, vocab=V)
    if family == "neox":  # parallel attention + MLP: resid_mid does not exist as a separate stream
        hooks = [h for h in hooks if "resid_mid" not in h]
    return hf, sl.SteeredTransformer(tl_model(hf), hooks=hooks, init=_vecs(hooks, 64), **kw)


def _left_padded(batch=3, pos=7, seed=0):
    """Token ids [batch, pos] with rows 0 and 1 left-padded (pad id 0) and their mask."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, V, (batch, pos), generator=g)
    attn = torch.ones_like(toks)
    attn[0, :3], attn[1, :1] = 0, 0
    return toks.masked_fill(attn == 0, 0), attn


def _teacher_forced(steered, sequences, attn, alive):
    """The steered TL model's next-token logits [batch, new, vocab] on HF's sampled sequences."""
    plen = attn.shape[1]
    mask = torch.cat([attn, alive.long()], 1)[:, : sequences.shape[1]]
    with torch.no_grad():
        return steered(sequences, attention_mask=mask)[:, plen - 1 : -1]


def _alive(new: torch.Tensor, eos: int | None) -> torch.Tensor:
    if eos is None:
        return torch.ones_like(new, dtype=torch.bool)
    is_eos = (new == eos).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def _assert_steps_equal(steered, sampler, toks, attn, eos=None, **kw):
    out = sampler.generate_hf(toks, attn, 12, output_logits=True, return_dict_in_generate=True, **kw)
    got = torch.stack(out.logits, 1)  # [batch, new, vocab], raw logits of every step
    alive = _alive(out.sequences[:, toks.shape[1]:], eos)
    want = _teacher_forced(steered, out.sequences, attn, alive)
    assert got.shape == want.shape
    err = (got - want).abs().amax(-1)[alive]  # only the steps that sampled a kept token
    assert err.numel() > 0 and float(err.max()) <= 1e-4
    with steered.disabled(), torch.no_grad():
        base = _teacher_forced(steered, out.sequences, attn, alive)
    assert float((want - base).abs().max()) > 0.1  # the vectors change the logits
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_logits_equal_the_steered_transformer_lens_model_at_every_step(family):
    hf, steered = _steered(family, scale=1.3)
    toks, attn = _left_padded()
    _assert_steps_equal(steered, HFSampler(steered, hf), toks, attn, seed=0, stop_at_eos=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_repeated_prompts_are_prefilled_once_with_the_same_logits(family, monkeypatch):
    """Rows repeating a prompt (RL's groups; two of the three prompts left-padded): the distinct prompts but
    their last token run once into the cache, whose rows are copied; the logits of every step still equal
    the steered TransformerLens model's, and the seeded samples equal those of the unshared prefill."""
    from steer_lens import hf_generation

    hf, steered = _steered(family, scale=1.3)
    toks, attn = _left_padded()
    toks, attn = toks[[0, 0, 1, 1, 2, 2]], attn[[0, 0, 1, 1, 2, 2]]
    sampler = HFSampler(steered, hf)
    rows: list[int] = []
    handle = hf.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))
    try:
        out = _assert_steps_equal(steered, sampler, toks, attn, seed=0, stop_at_eos=False)
        shared = rows[:2]
        rows.clear()
        monkeypatch.setattr(hf_generation, "distinct_prompts", lambda t, a: None)
        ref = sampler.generate_hf(toks, attn, 12, seed=0, stop_at_eos=False)
    finally:
        handle.remove()
    assert shared == [(3, 6), (6, 1)] and rows[0] == (6, 7)  # 3 prompts x 6 tokens, then each row's last
    assert torch.equal(out.sequences, ref)


@pytest.mark.real_model
def test_real_model_logits_equal_at_every_step_with_eos(real_model):
    steered = sl.SteeredTransformer(real_model, hooks=REAL_HOOKS, init=_vecs(REAL_HOOKS, 128, norm=0.5))
    sampler = HFSampler(steered)  # loaded by the model's name
    texts = ["Once upon a time", "Tom had a red ball. One day he", "The cat"]
    toks, attn = steered.left_pad([steered.to_tokens(t) for t in texts])
    assert (attn == 0).any()
    _assert_steps_equal(steered, sampler, toks, attn, eos=steered.eos_token_id, seed=3, temperature=1.0)


def _transcribed_filter(logits, temperature, top_k, top_p):
    """pick_next_token's filter (temperature, top-k, top-p) of steer_lens/generation.py, transcribed."""
    logits = logits.float() / temperature
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    p = sorted_logits.softmax(-1)
    sorted_logits = sorted_logits.masked_fill(p.cumsum(-1) - p >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def test_filtered_distribution_equals_pick_next_tokens_filter():
    hf, steered = _steered("llama", scale=2.0)
    toks, attn = _left_padded()
    kw = dict(temperature=0.7, top_k=9, top_p=0.8)
    out = HFSampler(steered, hf).generate_hf(toks, attn, 10, seed=1, stop_at_eos=False, output_scores=True,
                                             return_dict_in_generate=True, **kw)
    scores = torch.stack(out.scores, 1)
    want = _transcribed_filter(_teacher_forced(steered, out.sequences, attn, _alive(scores[..., 0], None)), **kw)
    assert torch.equal(torch.isinf(scores), torch.isinf(want))
    kept = torch.isfinite(want)
    assert int(kept.sum(-1).min()) >= 1 and int(kept.sum(-1).max()) < 9  # both filters acted
    torch.testing.assert_close(scores[kept], want[kept], atol=1e-4, rtol=0)


def test_the_next_sample_uses_the_vectors_as_changed_in_place():
    hf, steered = _steered("llama")
    sampler = HFSampler(steered, hf)
    toks, attn = _left_padded()

    def first_logits():
        out = sampler.generate_hf(toks, attn, 1, do_sample=False, stop_at_eos=False, output_logits=True,
                                  return_dict_in_generate=True)
        return out.logits[0]

    before = first_logits()
    with torch.no_grad():  # what an optimiser step does: the same Parameters, new values
        for p in steered.vectors.parameters():
            p.add_(torch.randn_like(p))
    after = first_logits()
    with torch.no_grad():
        want = steered(toks, attention_mask=attn)[:, -1]
        base = steered.model(toks, attention_mask=attn)[:, -1]
    assert float((after - before).abs().max()) > 0.1
    torch.testing.assert_close(after, want, atol=1e-4, rtol=0)
    with steered.disabled():  # the wrapper's switches hold too
        torch.testing.assert_close(first_logits(), base, atol=1e-4, rtol=0)
    with steered.only_hooks(HOOKS[:2]), torch.no_grad():
        torch.testing.assert_close(first_logits(), steered(toks, attention_mask=attn)[:, -1], atol=1e-4, rtol=0)
    with steered.scaled(-0.5), torch.no_grad():
        torch.testing.assert_close(first_logits(), steered(toks, attention_mask=attn)[:, -1], atol=1e-4, rtol=0)
    assert not any(m._forward_hooks for m in hf.modules())  # every hook removed after each call


def test_low_rank_vectors_give_the_same_logits():
    hf = hf_model("llama", n_layers=3, seed=0, vocab=V)
    hooks = HOOKS[1:4]
    lr = sl.LowRankVectors(hooks, 64, rank=2, init=_vecs(hooks, 64, norm=3.0))
    steered = sl.SteeredTransformer(tl_model(hf), hooks=hooks, vectors=lr)
    toks, attn = _left_padded()
    _assert_steps_equal(steered, HFSampler(steered, hf), toks, attn, seed=2, stop_at_eos=False)


def _scripted(monkeypatch, new: torch.Tensor, pad: int):
    """Make sample_tokens draw ``new`` (then ``pad``) instead of sampling."""
    step = iter(range(10_000))

    def pick(logits, *args, **kwargs):
        i = next(step)
        return new[:, i] if i < new.shape[1] else torch.full((new.shape[0],), pad, dtype=torch.long)

    monkeypatch.setattr(generation, "pick_next_token", pick)


def _assert_same_generation(got, want):
    assert got.prompt_len == want.prompt_len and got.prompts == want.prompts and got.completions == want.completions
    for field in ("tokens", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("seed", range(6))
def test_generation_fields_equal_sample_tokens_for_the_same_tokens(monkeypatch, seed):
    """Property: EOS at random steps (or never), rows ending at different steps, HF's early stop."""
    g = torch.Generator().manual_seed(seed)
    eos, max_new = 5, int(torch.randint(1, 30, (1,), generator=g))
    monkeypatch.setattr(sl.SteeredTransformer, "eos_token_id", property(lambda self: eos))
    _, steered = _steered("llama")
    toks, attn = _left_padded(batch=4)
    new = torch.randint(6, V, (4, max_new), generator=g)
    ends = torch.randint(0, max_new + 6, (4,), generator=g)  # >= max_new: the row never ends
    for b, e in enumerate(ends.tolist()):
        if e < max_new:
            new[b, e] = eos
            new[b, e + 1 :] = steered.pad_token_id  # what generate writes after a row's EOS
    if bool((ends < max_new).all()):
        new = new[:, : int(ends.max()) + 1]  # generate stops when every row has ended
    _scripted(monkeypatch, new, steered.pad_token_id)
    want = generation.sample_tokens(steered, toks, attn, None, max_new, temperature=1.0, top_p=1.0, top_k=None,
                                    do_sample=True, seed=0, stop_at_eos=True, use_kv_cache=True)
    _assert_same_generation(generation_from_new_tokens(steered, toks, attn, None, new, max_new, eos), want)


@pytest.mark.real_model
def test_real_model_sample_equals_sample_tokens_drawing_the_same_tokens(real_model, monkeypatch):
    steered = sl.SteeredTransformer(real_model, hooks=REAL_HOOKS, init=_vecs(REAL_HOOKS, 128, norm=0.1))
    texts = ["Once upon a time", "Lily saw a big dog and", "The sun"]
    sampler = HFSampler(steered)
    assert HFSampler(steered).hf_model is sampler.hf_model  # loaded once per TransformerLens model
    first = sampler.sample(texts, 30, seed=0, top_k=40, stop_at_eos=False).completion_tokens
    eos = int(first[0, 3])  # a token row 0 draws at step 3 becomes EOS: rows end early, at different steps
    monkeypatch.setattr(sl.SteeredTransformer, "eos_token_id", property(lambda self: eos))
    got = sampler.sample(texts, 30, seed=0, top_k=40)
    new = got.completion_tokens
    assert not bool(got.completion_mask.all())  # some row ended
    _scripted(monkeypatch, new, steered.pad_token_id)
    want = steered.sample(texts, 30, seed=0, top_k=40)
    _assert_same_generation(got, want)


def test_a_seed_reproduces_a_sample_and_leaves_the_global_rng_alone():
    hf, steered = _steered("llama")
    sampler = HFSampler(steered, hf)
    toks, attn = _left_padded()
    state = torch.random.get_rng_state()
    a = sampler.sample_tokens(toks, attn, None, 16, seed=7, stop_at_eos=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sampler.sample_tokens(toks, attn, None, 16, seed=7, stop_at_eos=False)
    c = sampler.sample_tokens(toks, attn, None, 16, seed=8, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (3, 7 + 16) and bool(a.completion_mask.all())


@pytest.mark.parametrize(
    ("hooks", "kw", "match"),
    [
        (["blocks.1.hook_resid_post"], {"positions": "generated"}, "every position"),
        (["blocks.1.attn.hook_z"], {}, "no bias adds"),
        (["blocks.1.mlp.hook_post"], {}, "no bias adds"),
    ],
    ids=["positions", "per_head", "neurons"],
)
def test_what_the_hooks_cannot_add_is_refused_with_the_fix(hooks, kw, match):
    hf = hf_model("llama", n_layers=3, seed=0, vocab=V)
    steered = sl.SteeredTransformer(tl_model(hf), hooks=hooks, init="random", init_norm=1.0, seed=0, **kw)
    with pytest.raises(ConfigError, match=match) as e:
        HFSampler(steered, hf)
    assert "steered.sample" in str(e.value)


def test_kinds_processing_architectures_and_other_weights_are_refused():
    hf = hf_model("llama", n_layers=3, seed=0, vocab=V)
    hook = "blocks.1.hook_resid_post"
    gated = sl.SteeredTransformer(tl_model(hf), hooks=[hook], vectors=sl.GatedVectors([hook], 64))
    with pytest.raises(ConfigError, match="token-dependent"):
        HFSampler(gated, hf)
    with pytest.raises(ConfigError, match="weight processing"):
        HFSampler(sl.SteeredTransformer(tl_model(hf, fold_ln=True), hooks=[hook]), hf)
    steered = sl.SteeredTransformer(tl_model(hf), hooks=[hook])
    with pytest.raises(ConfigError, match="knows the layouts"):
        HFSampler(steered, torch.nn.Linear(2, 2))
    with pytest.raises(IncompatibleVectorError, match="embedding"):
        HFSampler(steered, hf_model("llama", n_layers=3, seed=1, vocab=V))
    with pytest.raises(IncompatibleVectorError, match="layers"):
        HFSampler(steered, hf_model("llama", n_layers=2, seed=0, vocab=V))
    with pytest.raises(ConfigError, match="temperature"):
        HFSampler(steered, hf).sample_tokens(*_left_padded(), None, 4, temperature=0.0)
