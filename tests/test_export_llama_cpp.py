"""End-to-end check of the llama.cpp control-vector export with the real engine (llama-cpp-python).

The control vector that :func:`steer_lens.export.export_control_vector` writes is loaded into
llama.cpp itself (through :func:`steer_lens.export.llama_cpp.set_control_vector`, the only route
llama-cpp-python binds) and the steered log-probabilities are compared with the steered
TransformerLens model on the same weights:

* on an F32 GGUF written from the dequantised SmolLM2-135M-Instruct weights (the same values
  transformers dequantises for TransformerLens) with an F32 KV cache, the steering effect
  ``Δ = logp(steered) − logp(base)`` of llama.cpp equals TransformerLens's to 1e-4 (measured 7e-5 to
  9e-5; asserted at 1.5e-4 for other CPUs' summation orders), block by block,
  and the same direction one block off is measurably wrong;
* on the shipped Q4_1 file llama.cpp's quantised arithmetic dominates (its unsteered log-probs are
  already ~1 off), so only the correlation of the Δs is checked.

Skipped, with the reason, where llama-cpp-python is not installed (it compiles llama.cpp:
``pip install llama-cpp-python``, ~20 minutes on two cores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp): "
    "the llama.cpp end-to-end check cannot run here",
)

pytestmark = [pytest.mark.real_model, pytest.mark.cpu_only("llama-cpp-python is built for the CPU here")]

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris"
STEERED = {5: 6.0, 12: 8.0, 21: 10.0}  # block -> norm of the direction added to its output
TOL = 1.5e-4  # measured 7.4e-5 (all three) and 7.0e-5 / 8.8e-5 / 6.9e-5 (one block each): docs/export.md


def _dequantised_gguf(src: str, dst) -> None:
    """Rewrite a quantised GGUF as F32 with the ``gguf`` package (metadata copied, tensors dequantised
    with ``gguf.quants.dequantize``, the routine transformers uses to load GGUF weights)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        kind = f.types[0]
        value = int(gguf.LlamaFileType.ALL_F32) if f.name == "general.file_type" else f.contents()
        writer.add_key_value(f.name, value, kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _shipped_gguf() -> str:
    from conftest import CHAT_GGUF, CHAT_MODEL
    from huggingface_hub import hf_hub_download

    return hf_hub_download(CHAT_MODEL, CHAT_GGUF)


def _llama(path) -> object:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=1, seed=0, verbose=False,
        type_k=0, type_v=0,  # F32 KV cache: an F16 one alone moves log-probs by ~1e-2
    )


@pytest.fixture(scope="module")
def f32_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    _dequantised_gguf(_shipped_gguf(), path)
    return _llama(path)


@pytest.fixture(scope="module")
def q4_llama():
    return _llama(_shipped_gguf())


@pytest.fixture(scope="module")
def tokens(chat_model) -> list[int]:
    return chat_model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def directions(chat_model) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for block, norm in STEERED.items():
        v = torch.randn(chat_model.cfg.d_model, generator=g)
        out[block] = norm * v / v.norm()
    return out


def _llama_logprobs(llm, tokens: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(tokens)
    return torch.log_softmax(torch.tensor(np.array(llm.scores[: len(tokens)]), dtype=torch.float64), -1)


def _tl_logprobs(model, tokens: list[int], directions: dict[int, torch.Tensor]) -> torch.Tensor:
    import steer_lens as sl

    ids = torch.tensor([tokens])
    if not directions:
        logits = model(ids)
    else:
        init = {f"blocks.{b}.hook_resid_post": v for b, v in directions.items()}
        logits = sl.SteeredTransformer(model, hooks=list(init), init=init)(ids)
    return torch.log_softmax(logits[0].double(), -1)


def _delta_llama(llm, tokens, vector) -> torch.Tensor:
    from steer_lens.export.llama_cpp import clear_control_vector, set_control_vector

    clear_control_vector(llm)
    base = _llama_logprobs(llm, tokens)
    set_control_vector(llm, vector)
    steered = _llama_logprobs(llm, tokens)
    clear_control_vector(llm)
    return steered - base


def test_exported_file_steers_llama_cpp_as_transformer_lens(chat_model, f32_llama, tokens, directions, tmp_path):
    """The exported file, loaded into llama.cpp, moves its log-probs as the steered TL model moves its own."""
    import steer_lens as sl

    hooks = {"blocks.5.hook_resid_post": directions[5], "blocks.13.hook_resid_pre": directions[12],
             "blocks.21.hook_mlp_out": directions[21]}  # the three hook kinds llama.cpp can express
    steered = sl.SteeredTransformer(chat_model, hooks=list(hooks), init=hooks)
    path = sl.export.export(steered, tmp_path / "vec.gguf", format="gguf")
    got = _delta_llama(f32_llama, tokens, path)
    ids = torch.tensor([tokens])
    want = torch.log_softmax(steered(ids)[0].double(), -1) - torch.log_softmax(chat_model(ids)[0].double(), -1)
    assert want.abs().max() > 0.5  # the vector really steers
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("block", sorted(STEERED))
def test_each_block_lands_on_its_layer_and_not_a_neighbour(chat_model, f32_llama, tokens, directions, block):
    """direction.N is added to block N's output: right at N to 1e-4, clearly wrong at N - 1 and N + 1."""
    v = directions[block]
    got = _delta_llama(f32_llama, tokens, {block: v})
    assert (got - (_tl_logprobs(chat_model, tokens, {block: v}) - _tl_logprobs(chat_model, tokens, {}))).abs().max() <= TOL
    for other in (block - 1, block + 1):
        wrong = _tl_logprobs(chat_model, tokens, {other: v}) - _tl_logprobs(chat_model, tokens, {})
        assert (got - wrong).abs().max() > 100 * TOL


def test_unsteered_f32_engine_matches_transformer_lens(chat_model, f32_llama, tokens):
    """The comparison itself is sound: the two engines agree on the unsteered model (F32 weights and KV)."""
    from steer_lens.export.llama_cpp import clear_control_vector

    clear_control_vector(f32_llama)
    assert (_llama_logprobs(f32_llama, tokens) - _tl_logprobs(chat_model, tokens, {})).abs().max() <= TOL


def test_a_second_vector_replaces_the_first_in_every_block(f32_llama, tokens, directions):
    """The full zero-padded buffer leaves no stale block: vector A then vector B steers exactly as B."""
    from steer_lens.export.llama_cpp import clear_control_vector, set_control_vector

    b_only = _delta_llama(f32_llama, tokens, {12: directions[12]})
    clear_control_vector(f32_llama)
    base = _llama_logprobs(f32_llama, tokens)
    set_control_vector(f32_llama, {5: directions[5], 21: directions[21]})
    set_control_vector(f32_llama, {12: directions[12]})
    after = _llama_logprobs(f32_llama, tokens) - base
    clear_control_vector(f32_llama)
    assert (after - b_only).abs().max() <= 1e-6


def test_quantised_q4_1_file_steers_in_the_same_direction(chat_model, q4_llama, tokens, directions):
    """On the shipped Q4_1 file llama.cpp's quantised arithmetic dominates: the Δs still correlate."""
    got = _delta_llama(q4_llama, tokens, directions)
    want = _tl_logprobs(chat_model, tokens, directions) - _tl_logprobs(chat_model, tokens, {})
    corr = torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]
    assert corr > 0.85  # measured 0.916
