"""Tests of ``SelectedVectors``: per-token selection among several vectors (Wang, Engels & Clive-Griffin 2025).

Reference: a transcription of the paper's ``SteeringHook.__call__`` (JoshEngels/OOCR-Interp, the
conditional steering-vector script of the functions task): ``hidden += cat([vecs_FD, zeros(1, D)])[fn_occ]``
on the input of layer L (TransformerLens ``blocks.L.hook_resid_pre``), with ``fn_occ[b, t] = n`` where token
``t`` belongs to an occurrence of function name ``n``, else ``-1``; applied here with plain
TransformerLens hooks on the same model. Plus closed forms of the index and properties of generation,
gradients and saving.
"""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import ConfigError, ShapeMismatchError
from steer_lens.vectors import SelectedVectors, selection_index

HOOK = "blocks.1.hook_resid_pre"
VARS = {"f": [7, 8], "g": [9]}                              # a two-token name and a one-token name


def _model():
    return sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=32, seed=3)


def _steered(model, seed=0):
    vecs = SelectedVectors([HOOK], 32, variables=VARS)
    vecs.set_(HOOK, torch.randn(2, 32, generator=torch.Generator().manual_seed(seed)))
    return sl.SteeredTransformer(model, [HOOK], vectors=vecs)


def _paper_index(tokens, names):
    # the script's find_token_pos(..., last_tok_only=False) loop, by hand
    occ = torch.full(tokens.shape, -1)
    for n, ids in enumerate(names):
        for b in range(tokens.shape[0]):
            row = tokens[b].tolist()
            for t in range(len(row) - len(ids) + 1):
                if row[t : t + len(ids)] == ids:
                    occ[b, t : t + len(ids)] = n
    return occ


def test_selection_index_closed_form():
    tokens = torch.tensor([[1, 7, 8, 3, 9, 7], [9, 9, 2, 7, 8, 8]])
    expected = torch.tensor([[-1, 0, 0, -1, 1, -1], [1, 1, -1, 0, 0, -1]])   # a lone 7 is not "f"
    assert torch.equal(selection_index(tokens, list(VARS.values())), expected)
    assert torch.equal(expected, _paper_index(tokens, list(VARS.values())))


def test_logits_equal_the_papers_hook():
    model = _model()
    steered = _steered(model)
    tokens = torch.tensor([[1, 7, 8, 3, 9, 4, 5, 9], [1, 2, 9, 7, 8, 6, 7, 3]])
    table = torch.cat([steered.vectors[HOOK].detach(), torch.zeros(1, 32)])          # dummy zero row
    occ = _paper_index(tokens, list(VARS.values()))

    def paper_hook(act, hook):
        return act + table[occ]                                                        # hidden += vecs[fn_occ]

    ref = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, paper_hook)])
    torch.testing.assert_close(steered(tokens), ref, rtol=0, atol=1e-6)
    assert not torch.allclose(ref, model(tokens))                                      # the vectors do act


def test_explicit_selection_overrides_and_is_checked():
    model = _model()
    steered = _steered(model)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    index = torch.tensor([[-1, 1, 1, -1, 0, -1]])
    table = torch.cat([steered.vectors[HOOK].detach(), torch.zeros(1, 32)])
    ref = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: act + table[index])])
    with steered.vectors.selection(index):
        torch.testing.assert_close(steered(tokens), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(steered(tokens), model(tokens), rtol=0, atol=0)       # no name: no vector
    for bad in (torch.tensor([[0, 2]]), torch.tensor([0, 1]), torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ConfigError, match="index"), steered.vectors.selection(bad):
            pass


def test_kv_cache_generation_equals_full_recompute():
    model = _model()
    steered = _steered(model)
    prompt = torch.tensor([[1, 7, 8, 3, 9, 4]])
    a = steered.sample(prompt, 8, do_sample=False, use_kv_cache=True, stop_at_eos=False)
    b = steered.sample(prompt, 8, do_sample=False, use_kv_cache=False, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens)


def test_gradient_reaches_only_the_selected_rows():
    model = _model()
    steered = _steered(model)
    tokens = torch.tensor([[1, 7, 8, 3, 4, 5]])                     # only "f" occurs
    with steered.gradients():
        steered(tokens).logsumexp(-1).sum().backward()
    grad = steered.vectors[HOOK].grad
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1], torch.zeros(32))


def test_save_load_round_trip_and_single_vector_analyses_refuse(tmp_path):
    model = _model()
    steered = _steered(model)
    steered.save(tmp_path / "v")
    back = sl.SteeredTransformer.load(tmp_path / "v", model)
    assert isinstance(back.vectors, SelectedVectors) and back.vectors.labels == ["f", "g"]
    assert torch.equal(back.vectors[HOOK], steered.vectors[HOOK])
    assert torch.equal(back.vectors.vector(HOOK, "g"), steered.vectors[HOOK][1])
    with pytest.raises(ShapeMismatchError, match="one per variable"):
        back.vectors.require_residual_width("the lens")


def test_bad_variables_are_refused():
    for bad in ({}, {"f": []}, {"f": "abc"}, {"f": [1.5]}, "abc"):
        with pytest.raises(ConfigError, match="variables"):
            SelectedVectors([HOOK], 32, variables=bad)


def test_sft_trains_the_vector_of_the_variable_present():
    model = _model()
    vecs = SelectedVectors([HOOK], 32, variables=VARS)
    steered = sl.SteeredTransformer(model, [HOOK], vectors=vecs)
    # "g" (token 9) is always followed by 5; "f" never occurs
    examples = [(torch.tensor([1, 3, 9]), torch.tensor([5])), (torch.tensor([1, 4, 4, 9]), torch.tensor([5]))]
    before = float(sl.train.heldout_loss(steered, [torch.tensor([1, 3, 9, 5])]))
    sl.train.sft(steered, examples, sl.train.SFTConfig(steps=30, lr=0.1, batch_size=2, progress=False,
                                                       measure_side_effects=False))
    after = float(sl.train.heldout_loss(steered, [torch.tensor([1, 3, 9, 5])]))
    assert after < before - 0.5
    assert torch.equal(vecs.vector(HOOK, "f"), torch.zeros(32)) and vecs.vector(HOOK, "g").norm() > 0
