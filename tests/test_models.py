"""models.matmul_layout: same values, no per-pass weight copies, weights restored."""

from __future__ import annotations

import pytest
import torch


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_matmul_layout_is_bit_identical_and_restores(tiny_model):
    import steer_lens as sl

    model = tiny_model
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    before = _weights(model)
    strides = {n: p.stride() for n, p in model.named_parameters()}
    ref = model(tokens)
    with sl.models.matmul_layout(model) as same:
        assert same is model
        out = model(tokens)
        # same values and shapes; the layout changed for the attention and unembedding weights
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert model.unembed.W_U.T.is_contiguous()
        assert model.blocks[0].attn.W_O.permute(2, 0, 1).is_contiguous()
    assert torch.equal(out, ref)  # bit-identical logits
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.stride() == strides[n], n


def test_matmul_layout_makes_tl_rearrangements_views(real_model):
    """The rearranged weights TransformerLens builds on each pass share the parameters' memory."""
    import einops

    import steer_lens as sl

    attn = real_model.blocks[0].attn  # grouped-query attention: _W_K/_W_V are the stored weights
    with sl.models.matmul_layout(real_model):
        for w in (attn.W_Q, attn._W_K, attn._W_V):
            flat = einops.rearrange(w, "head_index d_model d_head -> (head_index d_head) d_model")
            assert flat.data_ptr() == w.data_ptr()
        w_o = einops.rearrange(attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
        assert w_o.contiguous().data_ptr() == attn.W_O.data_ptr()
        w_u = real_model.unembed.W_U
        assert w_u.T.contiguous().data_ptr() == w_u.data_ptr()
        mlp = real_model.blocks[0].mlp  # GatedMLP: F.linear(x, W.T.contiguous())
        for w in (mlp.W_gate, mlp.W_in, mlp.W_out):
            assert w.T.contiguous().data_ptr() == w.data_ptr()
    mlp = real_model.blocks[0].mlp
    assert mlp.W_in.is_contiguous() and mlp.W_in.T.contiguous().data_ptr() != mlp.W_in.data_ptr()


def test_matmul_layout_restores_after_exception(tiny_model):
    import steer_lens as sl

    model = tiny_model
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), sl.models.matmul_layout(model):
        assert model.unembed.W_U.data_ptr() != ptrs["unembed.W_U"]
        raise RuntimeError("boom")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def test_matmul_layout_shared_weight_restored_once():
    """A parameter shared by two modules is re-laid once and comes back with its own strides."""
    import steer_lens as sl

    model = sl.random_model("gpt2", n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=2)
    model.blocks[1].attn.W_O = model.blocks[0].attn.W_O  # tied
    w = model.blocks[0].attn.W_O
    before, stride, ptr = w.detach().clone(), w.stride(), w.data_ptr()
    tokens = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = model(tokens)
    with sl.models.matmul_layout(model):
        assert torch.equal(model(tokens), ref)
    assert w.stride() == stride and w.data_ptr() == ptr and torch.equal(w, before)
