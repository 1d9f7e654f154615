"""Issue 16 ("the first hour of a researcher"), items 9-12: what a TransformerLens user trips over.

* 9: inference calls on a SteeredTransformer record no autograd graph (as a frozen TransformerLens
  model), and ``steered.gradients()`` / ``grad=True`` give the gradient a hand-added leaf gets;
* 10: ``steer-lens train rl --reward module:function`` (or ``file.py:function``), and a progress bar
  of at most four fields with every metric in ``metrics.jsonl``;
* 11: short reprs (no tensors, no whole peft config) and a dict-like vector lens;
* 12: ``sl.lora.train_adapter`` accepts the HookedTransformer it will be compared on.

References: TransformerLens's ``run_with_hooks`` with the vector added by hand (values and gradients),
the reward function itself, the run's own JSONL log, training from the hub name (bit-identical).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from hf_models import hf_model, tl_model

import steer_lens as sl
from steer_lens.errors import ConfigError

HOOK = "blocks.1.hook_resid_pre"
REAL = "raincandy-u/TinyStories-656K"


def _tokens(model, batch=2, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (batch, pos), generator=g)


def _tensors(obj):
    """Every tensor held by a result (dataclass fields, dicts, lists, one level of nested results)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


@pytest.fixture
def trainable_model(tiny_model):
    """The tiny model with every parameter requiring grad (TransformerLens's default), restored after."""
    flags = [p.requires_grad for p in tiny_model.parameters()]
    for p in tiny_model.parameters():
        p.requires_grad_(True)
    yield tiny_model
    for p, f in zip(tiny_model.parameters(), flags, strict=True):
        p.requires_grad_(f)


# ---------------------------------------------------------------------------------------------------
# item 9: no graph outside training; gradients when asked
# ---------------------------------------------------------------------------------------------------
def test_inference_calls_record_no_graph(trainable_model):
    model = trainable_model
    steered = sl.SteeredTransformer(model, [HOOK, "blocks.0.attn.hook_z"], init="random", init_norm=2.0, seed=0)
    toks = _tokens(model)
    assert torch.is_grad_enabled()  # a notebook's default
    logits = steered(toks)
    out, cache = steered.run_with_cache(toks)
    hooked = steered.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: a)])
    gen = steered.generate(toks, 3, do_sample=False)
    lens = sl.lens.vector_logit_lens(sl.SteeredTransformer(model, [HOOK], init="random", init_norm=1.0, seed=1), k=3)
    layer = sl.lens.layer_logit_lens(steered, toks[0])
    shift = sl.analysis.generation_shift(steered, toks[:1], max_new_tokens=3, n_samples=2)
    produced = [logits, out, hooked, gen, *cache.cache_dict.values(), *_tensors(lens), *_tensors(layer),
                *_tensors(shift)]
    assert len(produced) > 10
    assert not any(t.requires_grad or t.grad_fn is not None for t in produced)
    # the values are unchanged: the vectors added by hand with TransformerLens's run_with_hooks
    v = {h: steered.vectors[h].detach().clone() for h in steered.hook_names}
    with torch.no_grad():
        ref = model.run_with_hooks(toks, fwd_hooks=[(h, lambda a, hook: a + v[hook.name]) for h in v])
    torch.testing.assert_close(logits, ref)
    z = "blocks.0.attn.hook_z"
    with torch.no_grad(), model.hooks(fwd_hooks=[(z, lambda a, hook: a + v[z])]):
        _, by_hand = model.run_with_cache(toks)
    torch.testing.assert_close(cache[HOOK], by_hand[HOOK] + v[HOOK])  # the cache holds the steered value
    # nothing reached the model or the vectors
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in steered.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the user's flags are as they were


def _loss(logits):
    return logits.log_softmax(-1)[:, -1, 3].sum() + 0.1 * logits.logsumexp(-1).sum()


