"""The per-token gate of token-wise gated steering vectors (:func:`gate_values`).

A :class:`~steer_lens.vectors.GatedVectors` module adds ``g_t · v_h`` at hook ``h``, with a scalar
gate ``g_t`` read from the unsteered activation at token ``t`` (token-wise adaptive scaling); this
analysis records ``g_t`` on some texts so that one can see on which tokens the vector acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import token_strings
from steer_lens.analysis._common import text_tokens
from steer_lens.errors import IncompatibleVectorError
from steer_lens.results import Result
from steer_lens.train.data import TokenIds
from steer_lens.vectors import GatedVectors

__all__ = ["GateValues", "gate_values"]


@dataclass(frozen=True)
class GateValues(Result):
    """Per-token gates of a :class:`~steer_lens.vectors.GatedVectors` module on some texts.

    Attributes:
        gates: ``{hook: [batch, pos]}`` gate values (unitless; padding positions are NaN).
        str_tokens: per text, its tokens as strings (BOS first).
        attention_mask: ``[batch, pos]`` 1 for real tokens.
    """

    gates: dict[str, Float[Tensor, "batch pos"]]
    str_tokens: list[list[str]]
    attention_mask: Int[Tensor, "batch pos"]

    _html_rows = 40

    def of_text(self, i: int, hook: str | None = None) -> Float[Tensor, " pos"]:
        """The gates of text ``i`` (padding removed) at ``hook`` (default: the first hook)."""
        hook = hook or next(iter(self.gates))
        return self.gates[hook][i][self.attention_mask[i].bool()]

    def to_pandas(self):
        """Long table: ``hook, text, position, token, gate``."""
        import pandas as pd

        rows = []
        for h in self.gates:
            for i, toks in enumerate(self.str_tokens):
                for j, (t, g) in enumerate(zip(toks, self.of_text(i, h).tolist(), strict=True)):
                    rows.append({"hook": h, "text": i, "position": j, "token": t, "gate": g})
        return pd.DataFrame(rows)

    def summary(self):
        """Per hook: mean, min and max gate over every real token (a DataFrame)."""
        import pandas as pd

        rows = []
        for h in self.gates:
            g = torch.cat([self.of_text(i, h) for i in range(len(self.str_tokens))])
            rows.append({"hook": h, "mean": float(g.mean()), "min": float(g.min()), "max": float(g.max())})
        return pd.DataFrame(rows)

    def top(self, k: int = 10):
        """The ``k`` tokens with the largest gate (over all hooks and texts)."""
        df = self.to_pandas()
        return df.loc[df["gate"].sort_values(ascending=False, kind="stable").index].head(k).reset_index(drop=True)

    def plot(self, i: int = 0, hook: str | None = None):
        """Plotly bar chart of the gate per token of text ``i`` at ``hook`` (default: the first)."""
        from steer_lens.plotting import bar

        hook = hook or next(iter(self.gates))
        toks = self.str_tokens[i]
        fig = bar(self.of_text(i, hook), [str(j) for j in range(len(toks))], hovertext=toks,
                  title=f"gate per token at {hook}", y_title="gate g_t")
        fig.update_xaxes(tickmode="array", tickvals=[str(j) for j in range(len(toks))], ticktext=toks)
        return fig

    def token_view(self, i: int = 0, hook: str | None = None):
        """circuitsvis ``colored_tokens`` view of the gate per token of text ``i`` (for notebooks)."""
        from steer_lens.plotting import token_view

        hook = hook or next(iter(self.gates))
        return token_view(self.str_tokens[i], self.of_text(i, hook))

    def _repr_html_(self) -> str:
        from steer_lens.plotting import result_html

        return result_html(f"<b>GateValues</b> of {len(self.str_tokens)} texts", self.summary())


@torch.no_grad()
def gate_values(steered, texts: str | TokenIds | Sequence[str | TokenIds]) -> GateValues:
    """The gate ``g_t`` per token of a :class:`~steer_lens.vectors.GatedVectors`-steered model on ``texts``.

    Runs one forward pass with the vectors on and records each hook's gate (token-wise adaptive
    scaling: the vector added at token ``t`` is ``g_t · v_h``).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` whose ``vectors`` are ``GatedVectors``.
        texts: one text or a list (tokenized with BOS, cut to ``n_ctx``, left-padded), or token ids
            (a ``[n, pos]`` tensor, 1-D tensors or lists of ints, BOS first) for a model without a
            tokenizer.

    Returns:
        A :class:`GateValues`.

    Raises:
        IncompatibleVectorError: the vectors are not gated.
        EmptyInputError: no texts.
    """
    if not isinstance(steered.vectors, GatedVectors):
        raise IncompatibleVectorError(
            f"gate_values needs GatedVectors, got {type(steered.vectors).__name__}. Fix: build the "
            "wrapper with vectors=GatedVectors(hooks, d_model)."
        )
    tokens, mask, _ = text_tokens(steered, texts)
    with steered.vectors.recording() as rec:
        steered(tokens, attention_mask=mask, return_type=None)
    pad = ~mask.bool().cpu()
    gates = {h: rec[h].float().cpu().masked_fill(pad, float("nan")) for h in steered.hook_names}
    str_tokens = [token_strings(steered, row[m.bool()]) for row, m in zip(tokens.cpu(), mask.cpu(), strict=True)]
    return GateValues(gates=gates, str_tokens=str_tokens, attention_mask=mask.cpu())
