"""Tests of steer_lens.lora.state_sae: the rank-1 LoRA activation state and its BatchTopK SAE (Ward et al. 2025).

References: peft's own ``lora_A`` outputs in peft's forward pass (the state), a transcription of the paper's
``apply_batchtopk`` / ``decode`` (jnward/reasoning-lora-interp ``3_lora_sae/batch_topk_sae.py:37-71``) for
the SAE's selection, and properties (training lowers the MSE; a fixed seed gives the same SAE).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens.errors import ConfigError, EmptyInputError, NonFiniteError, ShapeMismatchError

peft = pytest.importorskip("peft")
pytest.importorskip("sae_lens")

V = 101
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_ORDER = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def _llama_pair():
    """A 2-layer random Llama (GQA, gated MLP) in Hugging Face and TransformerLens, same weights."""
    hf = hf_model("llama", n_layers=2, seed=0, vocab=V)
    return hf, tl_model(hf)


@pytest.fixture(scope="module")
def rank1():
    """(peft model, TL model, LoraAdapter): a rank-1 LoRA with random A and B on all 7 modules of 2 layers."""
    hf, tl = _llama_pair()
    torch.manual_seed(1)
    lcfg = peft.LoraConfig(r=1, lora_alpha=2, target_modules=LLAMA_TARGETS, init_lora_weights=False,
                           lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(hf), lcfg).eval()
    return pm, tl, sl.lora.load_adapter(tl, pm)


def _texts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (int(L),), generator=g) for L in torch.randint(4, 16, (n,), generator=g)]


def _sparse_data(n=4096, d_in=14, n_true=40, seed=0):
    """Vectors that are sparse sums of ``n_true`` unit directions (2-3 active per vector)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(n_true, d_in, generator=g), dim=-1)
    codes = torch.zeros(n, n_true)
    for j in range(3):
        idx = torch.randint(0, n_true, (n,), generator=g)
        codes[torch.arange(n), idx] = torch.rand(n, generator=g) * 3 + 0.5 * (j < 2)
    return codes @ D


@pytest.fixture(scope="module")
def trained():
    """A LoRA-state SAE trained a little on sparse synthetic vectors (a couple of seconds on CPU)."""
    x = _sparse_data()
    return x, sl.lora.train_lora_state_sae(x, batch_size=128, epochs=3, lr=3e-3, warmup_steps=5, seed=3)


# ---------------------------------------------------------------------------------------------------
# the activation state
# ---------------------------------------------------------------------------------------------------
def test_state_equals_peft_lora_a_outputs_in_paper_order(rank1):
    """Each column is A·x of one module as peft computes it (its lora_A output in peft's own forward),
    ordered per layer gate, up, down, q, k, v, o (2.0_extract_lora_activations.py:170-175)."""
    pm, tl, lora = rank1
    texts = _texts(5)
    outs: dict[str, list] = {}
    handles = []
    for name, mod in pm.named_modules():
        if name.endswith("lora_A.default"):
            def hook(module, args, out, name=name):
                outs.setdefault(name, []).append(out[0, :, 0].detach())
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for t in texts:
                pm(t[None])
    finally:
        for h in handles:
            h.remove()
    state = sl.lora.lora_activation_state(tl, lora, texts, batch_size=2)
    assert state.states.shape == (sum(len(t) for t in texts), 14)
    hf_cols = [f"model.layers.{layer}.{'mlp' if p in PAPER_ORDER[:3] else 'self_attn'}.{p}"
               for layer in range(2) for p in PAPER_ORDER]
    assert [lora[c].hf_name for c in state.modules] == hf_cols
    for j, hf_name in enumerate(hf_cols):
        key = next(k for k in outs if f"{hf_name}.lora_A" in k)
        ref = torch.cat(outs[key])
        assert torch.allclose(state.states[:, j], ref, atol=1e-5), hf_name
    assert state.text.tolist() == [i for i, t in enumerate(texts) for _ in range(len(t))]
    assert state.position.tolist() == [p for t in texts for p in range(len(t))]
    assert state.str_tokens[0] == tuple(str(i) for i in texts[0].tolist())
    assert list(state.to_pandas().module) == list(state.modules)
    assert state.plot().data


