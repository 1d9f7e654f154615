"""Hugging Face checkpoints with the vectors folded into biases (Sinii et al. 2025, bias-only steering).

Reference: the steered TransformerLens model itself. The exported folder, loaded with transformers'
``AutoModelForCausalLM.from_pretrained`` (no hooks), must give its logits (<= 1e-4, fp32) on random
Llama / GPT-2 / GPT-NeoX models built in transformers and on the real TinyStories-656K.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens.errors import ConfigError, ShapeMismatchError

V = 53
HOOKS = ["blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"]


def _hf(family: str, seed: int = 0):
    """A random 3-layer transformers model."""
    return hf_model(family, n_layers=3, seed=seed, vocab=V)


_tl = tl_model  # the TransformerLens model of a Hugging Face model


def _vecs(hooks, d: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {h: torch.randn(d, generator=g) for h in hooks}


def _ids(n=2, pos=10, vocab=V, seed=0):
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _loaded_logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_exported_checkpoint_gives_the_steered_logits(family, tmp_path):
    hf = _hf(family)
    tl = _tl(hf)
    steered = sl.SteeredTransformer(tl, hooks=HOOKS, init=_vecs(HOOKS, 64), scale=1.3)
    ids = _ids()
    with torch.no_grad():
        want, plain = steered(ids), tl(ids)
    out = sl.export.export(steered, tmp_path / "out", format="hf", hf_model=hf)
    got = _loaded_logits(out, ids)
    assert (want - plain).abs().max() > 0.1  # the vectors change the logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    manifest = json.loads((out / "steer_lens_export.json").read_text())
    assert manifest["hooks"] == HOOKS and manifest["scale"] == 1.3


def test_llama_biases_are_the_summed_vectors_and_flags_are_set(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = _hf("llama")
    steered = sl.SteeredTransformer(_tl(hf), hooks=HOOKS, init=_vecs(HOOKS, 64), scale=2.0)
    init = _vecs(HOOKS, 64)
    back = AutoModelForCausalLM.from_pretrained(sl.export.export_hf(steered, tmp_path / "o", hf_model=hf))
    assert back.config.mlp_bias and back.config.attention_bias
    layers = back.model.layers
    # resid_post of 1 and resid_pre of 2 both land on layer 1's down_proj; mlp_out 0 on layer 0's
    torch.testing.assert_close(layers[1].mlp.down_proj.bias, 2.0 * (init[HOOKS[2]] + init[HOOKS[3]]))
    torch.testing.assert_close(layers[0].mlp.down_proj.bias, 2.0 * init[HOOKS[0]])
    torch.testing.assert_close(layers[1].self_attn.o_proj.bias, 2.0 * init[HOOKS[1]])
    assert not layers[2].mlp.down_proj.bias.any() and not layers[0].self_attn.o_proj.bias.any()
    for lin in (layers[0].mlp.gate_proj, layers[0].mlp.up_proj, layers[1].self_attn.q_proj,
                layers[1].self_attn.k_proj, layers[1].self_attn.v_proj):
        assert not lin.bias.any()


@pytest.fixture(scope="module")
def llama():
    hf = _hf("llama")
    return hf, _tl(hf)


def _refused(steered, path, match, **kw):
    with pytest.raises(ConfigError, match=match):
        sl.export.export_hf(steered, path, **kw)
    assert not path.exists()


@pytest.mark.parametrize(
    "hooks,kw,match",
    [
        (["blocks.0.hook_resid_pre"], {}, "no bias adds"),
        (["hook_embed"], {}, "no bias adds"),
        (["blocks.1.attn.hook_z"], {}, "no bias adds"),
        (["blocks.1.mlp.hook_post"], {}, "no bias adds"),
        (["blocks.1.hook_resid_post"], {"positions": "prompt"}, "every position"),
    ],
    ids=["resid_pre0", "embed", "per_head", "neurons", "positions"],
)
def test_what_a_bias_cannot_express_is_refused(llama, tmp_path, hooks, kw, match):
    hf, tl = llama
    steered = sl.SteeredTransformer(tl, hooks=hooks, init="random", init_norm=1.0, seed=0, **kw)
    _refused(steered, tmp_path / "x", match, hf_model=hf)


def test_token_dependent_kinds_processed_weights_and_post_norms_are_refused(llama, tmp_path):
    hf, tl = llama
    hook = "blocks.1.hook_resid_post"
    gated = sl.SteeredTransformer(tl, hooks=[hook], vectors=sl.GatedVectors([hook], 64))
    _refused(gated, tmp_path / "g", "token-dependent", hf_model=hf)
    folded = _tl(hf, fold_ln=True)
    assert sl.model_info(folded).fold_ln
    _refused(sl.SteeredTransformer(folded, hooks=[hook]), tmp_path / "f", "weight processing", hf_model=hf)
    gemma = sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=V, n_ctx=32, seed=1,
                            use_normalization_before_and_after=True)
    _refused(sl.SteeredTransformer(gemma, hooks=[hook]), tmp_path / "n", "Gemma", hf_model=hf)


def test_architectures_without_a_bias_flag_are_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = MistralForCausalLM(cfg).eval()
    tl = sl.random_model("llama", n_layers=2, d_model=64, n_heads=4, d_vocab=V, n_ctx=32, seed=1)
    steered = sl.SteeredTransformer(tl, hooks=["blocks.1.hook_mlp_out"], init="random", init_norm=1.0, seed=0)
    _refused(steered, tmp_path / "m", "MistralConfig has no 'mlp_bias'", hf_model=hf)
    with pytest.raises(ShapeMismatchError, match="3 layers of width 64"):  # another model than the steered one
        sl.export.export_hf(steered, tmp_path / "w", hf_model=_hf("llama"))
    assert not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match="not supported"):
        sl.export.export_hf(steered, tmp_path / "b", hf_model=torch.nn.Linear(2, 2))


def test_an_existing_export_is_replaced_whole_and_other_folders_are_kept(llama, tmp_path):
    hf, tl = llama
    out = tmp_path / "out"
    first = sl.SteeredTransformer(tl, hooks=["blocks.1.hook_mlp_out"], init=_vecs(["blocks.1.hook_mlp_out"], 64))
    sl.export.export_hf(first, out, hf_model=_hf("llama"))
    (out / "stale-shard.safetensors").write_bytes(b"old")
    hooks = ["blocks.2.hook_attn_out"]
    second = sl.SteeredTransformer(tl, hooks=hooks, init=_vecs(hooks, 64, seed=3))
    sl.export.export_hf(second, out, hf_model=_hf("llama"))
    assert not (out / "stale-shard.safetensors").exists()  # nothing of the old folder is carried over
    assert json.loads((out / "steer_lens_export.json").read_text())["hooks"] == hooks
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_loaded_logits(out, ids), second(ids), atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a steer_lens export"):
        sl.export.export_hf(second, mine, hf_model=hf)
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.real_model
def test_real_tinystories_export_loads_by_name_and_matches(real_model, tmp_path):
    from transformers import AutoTokenizer

    d = int(real_model.cfg.d_model)
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    steered = sl.SteeredTransformer(real_model, hooks=hooks, init=_vecs(hooks, d), scale=0.5)
    out = sl.export.export_hf(steered, tmp_path / "ts")  # the base model loaded by its name
    ids = real_model.to_tokens(["Once upon a time there was a dog", "The cat sat"], padding_side="right")
    with torch.no_grad():
        want, plain = steered(ids), real_model(ids)
    assert (want - plain).abs().max() > 0.1
    torch.testing.assert_close(_loaded_logits(out, ids), want, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("Once upon").input_ids == \
        AutoTokenizer.from_pretrained(sl.model_info(real_model).name)("Once upon").input_ids


@pytest.mark.chat_model
@pytest.mark.slow
def test_smollm2_gguf_export_is_a_plain_llama_checkpoint(chat_model, tmp_path):
    """The GGUF model is re-read by name (dequantised), its quantizer dropped, and written as fp32
    safetensors with the GGUF file's tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hooks = ["blocks.3.hook_mlp_out", "blocks.10.hook_attn_out", "blocks.20.hook_resid_post",
             "blocks.25.hook_resid_pre"]
    steered = sl.SteeredTransformer(chat_model, hooks=hooks, init=_vecs(hooks, int(chat_model.cfg.d_model)))
    out = sl.export.export_hf(steered, tmp_path / "smol")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and getattr(hf.config, "quantization_config", None) is None
    ids = chat_model.to_tokens("Once upon a time there was a dog")
    with torch.no_grad():
        want = steered(ids)
        assert (want - chat_model(ids)).abs().max() > 0.1
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok("Hello there").input_ids == chat_model.tokenizer("Hello there").input_ids
