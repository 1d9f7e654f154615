"""Parameterisations of steering vectors beyond one free vector per hook.

Both classes are :class:`~steer_lens.vectors.SteeringVectors` subclasses registered by ``kind``, so
they plug into :class:`~steer_lens.SteeredTransformer` (``vectors=...``), SFT, RL, the analyses and
``save`` / ``load`` unchanged.

* :class:`LowRankVectors` - the vectors of all hooks share a rank-``r`` basis:
  ``V = A · B`` with ``A [n_hooks, r]`` per-hook coefficients and ``B [r, d_model]`` a shared basis
  (unit-norm rows at init), as in the low-rank variant of "Steering LLM Reasoning Through Bias-Only
  Adaptation" (Sinii et al. 2025). ``A`` starts at zero and ``B`` random, as LoRA starts ``B = 0``,
  so the initial vectors are zero and both factors get gradients after the first step.
* :class:`GatedVectors` - *token-wise adaptive scaling*: at hook ``h`` the model adds
  ``g_t · v_h`` where the scalar gate ``g_t = 2 · sigmoid(w_h · x̂_t + b_h)`` (or
  ``1 + w_h · x̂_t`` for ``gate="linear"``, a rank-1 read-out) is computed from the unsteered
  activation ``x_t`` normalised to unit length (``x̂_t = x_t / ||x_t||``), so the gate's scale does
  not depend on the hook's residual norm. ``w = 0, b = 0`` at init: the gate is exactly 1 and the
  vector acts like a plain one. :func:`gate_values` returns the gate per token and
  :meth:`GateValues.view` shows it with circuitsvis.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from steer_lens.errors import ConfigError, EmptyInputError, IncompatibleVectorError
from steer_lens.steering import SteeredTransformer
from steer_lens.vectors import SteeringVectors, _key, register_kind

__all__ = ["GateValues", "GatedVectors", "LowRankVectors", "gate_values"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# low rank, shared across hooks
# ---------------------------------------------------------------------------------------------------
@register_kind
class LowRankVectors(SteeringVectors):
    """Vectors of all hooks in one rank-``r`` subspace: ``v_h = A[h] · B`` (Bias-Only adaptation, low rank).

    Args:
        hook_names: the hook points.
        d_model: residual width.
        rank: number of shared basis vectors ``r`` (``1 <= r <= d_model``).
        init: ``"zeros"`` (default: ``A = 0``, ``B`` random orthonormal rows), or a mapping
            hook -> vector ``[d_model]`` / a tensor ``[d_model]``: then ``B`` is the top-``r`` right
            singular vectors of the stacked vectors and ``A`` their coordinates (exact when
            ``rank >= n_hooks``; otherwise the best rank-``r`` approximation).
        seed: seed of the random basis.

    Raises:
        ConfigError: bad ``rank`` or ``init`` (and as :class:`~steer_lens.vectors.SteeringVectors`).
        ShapeMismatchError, NonFiniteError: a bad init tensor.
    """

    kind: ClassVar[str] = "lowrank"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        rank: int = 4,
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        seed: int | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= int(d_model):
            raise ConfigError(f"rank: expected an int in [1, d_model={d_model}], got {rank!r}.")
        if isinstance(init, str) and init != "zeros":
            raise ConfigError(
                f"init: LowRankVectors takes 'zeros', a tensor [d_model] or a dict of them, got {init!r}."
            )
        super().__init__(hook_names, d_model, init=init if not isinstance(init, str) else "zeros")
        values = torch.stack([self.params[_key(h)].detach() for h in self.hook_names])  # [n, d]
        del self.params
        self.rank = rank
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        q, _ = torch.linalg.qr(torch.randn(d_model, rank, generator=gen))
        basis = q.T.contiguous()  # [r, d], orthonormal rows
        coef = torch.zeros(len(self.hook_names), rank)
        if bool(values.abs().sum() > 0):
            _, _, vh = torch.linalg.svd(values, full_matrices=False)
            k = min(rank, vh.shape[0])
            basis[:k] = vh[:k]
            coef = values @ basis.T
        self.basis = nn.Parameter(basis)
        self.coef = nn.ParameterDict(
            {_key(h): nn.Parameter(coef[i].clone()) for i, h in enumerate(self.hook_names)}
        )

    def __getitem__(self, hook_name: str) -> Tensor:
        return self.direction(hook_name)

    def direction(self, hook_name: str) -> Float[Tensor, " d_model"]:
        """``A[h] · B``: the vector at ``hook_name`` (differentiable in both factors)."""
        try:
            a = self.coef[_key(hook_name)]
        except KeyError:
            raise KeyError(f"no vector at {hook_name!r}; vectors are at {list(self.hook_names)}") from None
        return a @ self.basis

    def delta(self, hook_name: str, act: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, " d_model"]:
        """The vector ``A[h] · B`` (independent of the activation)."""
        return self.direction(hook_name)

    def set_(self, hook_name: str, value: Tensor) -> None:
        """Set ``A[h]`` to the coordinates of ``value`` in the basis (its projection onto the span of ``B``).

        A warning is logged when ``value`` is not in the span (more than 0.1% of its norm is lost).
        """
        value = self._checked(hook_name, value).to(self.basis.device)
        with torch.no_grad():
            pinv = torch.linalg.pinv(self.basis)  # [d, r]
            a = value @ pinv
            lost = (value - a @ self.basis).norm() / (value.norm() + 1e-12)
            if lost > 1e-3:
                logger.warning("set_(%s): %.1f%% of the vector's norm lies outside the rank-%d basis",
                               hook_name, 100 * float(lost), self.rank)
            self.coef[_key(hook_name)].copy_(a)

    def clamp_norm_(self, max_norm: float) -> None:
        """Scale each ``A[h]`` so that ``||A[h] · B|| <= max_norm`` (in place, no autograd)."""
        with torch.no_grad():
            for h in self.hook_names:
                n = self.direction(h).norm()
                self.coef[_key(h)].mul_(torch.clamp(max_norm / (n + 1e-12), max=1.0))

    def lr_groups(self, resid_rms: Mapping[str, float] | None) -> list[tuple[list[nn.Parameter], float]]:
        """``A[h]`` at ``rms_h · sqrt(d_model / rank)`` (one coordinate step moves ``v_h`` by about the
        same norm as a plain vector's step), ``B`` at ``1 / sqrt(d_model)`` (its unit-norm rows have
        coordinates of that size). All 1 with ``resid_rms=None``.
        """
        if resid_rms is None:
            return [([self.coef[_key(h)]], 1.0) for h in self.hook_names] + [([self.basis], 1.0)]
        d, r = self.d_model, self.rank
        groups = [([self.coef[_key(h)]], float(resid_rms[h]) * math.sqrt(d / r)) for h in self.hook_names]
        return [*groups, ([self.basis], 1.0 / math.sqrt(d))]

    def kind_config(self) -> dict[str, Any]:
        """``{"rank": r}``."""
        return {"rank": self.rank}

    def tensors(self) -> dict[str, Tensor]:
        """``lowrank.basis`` ``[r, d_model]`` and ``lowrank.coef.<hook>`` ``[r]``."""
        out = {"lowrank.basis": self.basis.detach().cpu().contiguous()}
        for h in self.hook_names:
            out[f"lowrank.coef.{h}"] = self.coef[_key(h)].detach().cpu().contiguous()
        return out

    def _param_for(self, tensor_name: str) -> Tensor:
        if tensor_name == "lowrank.basis":
            return self.basis
        return self.coef[_key(tensor_name.removeprefix("lowrank.coef."))]

    def vectors_matrix(self) -> Float[Tensor, "n_hooks d_model"]:
        """All vectors stacked, ``A · B`` (detached, CPU)."""
        return torch.stack([self.direction(h).detach().cpu() for h in self.hook_names])


# ---------------------------------------------------------------------------------------------------
# token-wise gate
# ---------------------------------------------------------------------------------------------------
@register_kind
class GatedVectors(SteeringVectors):
    """A vector per hook scaled per token by a learned gate read from the activation.

    At hook ``h`` the model adds ``g_t · v_h`` with ``x̂_t = x_t / ||x_t||`` and

    * ``gate="sigmoid"`` (default): ``g_t = 2 · sigmoid(w_h · x̂_t + b_h)`` in ``(0, 2)``;
    * ``gate="linear"``: ``g_t = 1 + w_h · x̂_t + b_h`` (a rank-1 read-out, unbounded).

    ``w_h = 0`` and ``b_h = 0`` at init, so ``g_t = 1``: the module starts as the plain vectors.
    The gate reads the activation *before* the vector is added (the one the base model would have,
    given the earlier hooks' vectors).

    Args:
        hook_names: the hook points.
        d_model: residual width.
        init: initial vectors ``v_h``, as for :class:`~steer_lens.vectors.SteeringVectors`.
        init_norm: norm of a random init.
        seed: seed of a random init.
        gate: ``"sigmoid"`` or ``"linear"``.

    Raises:
        ConfigError: unknown ``gate`` (and as :class:`~steer_lens.vectors.SteeringVectors`).
    """

    kind: ClassVar[str] = "gated"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        gate: Literal["sigmoid", "linear"] = "sigmoid",
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
        init_norm: float | None = None,
        seed: int | None = None,
    ) -> None:
        if gate not in ("sigmoid", "linear"):
            raise ConfigError(f"gate: expected 'sigmoid' or 'linear', got {gate!r}.")
        super().__init__(hook_names, d_model, init=init, init_norm=init_norm, seed=seed)
        self.gate = gate
        self.gate_w = nn.ParameterDict({_key(h): nn.Parameter(torch.zeros(d_model)) for h in self.hook_names})
        self.gate_b = nn.ParameterDict({_key(h): nn.Parameter(torch.zeros(())) for h in self.hook_names})
        self._record: dict[str, Tensor] | None = None

    def gate_of(
        self, hook_name: str, act: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos"]:
        """The gate ``g_t`` per token for activation ``act`` at ``hook_name`` (fp32, differentiable)."""
        x = act.float()
        u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        z = u @ self.gate_w[_key(hook_name)] + self.gate_b[_key(hook_name)]
        return 2.0 * torch.sigmoid(z) if self.gate == "sigmoid" else 1.0 + z

    def delta(
        self, hook_name: str, act: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``g_t · v_h`` per token, ``[batch, pos, d_model]`` in fp32."""
        g = self.gate_of(hook_name, act)
        if self._record is not None:
            self._record[hook_name] = g.detach()
        return g[..., None] * self[hook_name]

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Tensor]]:
        """Context manager: record the gates of the calls inside it, ``{hook: [batch, pos]}`` (last call)."""
        prev = self._record
        self._record = {}
        try:
            yield self._record
        finally:
            self._record = prev

    def lr_groups(self, resid_rms: Mapping[str, float] | None) -> list[tuple[list[nn.Parameter], float]]:
        """``v_h`` at ``rms_h`` as plain vectors; the gate (``w_h``, ``b_h``, unitless) at 1."""
        groups = super().lr_groups(resid_rms)
        gates = [p for h in self.hook_names for p in (self.gate_w[_key(h)], self.gate_b[_key(h)])]
        return [*groups, (gates, 1.0)]

    def kind_config(self) -> dict[str, Any]:
        """``{"gate": "sigmoid" | "linear"}``."""
        return {"gate": self.gate}

    def tensors(self) -> dict[str, Tensor]:
        """``<hook>`` (the vector) and ``gate_w.<hook>`` ``[d_model]``; ``gate_b.<hook>`` (scalar)."""
        out = super().tensors()
        for h in self.hook_names:
            out[f"gate_w.{h}"] = self.gate_w[_key(h)].detach().cpu().contiguous()
            out[f"gate_b.{h}"] = self.gate_b[_key(h)].detach().cpu().contiguous()
        return out

    def _param_for(self, tensor_name: str) -> Tensor:
        if tensor_name.startswith("gate_w."):
            return self.gate_w[_key(tensor_name.removeprefix("gate_w."))]
        if tensor_name.startswith("gate_b."):
            return self.gate_b[_key(tensor_name.removeprefix("gate_b."))]
        return self[tensor_name]


