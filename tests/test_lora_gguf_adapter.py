"""A peft adapter saved from a GGUF-loaded model loads back by name (``load_adapter(model, folder)``).

peft records only the repository (``base_model_name_or_path``), not the GGUF file inside it; the
folder route must reload the base from the same file the HookedTransformer came from.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real_model


def test_adapter_of_a_gguf_model_loads_from_its_folder(chat_model, tmp_path):
    import peft
    from conftest import CHAT_GGUF, CHAT_MODEL
    from transformers import AutoModelForCausalLM

    import steer_lens as sl

    hf = AutoModelForCausalLM.from_pretrained(CHAT_MODEL, gguf_file=CHAT_GGUF, dtype=torch.float32)
    del hf.config.quantization_config
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"], layers_to_transform=[3])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pm = peft.get_peft_model(hf, cfg)
        layer = pm.base_model.model.model.layers[3].mlp.down_proj
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # a non-zero update
    pm.save_pretrained(tmp_path / "adapter")
    adapter = sl.lora.load_adapter(chat_model, tmp_path / "adapter")  # no base_model: reloaded by name
    (module,) = adapter.modules
    assert torch.equal(module.A, layer.lora_A["default"].weight.detach().float())
    assert torch.equal(module.B, layer.lora_B["default"].weight.detach().float())
    assert module.scaling == pytest.approx(2.0)
