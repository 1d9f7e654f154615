"""Random-weight models of an exact Hugging Face config, for benchmarks where the real weights cannot travel.

The GPU machine receives at most 64 MiB of files, too little for SmolLM2-135M-Instruct's GGUF, so the
benchmarks build a model of its exact shape (``benchmarks/smollm2_135m_config.json``, read from the GGUF
header by transformers) with random weights there: it costs the same time as the real one. The
TransformerLens model is converted from the Hugging Face one (TransformerLens's own conversion), so both
hold the same weights and a reference run on the Hugging Face model (``generate``, peft) is comparable.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_from_config(path: str | Path, device: str, dtype: str = "float32", seed: int = 0):
    """The Hugging Face causal LM of the config JSON at ``path``, random weights (seeded), eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    cfg = AutoConfig.for_model(**spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    return hf.to(device).eval()


def tl_from_hf(hf, device: str, dtype: str = "float32"):
    """The TransformerLens model of ``hf`` (unprocessed weights, like ``steer_lens.load_model``'s default)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as lp

    with tempfile.TemporaryDirectory() as d:
        hf.config.save_pretrained(d)
        cfg = lp.get_pretrained_model_config(d, fold_ln=False, device=device, dtype=DTYPES[dtype])
        cfg.tokenizer_name = None
        model = HookedTransformer(cfg)
        state = lp.get_pretrained_state_dict(d, cfg, hf_model=hf)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.to(device).eval()


def config_models(path: str | Path, device: str, dtype: str = "float32", seed: int = 0):
    """(TransformerLens model, Hugging Face model) with the same random weights, of the config at ``path``."""
    hf = hf_from_config(path, device, dtype, seed)
    return tl_from_hf(hf, device, dtype), hf
