"""No weight copies in a steered training forward (steer_lens.hooks.shared_weights).

References: closed forms — inside the context the transpose of a 2-D parameter is returned as it is
(same memory), anything else is copied as usual; a steered training forward of a gated-MLP model
holds for its backward exactly the bytes of ``W_gate``, ``W_in``, ``W_out`` (of the blocks the backward
runs through) and ``W_U`` less than the
same forward run on TransformerLens's own path (which copies those weights and lets autograd keep
the copies); the logits and the vectors' gradients are those of that path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def test_transpose_of_a_parameter_is_not_copied_anything_else_is(tiny_model):
    from steer_lens.hooks import shared_weights

    w = tiny_model.W_U  # [d_model, d_vocab], a parameter
    x = torch.randn(3, w.shape[0], device=w.device)
    with shared_weights(tiny_model):
        shared = w.T.contiguous()
        other = torch.randn(4, 5).T.contiguous()  # not a parameter: copied
        sliced = w[:, :7].T.contiguous()  # not the plain transpose of a parameter: copied
        out = F.linear(x, shared)
    assert shared.data_ptr() == w.data_ptr() and not shared.is_contiguous()
    assert other.is_contiguous() and sliced.is_contiguous() and sliced.data_ptr() != w.data_ptr()
    copied = w.T.contiguous()  # outside the context: TransformerLens's copy
    assert copied.data_ptr() != w.data_ptr() and copied.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, copied), rtol=1e-6, atol=1e-6)


def _held_forward(steered, tokens, own_path: bool):
    """(bytes held for the backward, logits, vector gradients) of a training forward + loss."""
    from steer_lens.train.recompute import HeldMemory

    model = steered.model
    with HeldMemory(model) as held:
        if own_path:  # the steered call: shared_weights while gradients are recorded
            logits = steered(tokens, grad=True)
        else:  # the same hooks and frozen weights, TransformerLens's forward as it is
            with steered.gradients(), steered.steering():
                logits = model(tokens)
        loss = logits.log_softmax(-1)[..., 3].mean()
    loss.backward()
    grads = [p.grad.clone() for p in steered.vectors.parameters()]
    steered.vectors.zero_grad(set_to_none=True)
    return held.bytes, logits.detach(), grads


def test_training_forward_keeps_no_weight_copies(device):
    import steer_lens as sl

    model = sl.random_model("llama", n_layers=3, d_model=32, n_heads=4, d_vocab=300, n_ctx=32, seed=3, device=device)
    hooks = [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    steered = sl.SteeredTransformer(model, hooks, init="random", init_norm=1.0, seed=1)
    tokens = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0)).to(steered.device)
    held_own, logits_own, grads_own = _held_forward(steered, tokens, own_path=True)
    held_tl, logits_tl, grads_tl = _held_forward(steered, tokens, own_path=False)
    # the backward runs through the MLPs after the first vector (block 0's MLP output is where it is
    # added: its weights are not on the gradient's path) and the unembedding
    weights = [model.W_U] + [getattr(b.mlp, n) for b in model.blocks[1:] for n in ("W_gate", "W_in", "W_out")]
    copies = sum(w.numel() * w.element_size() for w in weights)
    assert held_tl - held_own == copies, (held_tl, held_own, copies)
    torch.testing.assert_close(logits_own, logits_tl, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads_own, grads_tl, strict=True):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
