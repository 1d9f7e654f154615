"""Bad token ids and init tensors are named errors before anything runs (issue 15, item 4).

Without the checks, negative ids index the last embedding rows silently (TransformerLens's embedding
is a plain ``W_E[tokens]``), ids >= d_vocab raise a raw IndexError, too-long inputs fail inside the
positional embedding, and a complex init silently drops its imaginary part.
"""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl
from steer_lens.errors import ConfigError, SequenceTooLongError


@pytest.fixture(scope="module")
def steered():
    model = sl.random_model("llama", n_layers=1, d_model=16, n_heads=2, d_vocab=23, n_ctx=16, seed=3)
    return sl.SteeredTransformer(model, hooks=["blocks.0.hook_resid_post"], init="random", init_norm=1.0, seed=0)


def test_negative_ids_would_silently_wrap(steered):
    """The defect itself: TransformerLens embeds id -2 as id d_vocab - 2 (why the check is needed)."""
    model = steered.model
    wrapped = model(torch.tensor([[1, 21, 3]]))
    negative = model(torch.tensor([[1, -2, 3]]))
    torch.testing.assert_close(negative, wrapped)


@pytest.mark.parametrize("ids", [[[1, -2, 3]], [[1, 23, 3]], [[1, 99, 3]]], ids=["negative", "d_vocab", "far"])
def test_out_of_vocabulary_ids_are_refused_everywhere(steered, ids):
    toks = torch.tensor(ids)
    ok = torch.tensor([[1, 2, 3]])
    metric = sl.patching.logit_diff(1, 2)
    calls = {
        "forward": lambda: steered(toks),
        "generate": lambda: steered.generate(toks, max_new_tokens=2),
        "activation_patch": lambda: sl.patching.activation_patch(steered.model, toks, ok, metric),
        "activation_patch corrupted": lambda: sl.patching.activation_patch(steered.model, ok, toks, metric),
    }
    before = steered.vectors.direction("blocks.0.hook_resid_post").clone()
    for name, call in calls.items():
        with pytest.raises(ConfigError, match=r"outside the vocabulary \[0, 23\)"):
            call()
        assert not steered.model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks, name  # no hook left
    torch.testing.assert_close(steered.vectors.direction("blocks.0.hook_resid_post"), before)


def test_too_long_inputs_are_refused(steered):
    with pytest.raises(SequenceTooLongError, match="n_ctx=16"):
        steered(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(SequenceTooLongError, match="n_ctx=16"):
        sl.patching.activation_patch(
            steered.model, torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.long),
            sl.patching.logit_diff(1, 2),
        )
    # the boundary is accepted: n_ctx positions, ids 0 and d_vocab - 1
    out = steered(torch.tensor([[0] * 15 + [22]]))
    assert out.shape == (1, 16, 23)


@pytest.mark.parametrize(
    "init",
    [torch.zeros(16, dtype=torch.complex64), torch.zeros(16, dtype=torch.bool), torch.empty(16, device="meta")],
    ids=["complex", "bool", "meta"],
)
def test_init_that_is_not_real_floats_is_refused(steered, init):
    with pytest.raises(ConfigError, match="real floating-point tensor"):
        sl.SteeredTransformer(steered.model, hooks=["blocks.0.hook_resid_post"], init=init)


@pytest.mark.real_model
def test_one_string_where_a_list_is_expected_is_refused(real_model):
    """A bare string as ``sft`` examples or ``SFTConfig.eval_texts`` would be split into characters
    (one "example" per character); ``RLConfig`` already refused it: all three are consistent now."""
    steered = sl.SteeredTransformer(real_model, hooks=["blocks.1.hook_resid_pre"])
    before = steered.vectors.direction("blocks.1.hook_resid_pre").clone()
    with pytest.raises(ConfigError, match="split into characters"):
        sl.train.sft(steered, "Once upon a time", sl.train.SFTConfig(steps=1))
    with pytest.raises(ConfigError, match="split into characters"):
        sl.train.SFTConfig(steps=1, eval_texts="Once upon a time")
    torch.testing.assert_close(steered.vectors.direction("blocks.1.hook_resid_pre"), before)  # no step taken


# issue 15 item 5: the remaining raw errors, each now a named error raised before anything runs
@pytest.mark.parametrize("kwargs", [
    {"seed": "x"}, {"seed": 1.5}, {"seed": 2**70}, {"seed": -1},
    {"top_k": 0}, {"top_k": -1},
    {"max_new_tokens": 0},
])
def test_bad_sampling_arguments_are_config_errors(kwargs):
    from steer_lens.generation import check_sampling_args

    args = {"max_new_tokens": 5, "seed": None, "top_k": None, **kwargs}
    with pytest.raises(ConfigError, match="Fix"):
        check_sampling_args(**args)


def test_long_text_and_mismatched_position_mask_are_named_errors():
    import steer_lens as sl
    from steer_lens.errors import SequenceTooLongError

    model = sl.random_model("gpt2", n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=8)
    steered = sl.SteeredTransformer(model, ["blocks.0.hook_resid_pre"], init="random", init_norm=1.0)
    with pytest.raises(SequenceTooLongError):
        sl.lens.layer_logit_lens(steered, torch.arange(12) % 20)
    masked = sl.SteeredTransformer(model, ["blocks.0.hook_resid_pre"], positions=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="rows"):
        masked(torch.ones(2, 4, dtype=torch.long))
