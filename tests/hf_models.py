"""Tiny random Hugging Face models and their TransformerLens conversions, shared by the LoRA and
export tests (the reference path: transformers' own modules, TransformerLens's own weight conversion)."""

from __future__ import annotations

import tempfile

import torch


def hf_model(family: str, *, n_layers: int = 2, seed: int = 0, vocab: int = 101, **kw):
    """A random ``transformers`` model of ``family`` (llama with GQA, gpt2, neox), width 64, eval mode."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
        cls = LlamaForCausalLM
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=n_layers, n_head=4, n_positions=64, **kw)
        cfg.n_ctx = 64
        cls = GPT2LMHeadModel
    else:
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=64, rotary_pct=0.5, **kw)
        cls = GPTNeoXForCausalLM
    cfg.architectures = [cls.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def tl_model(hf, fold_ln: bool = False):
    """The TransformerLens model of a Hugging Face model (TL's own config and weight conversion)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lp

    d = tempfile.mkdtemp()
    hf.config.save_pretrained(d)
    cfg = lp.get_pretrained_model_config(d, fold_ln=fold_ln, device="cpu", dtype=torch.float32)
    cfg.tokenizer_name = None
    m = HookedTransformer(cfg)
    m.load_and_process_state_dict(lp.get_pretrained_state_dict(d, cfg, hf_model=hf), fold_ln=fold_ln,
                                  center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return m.eval()