def test_state_drops_bos_only_with_a_tokenizer(rank1):
    _, tl, lora = rank1
    texts = [torch.tensor([1, 5, 6, 7]), torch.tensor([1, 8, 9])]
    full = sl.lora.lora_activation_state(tl, lora, texts)
    assert full.n_tokens == 7  # no tokenizer: nothing is known to be BOS

    class Tok:  # the two things the state reads from a tokenizer, plus what TransformerLens's forward reads
        bos_token_id = 1
        pad_token_id = 0
        padding_side = "right"

        def decode(self, ids):
            return f"<{ids[0]}>"

    tl.tokenizer = Tok()
    try:
        dropped = sl.lora.lora_activation_state(tl, lora, texts)
        kept = sl.lora.lora_activation_state(tl, lora, texts, keep_bos=True)
        with pytest.raises(EmptyInputError, match="BOS"):
            sl.lora.lora_activation_state(tl, lora, [torch.tensor([1])])
    finally:
        tl.tokenizer = None
    assert dropped.n_tokens == 5 and kept.n_tokens == 7
    assert dropped.position.tolist() == [1, 2, 3, 1, 2]
    assert torch.equal(dropped.states, full.states[full.position > 0])
    assert torch.equal(kept.states, full.states)
    assert dropped.str_tokens[1] == ("<1>", "<8>", "<9>")


# ---------------------------------------------------------------------------------------------------
# the SAE
# ---------------------------------------------------------------------------------------------------
def _paper_batchtopk(x, W_enc, b_enc, W_dec, b_dec, k):
    """Transcription of the paper's BatchTopKSAE.forward (batch_topk_sae.py:31-71, b_dec not subtracted)."""
    latent = x @ W_enc + b_enc
    scores = latent * W_dec.norm(dim=1)
    flat = scores.flatten()
    idx = torch.topk(flat, k=min(k * x.shape[0], flat.numel())).indices
    mask = torch.zeros_like(flat)
    mask[idx] = 1.0
    sparse = latent * mask.reshape(latent.shape)
    return sparse, sparse @ W_dec + b_dec


def _paper_weights(res):
    """The paper's parametrisation of the trained SAE (sae-lens folded ‖W_dec‖ into the encoder on saving)."""
    n = res.decoder_norms
    return res.sae.W_enc / n, res.sae.b_enc / n, res.sae.W_dec * n[:, None]


def test_batchtopk_selection_equals_paper_transcription(trained):
    """On a small batch, the SAE keeps the k·B largest pre-activation × ‖W_dec‖ scores of the whole batch
    (others zero) and reconstructs as the paper's SAE with the same weights."""
    x, res = trained
    sae = res.sae
    norms = res.decoder_norms
    assert not torch.allclose(norms, torch.ones_like(norms))  # the decoder norms did move in training
    W_enc, b_enc, W_dec = _paper_weights(res)
    batch = x[:32]
    k = res.config.k
    sparse, recon = _paper_batchtopk(batch, W_enc, b_enc, W_dec, sae.b_dec.detach(), k)
    ours = res.encode(batch, mode="batch")
    assert int((ours > 0).sum()) == k * 32  # k per token on average, chosen over the whole batch
    assert int((sparse != 0).sum()) == k * 32
    assert torch.allclose(ours, sparse * norms, atol=1e-5)  # value score = activation × ‖W_dec‖
    ours_recon = sae.decode(ours)
    assert torch.allclose(ours_recon, recon, atol=1e-4)
    per_token = (ours > 0).sum(1)
    assert per_token.min() < k < per_token.max()  # not TopK per token


