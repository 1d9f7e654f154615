"""Property-based bad-input test (hypothesis) of the public config dataclasses (issue 15, requirements).

Property: a value of the wrong type for any field of ``SFTConfig``, ``RLConfig``, ``OneShotConfig``,
``LoraTrainConfig``, ``SAETrainConfig`` or ``LoraStateSAEConfig`` raises a ``SteerLensError`` subclass
(``ConfigError``) naming the field, never a raw ``TypeError`` / ``ValueError`` and never silent
acceptance. (The test sets the field on a default config and calls ``__post_init__``: under this suite's
jaxtyping import hook ``__init__`` itself is type-checked by beartype, which users do not run.) "Wrong type" is decided from the field's annotation independently of the checker: a value
is generated from a type the annotation does not admit (a string for a number, a float for an int, a
non-bool for a bool, NaN / inf for a float, a dict or a scalar for a sequence ...).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer_lens.errors import SteerLensError
from steer_lens.lora.state_sae import LoraStateSAEConfig
from steer_lens.lora.train import LoraTrainConfig
from steer_lens.sae.training import SAETrainConfig
from steer_lens.train.one_shot import OneShotConfig
from steer_lens.train.rl import RLConfig
from steer_lens.train.supervised import SFTConfig

CONFIGS = [SFTConfig, RLConfig, OneShotConfig, LoraTrainConfig, SAETrainConfig, LoraStateSAEConfig]

strings = st.text(max_size=5)
floats_nonint = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
containers = st.one_of(st.just({}), st.dictionaries(strings, st.integers(), max_size=2))
objects = st.builds(object)


def _admits(tp) -> set[str]:
    """The kinds of value an annotation admits: int, float, bool, str, none, seq."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_admits(a) for a in args))
    if tp is type(None):
        return {"none"}
    if origin is typing.Literal:
        return {"literal"}
    if tp in (int, float, bool, str):
        return {tp.__name__} | ({"int"} if tp is float else set())
    if origin is tuple:
        return {"seq"}
    if origin is not None and getattr(origin, "__name__", "") in ("Sequence",):
        return {"seq"}
    if origin is None and isinstance(tp, type) and tp is not typing.Any:
        return {"class"}                                     # e.g. a Tensor: only instances of it
    return {"any"}


def bad_value_for(tp):
    """A strategy of values of a type the annotation does not admit (None when no such kind is known)."""
    kinds = _admits(tp)
    if "any" in kinds:
        return None
    options = [objects, containers]
    if not kinds & {"str", "literal"}:
        options.append(strings.filter(lambda s: True))
    if "int" not in kinds and "float" not in kinds:
        options.append(st.integers(-5, 5))
    if "int" in kinds and "float" not in kinds:
        options.append(floats_nonint)
    if "float" in kinds:
        options.append(non_finite)
    if "bool" not in kinds and "int" not in kinds and "float" not in kinds:
        options.append(st.booleans())
    if "bool" in kinds:
        options.append(st.one_of(st.integers(0, 1), st.none() if "none" not in kinds else st.just(2)))
    if "int" in kinds or "float" in kinds:
        options.append(st.booleans())
    if "none" not in kinds:
        options.append(st.none())
    return st.one_of(options)


CASES = []
for cls in CONFIGS:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and bad_value_for(hints[f.name]) is not None:
            CASES.append((cls, f.name, hints[f.name]))


@pytest.mark.parametrize(("cls", "name", "tp"), CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_type_is_a_named_error(cls, name, tp, data):
    value = data.draw(bad_value_for(tp))
    if name.endswith(("_dir", "_path")) and isinstance(value, str):
        return                                               # a path given as a string is right
    config = cls()                                           # the defaults are valid
    object.__setattr__(config, name, value)                  # bypass the test run's beartype-checked __init__
    with pytest.raises(SteerLensError, match=name):
        config.__post_init__()


def test_every_config_field_is_covered():
    covered = {(c.__name__, n) for c, n, _ in CASES}
    assert len(covered) >= 60                                # the six configs' typed fields
    assert ("RLConfig", "lr") in covered and ("SFTConfig", "eval_texts") in covered


# the public constructor: values of the right type but outside what it accepts (wrong *types* are refused
# by this suite's beartype check before the constructor runs, and by check_field_types for users)
@pytest.fixture(scope="module")
def small_model():
    import steer_lens as sl

    return sl.random_model("gpt2", n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=8)


_HOOK = "blocks.1.hook_resid_pre"
bad_constructor_kwargs = st.one_of(
    st.builds(lambda s: {"scale": s}, st.sampled_from([math.nan, math.inf, -math.inf])),
    st.builds(lambda n: {"init": "random", "init_norm": n},
              st.one_of(st.floats(max_value=0.0, allow_nan=False), st.sampled_from([math.nan, math.inf]))),
    st.builds(lambda p: {"positions": p}, st.text(max_size=8).filter(lambda t: t not in ("all", "prompt", "generated"))),
    st.builds(lambda h: {"hooks": [h]}, st.text(max_size=20).filter(lambda t: not t.startswith("blocks."))),
    st.builds(lambda i: {"init": i}, st.text(max_size=8).filter(lambda t: t not in ("zeros", "random"))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=bad_constructor_kwargs)
def test_steered_transformer_refuses_bad_values_with_a_named_error(small_model, kwargs):
    import steer_lens as sl

    kwargs = {"hooks": [_HOOK], **kwargs}
    hooks = kwargs.pop("hooks")
    before = {n: p.detach().clone() for n, p in small_model.named_parameters()}
    with pytest.raises(SteerLensError):
        sl.SteeredTransformer(small_model, hooks, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in small_model.named_parameters())   # nothing changed
    assert not any(h.fwd_hooks for h in small_model.hook_dict.values())                # no hook left
