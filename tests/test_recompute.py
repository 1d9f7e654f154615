"""Activation recomputation over the blocks (steer_lens.train.recompute).

References: the gradients and training trajectories of the same model *without* recomputation
(the same ops run again, so they agree to float rounding), and a property for the memory: the
tensors autograd saves for the backward pass, counted with ``torch.autograd.graph.saved_tensors_hooks``
(their total ``numel``, parameters excluded) — deterministic, unlike the process's RSS.
"""

from __future__ import annotations

import threading

import pytest
import torch

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]
TOKENS = torch.tensor([[1, 5, 9, 4, 7, 2, 8, 3], [1, 6, 8, 2, 2, 9, 4, 5]])


@pytest.fixture(scope="module", params=["llama", "gpt2", "neox"])
def model3(request, device):
    import steer_lens as sl

    return sl.random_model(request.param, n_layers=3, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1,
                           device=device)


def _steered(model, hooks, positions="all"):
    import steer_lens as sl

    steered = sl.SteeredTransformer(model, hooks, positions=positions)
    for i, h in enumerate(hooks):
        steered.vectors.set_(h, torch.randn(32, generator=torch.Generator().manual_seed(i)) * 0.5)
    return steered


def _loss(steered, tokens, prompt_lengths=None):
    with steered.gradients():
        logits = steered(tokens.to(steered.device), prompt_lengths=prompt_lengths)
    lp = logits[:, :-1].log_softmax(-1).gather(-1, tokens.to(steered.device)[:, 1:, None])
    return -lp.mean()


def _grads(steered, hooks, recompute: bool | str, *, prompt_lengths=None, thread: bool = False):
    from steer_lens.train.recompute import recompute_context

    for h in hooks:
        steered.vectors[h].grad = None
    with recompute_context(steered, recompute):
        loss = _loss(steered, TOKENS, prompt_lengths)
    if thread:  # backward on another thread, as torch's autograd device thread does on CUDA
        t = threading.Thread(target=loss.backward)
        t.start()
        t.join()
    else:
        loss.backward()
    return [steered.vectors[h].grad.clone() for h in hooks]


@pytest.mark.parametrize("mode", [True, "selective"])
@pytest.mark.parametrize("hooks", [HOOKS, HOOKS[:1], HOOKS[2:]])
def test_gradients_equal_those_without_recompute(model3, hooks, mode):
    steered = _steered(model3, hooks)
    expected = _grads(steered, hooks, False)
    got = _grads(steered, hooks, mode)
    for e, g in zip(expected, got, strict=True):
        assert e.abs().max() > 1e-4  # not trivially zero
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_replays_the_position_context_and_thread(model3, mode):
    """positions="generated" reads the wrapper's context, gone by the backward; a foreign backward thread."""
    steered = _steered(model3, HOOKS, positions="generated")
    lengths = torch.tensor([3, 5])
    expected = _grads(steered, HOOKS, False, prompt_lengths=lengths)
    got = _grads(steered, HOOKS, mode, prompt_lengths=lengths, thread=True)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


