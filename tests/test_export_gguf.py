"""llama.cpp control vectors: export, import, and the mapping to llama.cpp's block outputs.

References: repeng's ``ControlVector.export_gguf`` (vgel/repeng, repeng/extract.py), transcribed below
and run on the same directions (the bytes must be identical); TransformerLens's own hooks for what
llama.cpp does (``direction.N`` added to the output of block N, i.e. ``blocks.N.hook_resid_post``).
Not here yet: an end-to-end run in llama.cpp itself (llama-cpp-python is not installed on this
machine; the issue's check needs it built from source).
"""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import ConfigError, IncompatibleVectorError, ShapeMismatchError

gguf = pytest.importorskip("gguf")


def _repeng_export_gguf(path, model_type: str, directions: dict) -> None:
    """repeng 0.4's ``ControlVector.export_gguf``, transcribed (vgel/repeng repeng/extract.py)."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def model():
    return sl.random_model("llama", n_layers=4, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=5)


def _vec(seed: int, d: int = 32) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_file_is_byte_identical_to_repengs(model, tmp_path):
    hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    init = {h: _vec(i) for i, h in enumerate(hooks)}
    steered = sl.SteeredTransformer(model, hooks=hooks, init=init, scale=1.5)
    ours = sl.export.export(steered, tmp_path / "ours.gguf", format="gguf", model_hint="llama")
    ref = tmp_path / "repeng.gguf"
    _repeng_export_gguf(ref, "llama", {1: (1.5 * init[hooks[0]]).numpy(), 3: (1.5 * init[hooks[1]]).numpy()})
    assert ours.read_bytes() == ref.read_bytes()


def test_mapping_to_block_outputs_and_round_trip(model, tmp_path):
    """resid_post L -> direction.L, resid_pre L -> direction.(L-1), mlp_out L -> direction.L (summed per
    block); the imported wrapper (vectors at hook_resid_post, where llama.cpp adds them) steers the model
    as the original does."""
    hooks = ["blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.3.hook_resid_post"]
    init = {h: _vec(10 + i) for i, h in enumerate(hooks)}
    steered = sl.SteeredTransformer(model, hooks=hooks, init=init)
    dirs = sl.export.control_vector_directions(steered)
    assert sorted(dirs) == [1, 3]
    torch.testing.assert_close(dirs[1], init[hooks[0]] + init[hooks[1]])  # both land on block 1's output
    torch.testing.assert_close(dirs[3], init[hooks[2]])
    path = sl.export.export_control_vector(steered, tmp_path / "v.gguf")
    back = sl.export.import_control_vector(path, model)
    assert back.hook_names == ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
    assert back.training_config["model_hint"] == "llama"
    toks = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(toks), steered(toks), atol=1e-5, rtol=0)
    # llama.cpp's rule by hand: add direction.N to the output of block N with a TransformerLens hook
    hand = [(f"blocks.{n}.hook_resid_post", lambda act, hook, v=v: act + v) for n, v in dirs.items()]
    torch.testing.assert_close(model.run_with_hooks(toks, fwd_hooks=hand), steered(toks), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "hooks,kw,match",
    [
        (["blocks.0.hook_resid_post"], {}, "blocks 1..3"),
        (["blocks.1.hook_resid_pre"], {}, "blocks 1..3"),
        (["blocks.2.hook_attn_out"], {}, "format='hf'"),
        (["blocks.2.hook_resid_post"], {"positions": "prompt"}, "every position"),
    ],
    ids=["block0", "resid_pre1", "attn_out", "positions"],
)
def test_what_llama_cpp_cannot_express_is_refused(model, tmp_path, hooks, kw, match):
    steered = sl.SteeredTransformer(model, hooks=hooks, init="random", init_norm=1.0, seed=0, **kw)
    with pytest.raises(ConfigError, match=match):
        sl.export.export(steered, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()  # nothing written


def test_token_dependent_and_per_head_vectors_are_refused(model, tmp_path):
    gated = sl.SteeredTransformer(
        model, hooks=["blocks.2.hook_resid_post"], vectors=sl.GatedVectors(["blocks.2.hook_resid_post"], 32)
    )
    with pytest.raises(ConfigError, match="token-dependent"):
        sl.export.export(gated, tmp_path / "g.gguf")
    head = sl.SteeredTransformer(model, hooks=["blocks.2.attn.hook_z"])
    with pytest.raises(ShapeMismatchError):
        sl.export.export(head, tmp_path / "h.gguf")
    with pytest.raises(ConfigError, match="format"):
        sl.export.export(head, tmp_path / "h.x", format="onnx")


def test_import_refuses_files_it_cannot_map(model, tmp_path):
    p = tmp_path / "zero.gguf"
    _repeng_export_gguf(p, "llama", {0: _vec(1).numpy()})
    with pytest.raises(IncompatibleVectorError, match=r"blocks 1\.\.3"):
        sl.export.import_control_vector(p, model)
    p = tmp_path / "wide.gguf"
    _repeng_export_gguf(p, "llama", {1: _vec(1, 48).numpy()})
    with pytest.raises(ShapeMismatchError, match="d_model is 32"):
        sl.export.import_control_vector(p, model)
    p = tmp_path / "other.gguf"
    _repeng_export_gguf(p, "mistral", {1: _vec(1).numpy()})
    with pytest.raises(IncompatibleVectorError, match="mistral"):
        sl.export.import_control_vector(p, model)
    assert sl.export.import_control_vector(p, model, allow_other_model=True).hook_names == ("blocks.1.hook_resid_post",)
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all")
    with pytest.raises(IncompatibleVectorError, match="not a readable GGUF"):
        sl.export.import_control_vector(p, model)

