"""The real chat model by name: SmolLM2-135M-Instruct from its GGUF file, and chat prompts.

References: the transformers model read from the same GGUF file (logits, greedy continuation) and the
tokenizer's own ``apply_chat_template`` (token ids).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CHAT_GGUF, CHAT_MODEL

CHATS = [
    [{"role": "user", "content": "What is 27 + 15?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Tell me a fact about dogs."}],
]


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHAT_MODEL, gguf_file=CHAT_GGUF)
    hf = AutoModelForCausalLM.from_pretrained(CHAT_MODEL, gguf_file=CHAT_GGUF, dtype=torch.float32).eval()
    return hf, tok


def _template_ids(tok, chat) -> list[int]:
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def test_gguf_chat_model_loads_by_name_and_records_its_file(chat_model):
    import steer_lens as sl

    info = sl.model_info(chat_model)
    assert (info.name, info.gguf_file, info.model_type) == (CHAT_MODEL, CHAT_GGUF, "llama")
    assert (info.n_layers, info.d_model) == (30, 576)
    assert chat_model.cfg.n_key_value_heads == 3 and chat_model.cfg.n_heads == 9
    assert info.gguf_metadata["general.architecture"] == "llama"
    assert info.gguf_metadata["tokenizer.chat_template"] is True


def test_chat_tokens_equal_apply_chat_template_with_no_doubled_bos(chat_model, hf_reference):
    import steer_lens as sl

    _, tok = hf_reference
    s = sl.SteeredTransformer(chat_model, ["blocks.29.hook_resid_post"])
    for chat in CHATS:
        ids = s.chat_tokens(chat).tolist()
        assert ids == _template_ids(tok, chat)
        assert ids[:2] != [tok.bos_token_id, tok.bos_token_id]
        assert s.chat_text(chat) == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_transformer_lens_logits_equal_transformers_on_chat_prompts(chat_model, hf_reference):
    hf, tok = hf_reference
    for chat in CHATS:
        ids = torch.tensor([_template_ids(tok, chat)])
        with torch.no_grad():
            ours = chat_model(ids)
            ref = hf(ids).logits
        assert (ours - ref).abs().max().item() < 2e-4


def test_generate_messages_equals_transformers_greedy_reply(chat_model, hf_reference):
    import steer_lens as sl

    hf, tok = hf_reference
    s = sl.SteeredTransformer(chat_model, ["blocks.10.hook_mlp_out"])  # zero vector: the base model
    chat = CHATS[0]
    reply = s.generate(messages=chat, max_new_tokens=12, do_sample=False)
    ids = torch.tensor([_template_ids(tok, chat)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert reply == tok.decode(new)
    # a list of conversations gives a list of replies; a conversation passed as prompts is the same
    both = s.generate([CHATS[0], CHATS[1]], max_new_tokens=12, do_sample=False)
    assert isinstance(both, list) and both[0] == reply


def test_chat_prompts_refused_without_a_template(real_model):
    import steer_lens as sl
    from steer_lens.errors import ConfigError

    s = sl.SteeredTransformer(real_model, ["blocks.1.hook_resid_pre"])
    with pytest.raises(ConfigError, match="chat template"):
        s.generate(messages=CHATS[0], max_new_tokens=2)
    with pytest.raises(ConfigError, match="exactly one of"):
        s.generate("Once", messages=CHATS[0])


def test_missing_gguf_file_is_named(monkeypatch):
    import steer_lens as sl
    from steer_lens.errors import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match=r"nope\.gguf"):
        sl.load_model(CHAT_MODEL, gguf_file="nope.gguf", device="cpu")