def test_training_lowers_mse_and_is_seeded(trained):
    x, res = trained
    untrained = sl.lora.train_lora_state_sae(x, batch_size=128, epochs=3, lr=1e-12, warmup_steps=5, seed=3)
    assert res.mse < 0.5 * untrained.mse
    assert res.fvu < 0.5
    W_enc, b_enc, W_dec = _paper_weights(res)
    recon = torch.cat([_paper_batchtopk(c, W_enc, b_enc, W_dec, res.sae.b_dec, res.config.k)[1]
                       for c in x.split(2048)])  # the paper encodes in chunks of 2048 (3.1_collect_sae_features.py:159)
    assert torch.allclose(res.reconstruct(x), recon, atol=1e-4)
    ref_fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())  # 3.0_train_sae.py:394-398
    assert res.fvu == pytest.approx(ref_fvu, rel=1e-5)
    assert res.d_sae == 8 * 14 and res.n_training_tokens == 3 * (4096 // 128) * 128
    assert res.l0 == pytest.approx(res.config.k)  # batch mode keeps k per token on average
    thr = res.encode(x, mode="threshold")  # sae-lens's JumpReLU inference: also a good reconstruction
    assert float((x - res.sae.decode(thr)).pow(2).sum(1).mean()) < 0.5 * untrained.mse
    rng = torch.get_rng_state()
    again = sl.lora.train_lora_state_sae(x, batch_size=128, epochs=3, lr=3e-3, warmup_steps=5, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the user's RNG is left alone
    assert torch.equal(again.sae.W_dec, res.sae.W_dec) and again.mse == res.mse
    assert res.sae.cfg.metadata.lora_state_modules == [f"dim{i}" for i in range(14)]
    assert len(res.to_pandas()) == 1 and res.plot().data and "LoraStateSAE" in res._repr_html_()


def test_paper_defaults():
    """The defaults are the paper's (3_lora_sae/3.0_train_sae.py:239-244, 269-271)."""
    c = sl.lora.LoraStateSAEConfig()
    assert (c.expansion, c.k, c.aux_k_coefficient, c.lr, c.batch_size, c.epochs) == (8, 16, 1 / 32, 5e-4, 512, 1)
    assert (c.dead_tokens, c.warmup_steps, c.seed) == (1_000_000, 100, 42)


def test_sae_on_lora_state_and_top_examples(rank1):
    """End to end on a real LoRA state: top examples are the largest activations of the latent, with
    the token at their position and its context."""
    _, tl, lora = rank1
    texts = _texts(40, seed=1)
    state = sl.lora.lora_activation_state(tl, lora, texts)
    res = sl.lora.train_lora_state_sae(state, batch_size=64, k=4, warmup_steps=2, lr=1e-3)
    assert res.modules == state.modules and res.d_sae == 8 * 14
    acts = res.encode(state)
    latent = int(acts.amax(0).argmax())
    top = sl.lora.top_activating_examples(res, state, latent, n=5, window=2)
    ex = top.examples[latent]
    ref = torch.topk(acts[:, latent], 5).values
    assert [e[0] for e in ex] == pytest.approx(ref[ref > 0].tolist())
    for val, ti, pi, tok, ctx in ex:
        row = int(((state.text == ti) & (state.position == pi)).nonzero())
        assert acts[row, latent] == pytest.approx(val)
        assert tok == str(int(texts[ti][pi]))
        lo = max(0, pi - 2)
        assert ctx == "".join(str(int(t)) for t in texts[ti][lo : pi + 3])
    strs, vals = top.contexts[latent][0]
    val, ti, pi = ex[0][:3]
    lo = max(0, pi - 2)
    assert strs[pi - lo] == ex[0][3] and vals[pi - lo] == pytest.approx(val)
    for q, v in zip(range(lo, lo + len(vals)), vals, strict=True):  # the context carries each token's activation
        row = int(((state.text == ti) & (state.position == q)).nonzero())
        assert v == pytest.approx(float(acts[row, latent]))
    assert len(top.to_pandas()) == len(ex)
    thr = sl.lora.top_activating_examples(res, state, [latent], n=3, mode="threshold")
    ref = torch.topk(res.encode(state, mode="threshold")[:, latent], 3).values
    assert [e[0] for e in thr.examples[latent]] == pytest.approx(ref[ref > 0].tolist())


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs(trained, rank1):
    x, res = trained
    train = sl.lora.train_lora_state_sae
    with pytest.raises(ShapeMismatchError, match="n_tokens, n_modules"):
        train(x[0])
    with pytest.raises(NonFiniteError):
        train(torch.full((600, 3), float("nan")))
    with pytest.raises(EmptyInputError):
        train(torch.zeros(0, 3))
    with pytest.raises(ConfigError, match="batch_size"):
        train(x[:100])
    with pytest.raises(ConfigError, match="unknown"):
        train(x, top_k=3)
    with pytest.raises(ConfigError, match="k: expected a positive integer"):
        train(x, k=0)
    with pytest.raises(ConfigError, match="lr"):
        train(x, lr=float("inf"))
    with pytest.raises(ShapeMismatchError, match="14 columns"):
        res.encode(torch.zeros(4, 5))
    with pytest.raises(ConfigError, match="mode"):
        res.encode(x[:4], mode="topk")
    _, tl, lora = rank1
    state = sl.lora.lora_activation_state(tl, lora, _texts(2))
    with pytest.raises(ShapeMismatchError, match="differ"):
        res.encode(state)  # 14 columns but not the SAE's (it was trained on dim0..dim13)
    with pytest.raises(ConfigError, match="latents"):
        sl.lora.top_activating_examples(res, state, res.d_sae)
    with pytest.raises(EmptyInputError):
        sl.lora.lora_activation_state(tl, lora, [])
