"""``steer-lens export`` / ``steer-lens import`` on the real TinyStories-656K: files round-trip.

Reference: the vectors saved before the command (the imported folder must hold the same numbers) and
the steered TransformerLens model (the HF checkpoint written by the CLI must give its logits).
"""

from __future__ import annotations

import json

import pytest
import torch

import steer_lens as sl
from steer_lens.cli import main

HOOK = "blocks.1.hook_resid_post"


def _saved(model, folder, hooks=(HOOK,), scale=1.0):
    g = torch.Generator().manual_seed(0)
    init = {h: torch.randn(int(model.cfg.d_model), generator=g) for h in hooks}
    steered = sl.SteeredTransformer(model, hooks=list(hooks), init=init, scale=scale)
    steered.save(folder)
    return steered, init


@pytest.mark.real_model
def test_gguf_export_then_import_round_trips(real_model, tmp_path, capsys):
    steered, init = _saved(real_model, tmp_path / "vec", scale=2.0)
    gguf_path = tmp_path / "v.gguf"
    assert main(["export", str(tmp_path / "vec"), "--format", "gguf", "--out", str(gguf_path)]) == 0
    assert gguf_path.exists() and "as gguf" in capsys.readouterr().out
    name = sl.model_info(real_model).name
    assert main(["import", str(gguf_path), "--model", name, "--out", str(tmp_path / "back")]) == 0
    back = sl.SteeredTransformer.load(tmp_path / "back", real_model)
    assert back.hook_names == (HOOK,)
    # the file holds scale x direction; the imported folder holds it at scale 1
    torch.testing.assert_close(back.vectors.direction(HOOK) * back.scale, 2.0 * init[HOOK])
    ids = real_model.to_tokens("Once upon a time")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), steered(ids), atol=1e-5, rtol=0)


@pytest.mark.real_model
def test_hf_export_from_the_command_line(real_model, tmp_path):
    from transformers import AutoModelForCausalLM

    hooks = ("blocks.0.hook_mlp_out", "blocks.1.hook_attn_out")
    steered, _ = _saved(real_model, tmp_path / "vec", hooks=hooks)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "vec"), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "steer_lens_export.json").read_text())["hooks"] == list(hooks)
    ids = real_model.to_tokens("Once upon a time there was a dog")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        torch.testing.assert_close(got, steered(ids), atol=1e-4, rtol=0)


def test_bad_input_is_one_message_and_exit_code_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a vector folder" in err and "Fix:" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "onnx", "--out", "x"])