@dataclass(frozen=True)
class GateValues:
    """Per-token gates of a :class:`GatedVectors` module on some texts.

    Attributes:
        gates: ``{hook: [batch, pos]}`` gate values (padding positions are NaN).
        str_tokens: per text, its tokens as strings (BOS first).
        attention_mask: ``[batch, pos]`` 1 for real tokens.
    """

    gates: dict[str, Float[Tensor, "batch pos"]]
    str_tokens: list[list[str]]
    attention_mask: Int[Tensor, "batch pos"]

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

    def plot(self, i: int = 0, hook: str | None = None):
        """Plotly bar chart of the gate per token of text ``i``."""
        import plotly.graph_objects as go

        hook = hook or next(iter(self.gates))
        g = self.of_text(i, hook)
        toks = self.str_tokens[i]
        fig = go.Figure(go.Bar(x=list(range(len(toks))), y=g.tolist(), hovertext=toks))
        fig.update_layout(
            title=f"gate per token at {hook}",
            xaxis={"tickmode": "array", "tickvals": list(range(len(toks))), "ticktext": toks},
            yaxis_title="gate g_t",
        )
        return fig

    def view(self, i: int = 0, hook: str | None = None):
        """circuitsvis ``colored_tokens`` view of the gate per token of text ``i`` (for notebooks)."""
        from steer_lens.plotting import token_view

        hook = hook or next(iter(self.gates))
        return token_view(self.str_tokens[i], self.of_text(i, hook))

    def _repr_html_(self) -> str:
        parts = []
        for h in self.gates:
            g = torch.cat([self.of_text(i, h) for i in range(len(self.str_tokens))])
            parts.append(f"<tr><td>{h}</td><td>{float(g.mean()):.3f}</td><td>{float(g.min()):.3f}</td>"
                         f"<td>{float(g.max()):.3f}</td></tr>")
        return ("<b>GateValues</b><table><tr><th>hook</th><th>mean</th><th>min</th><th>max</th></tr>"
                + "".join(parts) + "</table>")


@torch.no_grad()
def gate_values(steered: SteeredTransformer, texts: str | Sequence[str]) -> GateValues:
    """The gate ``g_t`` per token of a :class:`GatedVectors`-steered model on ``texts``.

    Runs one forward pass with the vectors on and records each hook's gate.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` whose ``vectors`` are :class:`GatedVectors`.
        texts: one text or a list (tokenized with BOS, left-padded).

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
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise EmptyInputError("texts: got none; give at least one text.")
    seqs = [steered.to_tokens(t) for t in texts]
    tokens, mask = steered.left_pad(seqs)
    with steered.vectors.recording() as rec:
        steered(tokens, attention_mask=mask, return_type=None)
    pad = ~mask.bool().cpu()
    gates = {h: rec[h].float().cpu().masked_fill(pad, float("nan")) for h in steered.hook_names}
    tok = steered.model.tokenizer
    str_tokens = [[tok.decode([t]) for t in s.tolist()] for s in seqs]
    return GateValues(gates=gates, str_tokens=str_tokens, attention_mask=mask.cpu())
