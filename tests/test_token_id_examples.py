"""Token ids wherever text is accepted (issue 16 item 5): sft, heldout_loss, vector_stats, persistence.

On a model with a tokenizer the ids of a text must give bit-identical results to the text; a model
without a tokenizer must train and be analysed from ids alone."""

from __future__ import annotations

import pytest
import torch

HOOK = "blocks.1.hook_resid_pre"


def test_a_pair_of_id_tensors_is_a_pair_not_one_sequence():
    from steer_lens.train.data import is_token_ids, normalise_example

    p, c = torch.tensor([1, 5]), torch.tensor([7, 8, 9])
    assert not is_token_ids((p, c)) and is_token_ids([1, 5, 7]) and is_token_ids(p)
    prompt, completion, suppress = normalise_example((p, c), 0)
    assert prompt.tolist() == [1, 5] and completion.tolist() == [7, 8, 9] and suppress is None
    prompt, completion, _ = normalise_example([1, 5, 7], 0)
    assert prompt.tolist() == [1] and completion.tolist() == [5, 7]


# ---------------------------------------------------------------------------------------------------
# a model with a tokenizer: ids give bit-identical vectors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_sft_on_token_ids_is_bit_identical_to_sft_on_texts(real_model, sentences):
    import steer_lens as sl
    from steer_lens.train.supervised import tokenize_examples

    texts = [s for s in sentences if " dog" in s][:12]
    pairs = [("Once upon a time,", " there was a dog."), ("Tom saw", " a big dog.")]
    probe = sl.SteeredTransformer(real_model, [HOOK])
    pair_ids = [(torch.tensor(d.prompt), torch.tensor(d.completion)) for d in tokenize_examples(probe, pairs)]
    text_ids = [real_model.to_tokens(t)[0] for t in texts]
    held = [s for s in sentences if " dog" not in s][:4]
    cfg = dict(steps=12, batch_size=4, seed=3, progress=False, eval_every=5, side_effect_tokens=8)

    def train(examples, eval_texts):
        st = sl.SteeredTransformer(real_model, [HOOK])
        res = sl.train.sft(st, examples, sl.train.SFTConfig(eval_texts=eval_texts, **cfg))
        return st.vectors.direction(HOOK).detach().clone(), res

    v_text, r_text = train(texts + pairs, held)
    v_ids, r_ids = train([t.tolist() for t in text_ids[:6]] + text_ids[6:] + pair_ids,
                         [real_model.to_tokens(h)[0] for h in held])
    assert torch.equal(v_text, v_ids)
    assert torch.equal(r_text.metrics["loss"], r_ids.metrics["loss"])
    torch.testing.assert_close(r_text.metrics["heldout_loss"], r_ids.metrics["heldout_loss"], rtol=0, atol=0,
                               equal_nan=True)
    assert r_text.side_effects.completions == r_ids.side_effects.completions


@pytest.mark.real_model
def test_heldout_loss_vector_stats_and_persistence_accept_ids(real_model, sentences):
    import steer_lens as sl

    st = sl.SteeredTransformer(real_model, ["blocks.0.hook_resid_post", HOOK], init="random", init_norm=2.0, seed=0)
    texts = sentences[:6]
    ids = [real_model.to_tokens(t)[0] for t in texts]
    assert sl.train.heldout_loss(st, ids) == sl.train.heldout_loss(st, texts)
    a, b = sl.analysis.vector_stats(st, texts), sl.analysis.vector_stats(st, ids)
    assert torch.equal(a.resid_norms, b.resid_norms)
    one = sl.analysis.vector_stats(st, ids[0].tolist())  # a list of ints is one sequence
    assert torch.equal(one.resid_norms, sl.analysis.vector_stats(st, texts[0]).resid_norms)
    pa, pb = sl.analysis.persistence(st, texts), sl.analysis.persistence(st, ids)
    for field in ("cos_vector", "cos_mean_shift", "norm_ratio"):
        torch.testing.assert_close(getattr(pa, field), getattr(pb, field), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# a model without a tokenizer
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare():
    import steer_lens as sl

    model = sl.random_model("gpt2", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)
    assert getattr(model, "tokenizer", None) is None
    return model


def _sequences(n=12, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([1]), torch.randint(2, 53, (length,), generator=g)]) for _ in range(n)]