def test_gradients_context_gives_the_hand_computed_gradient(tiny_model):
    steered = sl.SteeredTransformer(tiny_model, [HOOK], init="random", init_norm=2.0, seed=3)
    toks = _tokens(tiny_model)
    # reference: a leaf added by hand through TransformerLens's own hooks
    leaf = steered.vectors[HOOK].detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_loss(tiny_model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: a + leaf)])),
                                 [leaf])
    assert ref.abs().max() > 1e-3
    vec = steered.vectors[HOOK]
    with steered.gradients():
        assert steered.records_gradients
        _loss(steered(toks)).backward()
    assert not steered.records_gradients
    torch.testing.assert_close(vec.grad, ref, rtol=1e-5, atol=1e-6)
    vec.grad = None
    _loss(steered(toks, grad=True)).backward()  # the one-call form
    torch.testing.assert_close(vec.grad, ref, rtol=1e-5, atol=1e-6)
    vec.grad = None
    out, _ = steered.run_with_cache(toks, grad=True)
    _loss(out).backward()
    torch.testing.assert_close(vec.grad, ref, rtol=1e-5, atol=1e-6)
    # torch's switches still win inside the context; enabled=False turns an outer one off
    with steered.gradients(), torch.no_grad():
        assert not steered(toks).requires_grad
    with steered.gradients(), steered.gradients(enabled=False):
        assert not steered(toks).requires_grad


def test_gradient_through_a_user_leaf_outside_the_context(tiny_model):
    """Attribution-style calls (a hook makes a leaf) get the bare model's gradient with the vector added by hand."""
    steered = sl.SteeredTransformer(tiny_model, [HOOK], init="random", init_norm=2.0, seed=4)
    toks = _tokens(tiny_model)
    v = steered.vectors[HOOK].detach().clone()
    site = "blocks.0.hook_resid_post"

    def grad_at(run, extra):
        leaves = {}

        def make_leaf(a, hook):
            leaves["x"] = a.detach().requires_grad_(True)
            return leaves["x"]

        out = run(toks, fwd_hooks=[(site, make_leaf), *extra])
        return torch.autograd.grad(_loss(out), [leaves["x"]])[0]

    ours = grad_at(steered.run_with_hooks, [])
    ref = grad_at(tiny_model.run_with_hooks, [(HOOK, lambda a, hook: a + v)])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ref.abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# item 10: Python rewards on the command line; a short progress bar
# ---------------------------------------------------------------------------------------------------
REWARD_FILE = '''
import torch

CALLS = []


def quarter(prompts, completions):
    CALLS.append(len(completions))
    return torch.full((len(completions),), 0.25)


class Scorer:
    def score(self, prompts, completions):
        return [float("dog" in c) for c in completions]


SCORER = Scorer()
NOT_CALLABLE = 3
'''


def test_load_reward_from_a_file_and_a_module(tmp_path, monkeypatch):
    from steer_lens.cli_rl import load_reward
    from steer_lens.train.rewards import contains, regex

    path = tmp_path / "my_rewards_i16.py"
    path.write_text(REWARD_FILE)
    fn = load_reward(f"{path}:quarter")
    assert torch.equal(fn(["p", "p"], ["a", "b"]), torch.tensor([0.25, 0.25]))
    assert fn.__name__ == "quarter" and fn.__module__ == "steer_lens_reward_my_rewards_i16"
    assert load_reward(f"{path}:SCORER.score")(["p", "p"], ["a dog", "a cat"]) == [1.0, 0.0]
    # a dotted module name, importable from the current directory (as `uvicorn module:app`)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards_i16", raising=False)
    mod_fn = load_reward("my_rewards_i16:quarter")
    assert sys.modules["my_rewards_i16"].quarter is mod_fn
    # the built-ins still parse as before, colons in their argument included
    assert load_reward("contains:dog") == contains("dog")
    assert load_reward("regex:a:b") == regex("a:b")


