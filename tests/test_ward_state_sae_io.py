"""Tests of ``LoraStateSAE.save`` / ``LoraStateSAE.load`` (steer_lens.lora.state_sae).

Reference: the SAE before saving (a round trip must give the same encodings and fields) and sae-lens's own
``SAE.load_from_disk`` on the saved folder.
"""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl

pytest.importorskip("sae_lens")


def test_save_load_round_trip(tmp_path):
    from sae_lens import SAE

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 14, generator=g).relu()
    sae = sl.lora.train_lora_state_sae(x, batch_size=128, epochs=2, lr=3e-3, warmup_steps=2, k=4, seed=1)
    sae.save(tmp_path / "sae")
    back = sl.lora.LoraStateSAE.load(tmp_path / "sae")
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.encode(x, mode="threshold"), sae.encode(x, mode="threshold"))
    assert torch.equal(back.decoder_norms, sae.decoder_norms)
    for f in ("modules", "config", "mse", "fvu", "l0", "dead_latents", "seconds", "n_training_tokens"):
        assert getattr(back, f) == getattr(sae, f)
    raw = SAE.load_from_disk(str(tmp_path / "sae"))
    assert torch.equal(raw.W_dec, sae.sae.W_dec) and torch.equal(raw.threshold, sae.sae.threshold)
    with pytest.raises(FileNotFoundError):
        sl.lora.LoraStateSAE.load(tmp_path / "missing")
