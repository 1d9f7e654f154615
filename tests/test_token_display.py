"""Token display (issue 16 item 8): pieces keep their spaces, a word's tokenization is explained, tick
labels are not indexed twice.

References: the tokenizer's own ``decode`` of the whole sequence (the joined pieces must equal it), and
the issue's observation on TinyStories-656K (``" Tom"`` → ``['', 'Tom']``; contexts read
``'carried it backhome'`` when tokens were decoded one at a time).
"""

from __future__ import annotations

import pytest
import torch

import steer_lens as sl
from steer_lens._utils import token_strings
from steer_lens.errors import ConfigError

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tiny():
    return sl.load_model("raincandy-u/TinyStories-656K", device="cpu")


def test_pieces_join_to_the_decoded_text(tiny):
    text = "She carried it back home. Then Tom and the dog ran to the park."
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_strings(tiny, ids)
    assert "".join(pieces) == tiny.tokenizer.decode(ids)
    assert "back home" in "".join(pieces[4:8]) or "back home" in "".join(pieces)
    one_at_a_time = "".join(tiny.tokenizer.decode([i]) for i in ids)
    assert "backhome" in one_at_a_time.replace(" ", "") and "back home" not in one_at_a_time   # the old defect


def test_word_tokens_explains_the_tokenizer(tiny):
    w = sl.word_tokens(tiny, " Tom")
    assert w.pieces == ["", "Tom"]                                   # as the issue measured
    assert w.prefix_space and w.space_before_next                    # a dummy prefix; spaces go left
    assert w.in_context_pieces == ["Tom "] and len(w.in_context_ids) == 1     # the space rides after
    assert any("preceding token" in a for a in w.advice) and any("in front of every text" in a for a in w.advice)
    assert "Tom" in repr(w)
    with pytest.raises(ConfigError):
        sl.word_tokens(tiny, "  ")
    with pytest.raises(ConfigError, match="no tokenizer"):
        sl.word_tokens(sl.random_model("gpt2", n_layers=1), "Tom")


def test_heatmap_does_not_index_labels_twice():
    from steer_lens.plotting import heatmap

    fig = heatmap(torch.zeros(1, 3), x_labels=["0: <s>", "1: a", "b"], y_labels=["r"])
    assert list(fig.data[0].x) == ["0: <s>", "1: a", "2: b"]