def test_load_reward_errors_name_the_problem(tmp_path):
    from steer_lens.cli_rl import load_reward

    path = tmp_path / "rewards_i16_err.py"
    path.write_text(REWARD_FILE)
    bad = tmp_path / "broken_i16.py"
    bad.write_text("import not_a_module_i16\n")
    cases = {
        "no_such_module_i16:fn": "could not import 'no_such_module_i16'.*ModuleNotFoundError",
        f"{tmp_path / 'missing.py'}:fn": "does not exist",
        f"{bad}:fn": "could not import.*not_a_module_i16",
        f"{path}:nope": "has no attribute 'nope'",
        f"{path}:NOT_CALLABLE": "is a int, not a reward function",
        f"{path}:Scorer": "is a class",
        "nokind": "expected KIND:ARG",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_reward(spec)
    assert "steer_lens_reward_broken_i16" not in sys.modules


def test_progress_bar_shows_four_fields_and_the_log_keeps_all(tmp_path, monkeypatch):
    import tqdm.auto

    from steer_lens.train.loop import OptimConfig, progress_fields, run_loop
    from steer_lens.train.trainable import ParamTrainable

    shown = []

    class Bar:  # records what run_loop puts on the bar
        def __init__(self, *args, **kwargs):
            pass

        def set_postfix(self, fields, refresh=True):
            shown.append(dict(fields))

        def update(self, n):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    names = ["reward", "reward_std", "kl", "entropy", "pg_loss", "clip_frac", "completion_tokens",
             "tokens_per_s", "sample_s"]

    def step_fn(step):
        m = {n: torch.tensor(float(i + step)) for i, n in enumerate(names)}
        if step % 2 == 0:
            m["heldout_loss"] = torch.tensor(10.0 + step)
        return (w ** 2).sum(), m

    log = tmp_path / "metrics.jsonl"
    run_loop(ParamTrainable([("w", w)]), step_fn, OptimConfig(steps=3, lr=0.1, lr_units="absolute", log_path=str(log)),
             resid_rms={})
    assert len(shown) == 3
    assert all(list(f) == ["loss", "reward", "kl", "heldout_loss"] for f in shown)
    assert shown[1]["heldout_loss"] == "10" and shown[2]["heldout_loss"] == "12"  # last finite value kept
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 3 and set(names) | {"loss", "grad_norm", "lr", "step"} <= set(rows[0])
    assert rows[1]["kl"] == 3.0 and abs(rows[2]["loss"] - float(f"{rows[2]['loss']:.3g}")) < 1e-2
    assert progress_fields({"loss": [1.0], "grad_norm": [0.5]}) == {"loss": "1", "grad_norm": "0.5"}


@pytest.mark.real_model
def test_cli_trains_rl_with_a_python_reward(tmp_path, capsys):
    from steer_lens.cli import main

    path = tmp_path / "cli_reward_i16.py"
    path.write_text(REWARD_FILE)
    out = tmp_path / "run"
    args = ["train", "rl", "--model", REAL, "--device", "cpu", "--steps", "2", "--group-size", "2",
            "--prompts-per-step", "1", "--max-new-tokens", "3", "--no-progress", "--out", str(out)]
    assert main([*args, "--reward", f"{path}:quarter"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [0.25, 0.25]  # the function's own value, every step
    assert (out / "vector" / "config.json").exists()
    assert main([*args, "--reward", "no_such_module_i16:fn"]) == 2
    assert "could not import 'no_such_module_i16'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# item 11: short reprs
# ---------------------------------------------------------------------------------------------------
def test_steered_and_lens_reprs_are_short(tiny_model):
    steered = sl.SteeredTransformer(tiny_model, [HOOK, "blocks.0.attn.hook_z"], init="random", init_norm=2.5, seed=0)
    text = repr(steered)
    norms = steered.vectors.norms()
    assert "tensor(" not in text and "Parameter" not in text and len(text.splitlines()) == 4
    assert f"{HOOK}: [{tiny_model.cfg.d_model}], norm {norms[HOOK]:.4g}" in text
    assert f"blocks.0.attn.hook_z: [{tiny_model.cfg.n_heads}, {tiny_model.cfg.d_head}]" in text
    assert "<table" in steered._repr_html_() and HOOK in steered._repr_html_()

    one = sl.SteeredTransformer(tiny_model, [HOOK, "blocks.0.hook_resid_pre"], init="random", init_norm=1.0, seed=2)
    lens = sl.lens.vector_logit_lens(one, k=7)
    text = repr(lens)
    assert "tensor(" not in text and len(text.splitlines()) == 3 and len(text) < 600
    assert list(lens.keys()) == [HOOK, "blocks.0.hook_resid_pre"] and HOOK in lens and "x" not in lens
    assert dict(lens.items()) == lens.per_name and list(lens.values()) == list(lens.per_name.values())
    assert lens.get("x") is None and lens.get(HOOK) is lens[HOOK]
    ts = lens[HOOK]
    first = f"{ts.top_tokens[0]!r} {float(ts.top_values[0]):.3g}"
    assert first in text and first in repr(ts) and "tensor(" not in repr(ts)
    layer = sl.lens.layer_logit_lens(steered, _tokens(tiny_model)[0])
    assert "tensor(" not in repr(layer) and "final_post" in repr(layer) and len(repr(layer)) < 400


def test_lora_reprs_are_short():
    peft = pytest.importorskip("peft")
    hf = hf_model("llama", n_layers=2, seed=0, vocab=101)
    tl = tl_model(hf)
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False, lora_dropout=0.0)).eval()
    lora = sl.lora.load_adapter(tl, pm)
    text = repr(lora)
    assert "tensor(" not in text and "megatron" not in text and len(text.splitlines()) == 1 + len(lora)
    for m in lora.modules:
        assert f"{m.name} ({m.hf_name}): rank 2, A {list(m.A.shape)}, B {list(m.B.shape)}, scaling 2" in text
        # ‖ΔW‖_F as peft computes ΔW (get_delta_weight), in the TL repr
        layer = pm.get_submodule(f"base_model.model.{m.hf_name}")
        assert f"|dW|_F {float(layer.get_delta_weight('default').detach().norm()):.4g}" in text
        assert "tensor(" not in repr(m)
    assert "r=2, lora_alpha=4" in text

    examples = [(torch.tensor([1, 5, 6]), torch.tensor([7, 7]))] * 4
    fresh = hf_model("llama", n_layers=2, seed=0, vocab=101)  # (get_peft_model changed hf in place)
    res = sl.lora.train_adapter(fresh, examples, sl.lora.LoraTrainConfig(rank=2, steps=2, batch_size=2))
    text = repr(res)
    assert "tensor(" not in text and "Linear" not in text and len(text.splitlines()) == 1
    assert f"{float(res.losses[-1]):.4f}" in text and "rank 2" in text


# ---------------------------------------------------------------------------------------------------
# item 12: train_adapter with a HookedTransformer
# ---------------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_train_adapter_accepts_the_hooked_transformer(real_model):
    pytest.importorskip("peft")
    cfg = sl.lora.LoraTrainConfig(rank=2, steps=3, batch_size=2, lr=1e-2)
    examples = [("Once upon a time", " there was a dog."), ("Tom had a ball.", " He liked it."),
                ("The sun", " was warm.")]
    ours = sl.lora.train_adapter(real_model, examples, cfg)
    by_name = sl.lora.train_adapter(REAL, examples, cfg)  # the documented path: the hub name
    assert torch.equal(ours.losses, by_name.losses)
    a, b = sl.lora.load_adapter(real_model, ours), sl.lora.load_adapter(real_model, by_name)
    assert a.names == b.names and all(torch.equal(x.B, y.B) and torch.equal(x.A, y.A)
                                      for x, y in zip(a.modules, b.modules, strict=True))
    assert float(a.modules[0].B.abs().max()) > 0
    steered = sl.SteeredTransformer(real_model, [HOOK])  # a wrapper's model works too
    assert torch.equal(sl.lora.train_adapter(steered, examples, cfg).losses, ours.losses)


def test_train_adapter_names_what_to_pass():
    pytest.importorskip("peft")
    examples = [(torch.tensor([1, 5, 6]), torch.tensor([7, 7]))]
    cfg = sl.lora.LoraTrainConfig(rank=2, steps=1, batch_size=1)
    converted = tl_model(hf_model("llama", n_layers=2, seed=0, vocab=101))  # no hub name to load
    for model in (converted, sl.random_model("llama", n_layers=2, d_model=32, n_heads=4, d_vocab=53, seed=0)):
        with pytest.raises(ConfigError, match="pass the transformers model"):
            sl.lora.train_adapter(model, examples, cfg)
    with pytest.raises(ConfigError, match="expected a Hugging Face model name"):
        sl.lora.train_adapter(3.0, examples, cfg)
