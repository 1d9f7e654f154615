"""The adapter's own "neurons": the r scalars A·x_t of each LoRA module, per token.

A rank-r LoRA module writes ``scaling · B · (A · x_t)``: r scalar activations ``A · x_t`` times fixed output
directions (the columns of ``scaling · B``). For rank 1 this is one neuron with one output direction, and it
can be read like an MLP neuron: which tokens and texts make it fire, and what its output direction
promotes through the unembedding (logit lens of B).

Method: "Rank-1 LoRAs Encode Interpretable Reasoning Signals" (Ward et al. 2025), which reads rank-1
LoRA activations as interpretable neurons.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens._utils import token_strings
from steer_lens.errors import ConfigError
from steer_lens.lens import direction_lens
from steer_lens.lora._common import check_hooks
from steer_lens.lora.adapter import LoraAdapter, merged_model, validate
from steer_lens.lora.comparison import Texts, prepare_texts
from steer_lens.models import HookedModel

__all__ = ["AdapterActivations", "adapter_activations"]


@dataclass(frozen=True)
class AdapterActivations:
    """Per-token LoRA activations ``A · x_t`` (before scaling), CPU tensors.

    Attributes:
        modules: module names (``"blocks.1.mlp.W_out"`` ...).
        tokens: per text, its token ids ``[pos]`` (BOS included).
        str_tokens: per text, its tokens as strings (ids as strings without a tokenizer).
        acts: ``{module: [Float[Tensor, "pos rank"] per text]}``.
        lens: ``{module: (TokenScores per component, ...)}``: logit lens (:func:`steer_lens.lens.direction_lens`,
            lens of each column of ``scaling · B`` for residual-writing modules (o / down projections).
    """

    modules: tuple[str, ...]
    tokens: tuple[Tensor, ...]  # each Int[Tensor, "pos"] (lengths differ)
    str_tokens: tuple[tuple[str, ...], ...]
    acts: dict[str, tuple[Tensor, ...]]  # each Float[Tensor, "pos rank"]
    lens: dict[str, tuple]

    def _check(self, module: str | None) -> str:
        if module is None:
            if len(self.modules) != 1:
                raise ConfigError(
                    f"module: the adapter has several modules, pick one of {list(self.modules)}."
                )
            return self.modules[0]
        if module not in self.acts:
            raise ConfigError(f"module: expected one of {list(self.modules)}, got {module!r}.")
        return module

    def values(self, module: str | None = None, component: int = 0) -> Float[Tensor, " n_tokens"]:
        """All tokens' activations of one component, texts concatenated."""
        module = self._check(module)
        return torch.cat([a[:, component] for a in self.acts[module]])

    def to_pandas(self, module: str | None = None):
        """Long table: module, component, text, pos, token, activation (one module or all)."""
        import pandas as pd

        mods = [self._check(module)] if module is not None else list(self.modules)
        rows = []
        for m in mods:
            for ti, a in enumerate(self.acts[m]):
                for c in range(a.shape[1]):
                    vals = a[:, c].tolist()
                    for p, v in enumerate(vals):
                        rows.append(
                            {
                                "module": m,
                                "component": c,
                                "text": ti,
                                "pos": p,
                                "token": self.str_tokens[ti][p],
                                "activation": v,
                            }
                        )
        return pd.DataFrame(rows)

    def top_tokens(self, module: str | None = None, component: int = 0, k: int = 20, *, context: int = 5):
        """The k tokens with the largest activation (signed), with a few tokens of context before them."""
        module = self._check(module)
        df = self.to_pandas(module)
        df = df[df.component == component].nlargest(k, "activation").copy()
        df["context"] = [
            "".join(self.str_tokens[t][max(0, p - context) : p]) + "[[" + self.str_tokens[t][p] + "]]"
            for t, p in zip(df.text, df.pos, strict=True)
        ]
        return df.reset_index(drop=True)

    def top_texts(self, module: str | None = None, component: int = 0, k: int = 5):
        """The k texts whose maximum activation is largest."""
        import pandas as pd

        module = self._check(module)
        mx = torch.tensor([float(a[:, component].max()) for a in self.acts[module]])
        idx = torch.argsort(mx, descending=True)[:k].tolist()
        return pd.DataFrame(
            [{"text": i, "max_activation": float(mx[i]), "content": "".join(self.str_tokens[i])} for i in idx]
        )

    def show_tokens(self, module: str | None = None, component: int = 0, text: int | None = None):
        """circuitsvis colored-tokens view of one text (default: the text with the top activation)."""
        from steer_lens.plotting import token_view

        module = self._check(module)
        if text is None:
            text = int(self.top_texts(module, component, 1).text.iloc[0])
        return token_view(list(self.str_tokens[text]), self.acts[module][text][:, component])

    def logit_lens(self, module: str | None = None, component: int = 0):
        """Tokens promoted / suppressed by column ``component`` of ``scaling·B`` (o / down projections)."""
        import pandas as pd

        module = self._check(module)
        if module not in self.lens:
            raise ConfigError(
                f"module {module!r} does not write the residual stream (q/k/v/gate/up), so its B has no "
                "logit lens; use an o_proj or down_proj module."
            )
        ts = self.lens[module][component]
        return pd.DataFrame(
            {
                "promoted": ts.top_tokens,
                "logit": ts.top_values.tolist(),
                "suppressed": ts.bottom_tokens,
                "logit_neg": ts.bottom_values.tolist(),
            }
        )

    def plot(self, module: str | None = None):
        """Plotly histogram of activations per component (one module, or every module)."""
        import plotly.graph_objects as go

        mods = [self._check(module)] if module is not None else list(self.modules)
        fig = go.Figure()
        for m in mods:
            r = self.acts[m][0].shape[1]
            for c in range(r):
                fig.add_trace(go.Histogram(x=self.values(m, c).tolist(), name=f"{m}[{c}]", opacity=0.6))
        fig.update_layout(title="LoRA activations A·x_t", barmode="overlay", xaxis_title="A·x_t")
        return fig

    def _repr_html_(self) -> str:
        parts = [
            f"<b>AdapterActivations</b>: {len(self.tokens)} texts, "
            f"modules {html.escape(str(list(self.modules)))}"
        ]
        for m in self.modules:
            parts.append(f"<h4>{html.escape(m)}</h4>" + self.top_tokens(m, 0, 10).to_html(index=False))
        return "".join(parts)


@torch.no_grad()
def adapter_activations(
    model: HookedModel,
    lora: LoraAdapter,
    texts: Texts,
    *,
    batch_size: int = 16,
    k: int = 10,
    tuned: HookedModel | None = None,
) -> AdapterActivations:
    """The r scalars ``A · x_t`` of every LoRA module at every token of ``texts`` (in the LoRA model's run).

    Args:
        model: the base ``HookedTransformer``.
        lora: the adapter.
        texts: texts (BOS prepended) or token ids, as :func:`~steer_lens.lora.comparison.compare`.
        batch_size: texts per forward pass.
        k: tokens kept per side in the logit lens of B.
        tuned: the merged model if you already have it.

    Returns:
        An :class:`AdapterActivations` (unscaled: multiply by ``scaling`` and B for the write).

    Raises:
        EmptyInputError, SequenceTooLongError: as :func:`~steer_lens.lora.comparison.compare`.
    """
    validate(model, lora)
    batches = prepare_texts(model, texts, batch_size)
    tuned = merged_model(model, lora) if tuned is None else tuned
    hooks = sorted({m.input_hook for m in lora.modules})
    check_hooks(model, hooks)
    acts: dict[str, list[Tensor]] = {m.name: [] for m in lora.modules}
    tokens: list[Tensor] = []
    for toks, real in batches:
        _, cache = tuned.run_with_cache(toks, names_filter=hooks)
        lens = real.sum(1).tolist()
        for m in lora.modules:
            x = m.module_input(model, cache)
            a = (x @ m.A.to(x.device, x.dtype).T).float().cpu()
            acts[m.name].extend(a[i, :n] for i, n in enumerate(lens))
        tokens.extend(toks[i, :n].cpu() for i, n in enumerate(lens))
    str_tokens = tuple(tuple(token_strings(model, t.tolist())) for t in tokens)   # pieces keep their spaces
    lens_out = {}
    for m in lora.modules:
        if m.writes_residual:
            cols = (m.scaling * m.B).T.contiguous()  # [rank, d_model]
            names = [f"{m.name}[{c}]" for c in range(m.rank)]
            lens_out[m.name] = tuple(direction_lens(model, cols, k=k, mode="raw", names=names))
    return AdapterActivations(
        modules=tuple(m.name for m in lora.modules),
        tokens=tuple(tokens),
        str_tokens=str_tokens,
        acts={k_: tuple(v) for k_, v in acts.items()},
        lens=lens_out,
    )