def _saved_numel(model, fn) -> int:
    """Total numel of the non-parameter tensors autograd saves while ``fn()`` runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_recompute_saves_far_fewer_tensors(device):
    import steer_lens as sl
    from steer_lens.train.recompute import recompute_blocks

    model = sl.random_model("llama", n_layers=6, d_model=64, n_heads=4, d_vocab=53, n_ctx=64, seed=2, device=device)
    steered = sl.SteeredTransformer(model, ["blocks.0.hook_resid_pre"])
    tokens = torch.randint(1, 53, (4, 48), generator=torch.Generator().manual_seed(0))
    plain, loss_plain = _saved_numel(model, lambda: _loss(steered, tokens))
    with recompute_blocks(steered):
        kept, loss_rc = _saved_numel(model, lambda: _loss(steered, tokens))
    # the checkpointed blocks keep their inputs (outside the hooks' count): one residual per block
    kept += 6 * tokens.numel() * 64
    torch.testing.assert_close(loss_rc, loss_plain, rtol=0, atol=0)
    assert kept < plain / 4, (kept, plain)  # measured: 0.078 of the plain step's saved numel


def _held_and_backward_matmuls(steered, tokens, recompute):
    """(bytes held for the backward after the forward, matrix products run by the backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from steer_lens.train.recompute import HeldMemory, recompute_context

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
               torch.ops.aten.baddbmm.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in matmuls
            return func(*args, **(kwargs or {}))

    with recompute_context(steered, recompute):
        with HeldMemory(steered.model) as held:
            loss = _loss(steered, tokens)
        with Count():
            loss.backward()
    return held.bytes, Count.n


@pytest.mark.parametrize("hooks", [["blocks.0.hook_resid_pre"], [f"blocks.{i}.hook_mlp_out" for i in range(6)]])
def test_selective_recompute_keeps_the_matmuls_and_reruns_none(device, hooks):
    """Selective checkpointing holds less than none and more than full recomputation, and its backward
    runs exactly the matrix products of the plain backward (none of the forward's again); full
    recomputation's backward runs the checkpointed blocks' forward products on top."""
    import steer_lens as sl

    model = sl.random_model("llama", n_layers=6, d_model=64, n_heads=4, d_vocab=53, n_ctx=64, seed=2, device=device)
    steered = sl.SteeredTransformer(model, hooks)
    tokens = torch.randint(1, 53, (4, 48), generator=torch.Generator().manual_seed(0))
    held = {}
    backward_mm = {}
    for mode in (False, "full", "selective"):
        held[mode], backward_mm[mode] = _held_and_backward_matmuls(steered, tokens, mode)
    # measured (CPU): held 2.4 / 0.2 / 1.5 MiB (one vector), 5.9 / 0.3 / 3.6 MiB (six vectors)
    assert held["full"] < held["selective"] < 0.75 * held[False], held
    assert backward_mm["selective"] == backward_mm[False], backward_mm
    assert backward_mm["full"] > backward_mm[False], backward_mm


def test_held_memory_counts_what_stays_alive(tiny_model):
    """Closed form: a tensor kept alive is counted once (views share its storage), a freed one is not,
    parameters are not."""
    from steer_lens.train.recompute import HeldMemory

    with HeldMemory(tiny_model) as held:
        kept = torch.ones(1000, dtype=torch.float32) * 2  # 4,000 bytes, kept
        view = kept[:10]  # the same storage: not counted again
        freed = torch.ones(5000) + 1
        del freed
        w = tiny_model.W_E[:3]  # a view of a parameter: not counted
    assert held.bytes == 4000, held.bytes
    assert view.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr() and w.shape[0] == 3


def test_blocks_forward_restored_also_after_an_exception(tiny_model):
    import steer_lens as sl
    from steer_lens.train.recompute import recompute_blocks

    steered = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"])
    with recompute_blocks(steered):
        assert all("forward" in vars(b) for b in tiny_model.blocks)
    assert not any("forward" in vars(b) for b in tiny_model.blocks)
    assert "run_with_cache" not in vars(tiny_model)
    with pytest.raises(KeyError), recompute_blocks(steered):
        raise KeyError("boom")
    assert not any("forward" in vars(b) for b in tiny_model.blocks)
    assert "run_with_cache" not in vars(tiny_model)


def test_first_vector_block_and_from_block(tiny_model):
    import steer_lens as sl
    from steer_lens.train.recompute import first_vector_block, recompute_blocks

    assert first_vector_block(["blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"], 2) == 0
    assert first_vector_block(["hook_embed"], 2) == 0
    assert first_vector_block(["ln_final.hook_normalized"], 2) == 2
    steered = sl.SteeredTransformer(tiny_model, ["blocks.1.hook_resid_pre"])
    with recompute_blocks(steered):  # block 0 precedes every vector: left as it is
        assert ["forward" in vars(b) for b in tiny_model.blocks] == [False, True]
    with recompute_blocks(tiny_model, from_block=0):
        assert ["forward" in vars(b) for b in tiny_model.blocks] == [True, True]


@pytest.mark.parametrize("bad", [-1, 3, True])
def test_bad_from_block_is_a_config_error(tiny_model, bad):
    from steer_lens.errors import ConfigError
    from steer_lens.train.recompute import recompute_blocks

    with pytest.raises(ConfigError, match="from_block"), recompute_blocks(tiny_model, from_block=bad):
        pass
    assert not any("forward" in vars(b) for b in tiny_model.blocks)


def test_refusals_kv_cache_run_with_cache_nesting(tiny_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError
    from steer_lens.train.recompute import recompute_blocks

    steered = sl.SteeredTransformer(tiny_model, ["blocks.0.hook_resid_pre"])
    tokens = TOKENS.to(steered.device)
    with recompute_blocks(steered):
        with pytest.raises(ConfigError, match="key/value cache"):
            steered.generate(tokens[:1, :3], max_new_tokens=2)
        with pytest.raises(ConfigError, match="run_with_cache"):
            steered.run_with_cache(tokens)
        with pytest.raises(ConfigError, match="nested"), recompute_blocks(steered):
            pass
        assert all("forward" in vars(b) for b in tiny_model.blocks)  # the outer context is intact
        with torch.no_grad():  # no gradient: the blocks run as they are
            torch.testing.assert_close(steered(tokens), _plain(steered, tokens), rtol=0, atol=0)


def _plain(steered, tokens):
    """``steered(tokens)`` with the blocks' own ``forward`` (the context's replacements set aside)."""
    blocks = steered.model.blocks
    saved = {i: vars(b).pop("forward") for i, b in enumerate(blocks) if "forward" in vars(b)}
    try:
        return steered(tokens)
    finally:
        for i, f in saved.items():
            blocks[i].forward = f


@pytest.mark.parametrize("bad", [1, "yes", None, "Selective"])
def test_recompute_config_fields_are_validated(bad):
    from steer_lens.errors import ConfigError
    from steer_lens.train import RLConfig, SFTConfig

    # ConfigError (TypeCheckError first under jaxtyping + beartype, which checks the field's bool type)
    with pytest.raises((ConfigError, TypeError), match="recompute"):
        SFTConfig(recompute=bad)
    with pytest.raises((ConfigError, TypeError), match="recompute"):
        RLConfig(recompute=bad)


def test_recompute_modes_accepted_and_a_bad_mode_refused(tiny_model):
    from steer_lens.errors import ConfigError
    from steer_lens.train import RLConfig, SFTConfig
    from steer_lens.train.recompute import recompute_blocks

    for ok in (False, True, "full", "selective"):
        assert SFTConfig(recompute=ok).recompute == ok and RLConfig(recompute=ok).recompute == ok
    with pytest.raises(ConfigError, match="mode must be one of"), recompute_blocks(tiny_model, mode="some"):
        pass
    assert not any("forward" in vars(b) for b in tiny_model.blocks)


def _sft(model, recompute: bool | str):
    import steer_lens as sl
    from steer_lens.train import SFTConfig, sft

    steered = sl.SteeredTransformer(model, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
    examples = [([1, 5, 9], [4, 6, 7, 2]), ([1, 6], [8, 2, 2]), ([1, 7, 7, 3], [9, 4]), ([1, 2], [3, 5, 8])]
    res = sft(steered, examples, SFTConfig(steps=3, batch_size=2, lr=0.1, micro_batch_size=1, progress=False,
                                           measure_side_effects=False, recompute=recompute))
    return {h: steered.vectors[h].detach().clone() for h in steered.hook_names}, res


@pytest.mark.parametrize("mode", [True, "selective"])
def test_sft_trajectory_equals_the_plain_one(tiny_model, mode):
    vecs, res = _sft(tiny_model, False)
    vecs_rc, res_rc = _sft(tiny_model, mode)
    torch.testing.assert_close(res_rc.metrics["loss"], res.metrics["loss"],
                               rtol=1e-6, atol=1e-9)
    for h, v in vecs.items():
        assert v.abs().max() > 0
        torch.testing.assert_close(vecs_rc[h], v, rtol=1e-6, atol=1e-9)


def _rl(model, recompute: bool | str):
    import steer_lens as sl
    from steer_lens.train.rl import RLConfig, rl

    prompts = torch.tensor([[1, 5, 9], [1, 6, 8], [1, 7, 7]])
    steered = sl.SteeredTransformer(model, ["blocks.1.hook_resid_pre"])
    config = RLConfig(steps=3, group_size=2, prompts_per_step=2, max_new_tokens=5, progress=False, lr=0.1,
                      kl_coef=0.2, recompute=recompute)
    res = rl(steered, prompts, lambda p, c: torch.tensor([float(len(x)) for x in c]), config)
    return steered.vectors["blocks.1.hook_resid_pre"].detach().clone(), res


@pytest.mark.parametrize("mode", [True, "selective"])
def test_rl_trajectory_equals_the_plain_one(tiny_model, mode, monkeypatch):
    from steer_lens.train.rl import loss

    # the full forward in both runs (a recomputed run cannot share prompts through a key/value cache;
    # the shared-prompt forward agrees up to the accumulation order, tests/test_rl.py)
    monkeypatch.setattr(loss, "shared_prompt_logits", lambda *a, **k: None)
    vec, res = _rl(tiny_model, False)
    vec_rc, res_rc = _rl(tiny_model, mode)
    assert vec.abs().max() > 0
    torch.testing.assert_close(vec_rc, vec, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res_rc.metrics["loss"], res.metrics["loss"],
                               rtol=1e-6, atol=1e-9)