def test_model_without_tokenizer_trains_from_ids(bare):
    import steer_lens as sl
    from steer_lens.errors import ConfigError

    seqs = _sequences()
    examples = (seqs[:4] + [s.tolist() for s in seqs[4:6]] + [(s[:3], s[3:]) for s in seqs[6:9]]
                + [{"prompt": s[:2].tolist(), "completion": s[2:].tolist()} for s in seqs[9:]])
    st = sl.SteeredTransformer(bare, [HOOK])
    cfg = sl.train.SFTConfig(steps=40, batch_size=6, lr=5e-2, progress=False, eval_every=10, kl_coef=0.1,
                             kl_every=5, eval_texts=torch.stack(_sequences(4, seed=1)), side_effect_tokens=8)
    res = sl.train.sft(st, examples, cfg)
    loss = res.metrics["loss"]
    assert loss[-5:].mean() < loss[:5].mean()
    assert st.vectors.direction(HOOK).norm() > 0
    assert (~torch.isnan(res.metrics["heldout_loss"])).sum() == 5 and (~torch.isnan(res.metrics["kl"])).sum() == 8
    se = res.side_effects
    assert se.completions is None and se.kl > 0 and se.tokens.shape[0] >= 16  # the training prompts, cycled
    assert se.heldout_loss == pytest.approx(sl.train.heldout_loss(st, cfg.eval_texts), rel=1e-6)
    stats = sl.analysis.vector_stats(st, torch.stack(seqs))
    assert stats.resid_norms is not None and torch.isfinite(stats.resid_norms).all()
    pers = sl.analysis.persistence(st, seqs[:3])
    assert pers.norm_ratio[0, pers.points.index(HOOK)] == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ConfigError, match="tokenizer"):
        sl.train.sft(st, ["a text, but no tokenizer"], sl.train.SFTConfig(steps=1, progress=False))
    with pytest.raises(ConfigError, match="tokenizer"):
        sl.analysis.vector_stats(st, ["a text"])


def test_vector_stats_resid_norms_from_ids_match_a_hand_computation(bare):
    import steer_lens as sl

    st = sl.SteeredTransformer(bare, [HOOK], init="random", init_norm=1.0, seed=0)
    seqs = _sequences(3)
    stats = sl.analysis.vector_stats(st, torch.stack(seqs))
    _, cache = bare.run_with_cache(torch.stack(seqs), names_filter=[HOOK])
    ref = cache[HOOK][:, 1:].norm(dim=-1).flatten().median()  # BOS left out; equal lengths, no padding
    torch.testing.assert_close(stats.resid_norms[0], ref.float())


def test_id_prompt_with_no_tokens_is_refused(bare):
    import steer_lens as sl
    from steer_lens.errors import EmptyInputError

    st = sl.SteeredTransformer(bare, [HOOK])
    with pytest.raises(EmptyInputError, match="prompt has no tokens"):
        sl.train.sft(st, [(torch.tensor([], dtype=torch.long), torch.tensor([4, 5]))],
                     sl.train.SFTConfig(steps=1, progress=False))
    with pytest.raises(EmptyInputError):
        sl.analysis.vector_stats(st, [[]])


def test_gate_values_accept_token_ids_like_text():
    import steer_lens as sl
    from steer_lens.analysis import gate_values
    from steer_lens.vectors import GatedVectors

    model = sl.random_model("llama", n_layers=2, d_model=16, n_heads=4, d_vocab=30, n_ctx=16, seed=0)
    hook = "blocks.1.hook_resid_pre"
    vecs = GatedVectors([hook], 16, init="random", init_norm=1.0)
    with torch.no_grad():
        vecs.gate_w[hook.replace(".", "__")].normal_()
    gated = sl.SteeredTransformer(model, [hook], vectors=vecs)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    g = gate_values(gated, ids)
    ref = gate_values(gated, [ids[0].tolist()])                # a list of ints: the same sequence
    assert torch.equal(g.gates[hook], ref.gates[hook]) and g.gates[hook].shape[-1] == 5
    assert not torch.allclose(g.gates[hook], torch.ones_like(g.gates[hook]))   # the gate is not trivially 1
