"""The buffer handed to ``llama_set_adapter_cvec``, against llama.cpp's reader transcribed.

``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: for ``il = 1 .. n_layer - 1``,
``off = n_embd * (il - 1)`` and block ``il`` reads ``data[off : off + n_embd]`` if ``off + n_embd <= len``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _llama_cpp_apply(data: np.ndarray, n_layer: int, n_embd: int) -> dict[int, np.ndarray]:
    """What each block of the engine holds after ``apply`` (blocks not covered: absent)."""
    out = {}
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= len(data):
            out[il] = data[off : off + n_embd]
    return out


def test_buffer_covers_every_block_and_puts_each_direction_on_its_block(tmp_path):
    from steer_lens.export.llama_cpp import control_vector_buffer

    n_layer, n_embd = 6, 4
    dirs = {2: torch.arange(4.0), 5: -torch.ones(4)}
    buf = control_vector_buffer(dirs, n_layer, n_embd, scale=0.5)
    assert buf.dtype == np.float32 and buf.shape == (n_layer * n_embd,)
    blocks = _llama_cpp_apply(buf, n_layer, n_embd)
    assert sorted(blocks) == list(range(1, n_layer))  # every block overwritten: nothing stale survives
    for il, got in blocks.items():
        want = 0.5 * dirs[il].numpy() if il in dirs else np.zeros(n_embd, np.float32)
        np.testing.assert_array_equal(got, want)


def test_buffer_from_an_exported_file_equals_the_wrappers_directions(tmp_path):
    import steer_lens as sl
    from steer_lens.export.llama_cpp import control_vector_buffer

    model = sl.random_model("llama", n_layers=3, d_model=8, n_heads=2, d_vocab=11, n_ctx=8, seed=0)
    steered = sl.SteeredTransformer(model, hooks=["blocks.1.hook_resid_post"], init="random", init_norm=2.0, seed=3)
    path = sl.export.export_control_vector(steered, tmp_path / "v.gguf")
    n_layer, n_embd = model.cfg.n_layers, model.cfg.d_model
    from_file = control_vector_buffer(path, n_layer, n_embd)
    from_wrapper = control_vector_buffer(steered, n_layer, n_embd)
    np.testing.assert_array_equal(from_file, from_wrapper)
    np.testing.assert_allclose(_llama_cpp_apply(from_file, n_layer, n_embd)[1],
                               steered.vectors["blocks.1.hook_resid_post"].detach().numpy(), rtol=0, atol=0)


def test_buffer_refuses_block_zero_past_the_end_and_wrong_width():
    from steer_lens.errors import IncompatibleVectorError, ShapeMismatchError
    from steer_lens.export.llama_cpp import control_vector_buffer

    with pytest.raises(IncompatibleVectorError, match=r"blocks 1\.\.5"):
        control_vector_buffer({0: torch.ones(4)}, 6, 4)
    with pytest.raises(IncompatibleVectorError, match=r"blocks 1\.\.5"):
        control_vector_buffer({6: torch.ones(4)}, 6, 4)
    with pytest.raises(ShapeMismatchError, match="n_embd is 4"):
        control_vector_buffer({1: torch.ones(5)}, 6, 4)
