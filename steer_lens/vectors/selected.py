"""Per-token selection among several vectors: one vector per variable, added where the variable's tokens are.

:class:`SelectedVectors` - the "tokenwise steering" of Wang, Engels & Clive-Griffin 2025 (repository
JoshEngels/OOCR-Interp, the conditional steering-vector training script of the *functions* task,
whose header reads "For each function name, find all occurrences in the conversation, then create a
mask of shape (batch, seq_len) where the value is n if that token is part of the name of function n,
else -1"). Each hook holds a table of ``K`` vectors, one per variable (e.g. one per function name
``"ttsund"``, ``"kpnazu"`` ...), zero-initialised as the script's ``steering_vecs_FD``; at each
position ``t`` the hook adds ``v[n_t]`` where ``n_t`` is the variable whose name covers token ``t``
and nothing where ``n_t = -1`` (the script's ``cat([steering_vecs_FD, dummy_zero])[fn_occurrences]``
in its ``SteeringHook.__call__``, a forward *pre*-hook on ``model.layers[L]``, i.e. TransformerLens's
``blocks.L.hook_resid_pre``). Registered as kind ``"selected"``.

The selection index ``n_t`` comes from the tokens of the pass: every occurrence of a variable's token
ids (all of its tokens, as the script's ``find_token_pos(..., last_tok_only=False)``) gets that
variable's index, so :func:`~steer_lens.train.sft`, sampling and the analyses that call the wrapper
select by themselves. :meth:`SelectedVectors.selection` overrides it with an explicit index (a mask
given by hand). While decoding with a key/value cache each step sees only its new token: a name of
one token is still matched there, a name of several tokens only within the prompt pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError, ShapeMismatchError
from steer_lens.vectors.base import SteeringVectors
from steer_lens.vectors.registry import register_kind

__all__ = ["SelectedVectors", "selection_index"]


def selection_index(
    tokens: Int[Tensor, "batch pos"], variables: Sequence[Sequence[int]]
) -> Int[Tensor, "batch pos"]:
    """``n`` at every token that is part of an occurrence of variable ``n``'s token ids, else ``-1``.

    A later variable wins where occurrences overlap (the script writes its index in variable order).

    Args:
        tokens: ``[batch, pos]`` token ids.
        variables: per variable, its name's token ids (one or more).

    Returns:
        ``[batch, pos]`` long tensor of variable indices, ``-1`` where no variable is.
    """
    index = torch.full(tokens.shape, -1, dtype=torch.long, device=tokens.device)
    for n, ids in enumerate(variables):
        length = len(ids)
        if length == 0 or length > tokens.shape[1]:
            continue
        var = torch.as_tensor(list(ids), dtype=tokens.dtype, device=tokens.device)
        hits = (tokens.unfold(1, length, 1) == var).all(-1)           # [batch, pos - length + 1]
        covered = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        for k in range(length):
            covered[:, k : k + hits.shape[1]] |= hits
        index[covered] = n
    return index


@register_kind
class SelectedVectors(SteeringVectors):
    """``K`` vectors per hook; at each token the vector of the variable that token belongs to.

    ``act[b, t] += v_h[n_{b,t}]`` with ``n_{b,t}`` from :func:`selection_index` on the pass's tokens
    (or an explicit :meth:`selection`), nothing where ``n = -1``. See the module docstring for the
    paper's script.

    Args:
        hook_names: the hook points (residual-stream width).
        d_model: residual width.
        variables: per variable, its name's token ids (e.g. ``tokenizer(" ttsund",
            add_special_tokens=False)["input_ids"]``), or a mapping ``{label: token ids}``; ``K`` is
            their number.
        init: ``"zeros"`` (default, the script's init) or a ``[K, d_model]`` tensor for every hook or
            a mapping hook -> ``[K, d_model]``.

    Raises:
        ConfigError: no variables, a variable without tokens or with non-integer ids, or a bad ``init``.
        ShapeMismatchError: an init tensor that is not ``[K, d_model]``.
    """

    kind: ClassVar[str] = "selected"

    def __init__(
        self,
        hook_names: Sequence[str],
        d_model: int,
        *,
        variables: Sequence[Any] | Mapping[str, Any],
        init: str | Tensor | Mapping[str, Tensor] = "zeros",
    ) -> None:
        labels, ids = _check_variables(variables)
        self.labels, self.variables = labels, ids
        super().__init__(hook_names, d_model, init="zeros")
        self._explicit: Tensor | None = None
        if not (isinstance(init, str) and init == "zeros"):
            for h, value in self._tables_from(init).items():
                self.set_(h, value)

    def _initial_values(self, init, init_norm, seed) -> dict[str, Tensor]:
        return {h: torch.zeros(len(self.variables), self.d_model) for h in self.hook_names}

    def _tables_from(self, init) -> dict[str, Tensor]:
        if isinstance(init, Tensor):
            return {h: init for h in self.hook_names}
        if isinstance(init, Mapping) and set(init) == set(self.hook_names):
            return dict(init)
        raise ConfigError(f"init: expected 'zeros', a [K, d_model] tensor or a dict hook -> tensor, got {init!r}.")

    # -- access ---------------------------------------------------------------------------------
    @property
    def n_vectors(self) -> int:
        """``K``, the number of variables (vectors per hook)."""
        return len(self.variables)

    def vector(self, hook_name: str, n: int | str) -> Float[Tensor, " d_model"]:
        """Variable ``n``'s vector at ``hook_name`` (``n`` an index or a label)."""
        i = self.labels.index(n) if isinstance(n, str) else int(n)
        return self[hook_name][i]

    @property
    def is_residual_width(self) -> bool:
        """False: each hook holds a table, so analyses of one ``[d_model]`` vector refuse it."""
        return False

    def require_residual_width(self, what: str) -> None:
        """Always raises: the analyses of a single vector do not apply to a table of ``K``.

        Raises:
            ShapeMismatchError: always; read one variable's vector with :meth:`vector`.
        """
        raise ShapeMismatchError(
            f"{what} reads one [d_model] vector per hook, but SelectedVectors hold {self.n_vectors} per hook "
            "(one per variable). Fix: copy one variable's vector, e.g. vectors.vector(hook, 'name'), into a "
            "plain SteeredTransformer(model, [hook], init={hook: v})."
        )

    def set_(self, hook_name: str, value: Tensor) -> None:
        """Overwrite one hook's ``[K, d_model]`` table in place (no autograd), checking shape and finiteness."""
        value = torch.as_tensor(value).detach()
        if tuple(value.shape) != (self.n_vectors, self.d_model):
            raise ShapeMismatchError(f"vectors for {hook_name!r}: expected [K, d_model] = "
                                     f"[{self.n_vectors}, {self.d_model}], got {list(value.shape)}.")
        checked = torch.stack([self._checked(hook_name, row) for row in value])
        with torch.no_grad():
            self[hook_name].copy_(checked.to(self[hook_name].device))

    def clamp_norm_(self, max_norm: float) -> None:
        """Project each variable's vector (each row) onto the ball of radius ``max_norm`` (in place)."""
        with torch.no_grad():
            for h in self.hook_names:
                p = self[h]
                p.mul_(torch.clamp(max_norm / (p.norm(dim=-1, keepdim=True) + 1e-12), max=1.0))

    # -- selection ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def selection(self, index: Tensor) -> Iterator[SelectedVectors]:
        """Context manager: use ``index`` (``[batch, pos]`` over absolute positions, ``-1`` = none)
        instead of the token match, e.g. a hand-made mask. Positions past its end get no vector.

        Raises:
            ConfigError: not a 2-D integer tensor, or an entry outside ``[-1, K)``.
        """
        if not isinstance(index, Tensor) or index.ndim != 2 or index.is_floating_point() or index.dtype == torch.bool:
            raise ConfigError("index: expected a [batch, pos] integer tensor of variable indices (-1: none).")
        if index.numel() and (int(index.min()) < -1 or int(index.max()) >= self.n_vectors):
            raise ConfigError(f"index: entries must lie in [-1, {self.n_vectors}), got "
                              f"[{int(index.min())}, {int(index.max())}].")
        prev, self._explicit = self._explicit, index.long()
        try:
            yield self
        finally:
            self._explicit = prev

    def index_for(self, ctx: Any, batch: int, pos: int, device) -> Int[Tensor, "batch pos"]:
        """The variable index of each position of this pass (``ctx``: the wrapper's position context)."""
        offset = int(getattr(ctx, "offset", 0))
        if self._explicit is not None:
            full = torch.full((self._explicit.shape[0], offset + pos), -1, dtype=torch.long, device=device)
            n = min(self._explicit.shape[1], offset + pos)
            full[:, :n] = self._explicit[:, :n].to(device)
            return full[:, offset:].expand(batch, pos)
        tokens = getattr(ctx, "tokens", None)
        if tokens is None or tuple(tokens.shape) != (batch, pos):
            raise ConfigError(
                "SelectedVectors: this pass has no token ids to select by (e.g. an embedding input or a call "
                "on steered.model directly). Fix: call the wrapper with token ids, or give the index "
                "explicitly with `with steered.vectors.selection(index): ...`."
            )
        return selection_index(tokens.to(device), self.variables)

    def delta_in(self, hook_name: str, act: Float[Tensor, "batch pos d_model"], ctx: Any
                 ) -> Float[Tensor, "batch pos d_model"]:
        """``v_h[n_t]`` per token (zero where ``n_t = -1``), ``[batch, pos, d_model]`` in fp32."""
        index = self.index_for(ctx, act.shape[0], act.shape[1], act.device)
        table = torch.cat([self[hook_name], self[hook_name].new_zeros(1, self.d_model)])  # row K: none
        return table[torch.where(index < 0, self.n_vectors, index)]

    def delta(self, hook_name: str, act: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "..."]:
        """Not defined without the pass's tokens; the wrapper calls :meth:`delta_in`.

        Raises:
            ConfigError: always.
        """
        raise ConfigError("SelectedVectors need the pass's tokens; use them through a SteeredTransformer.")

    # -- persistence ----------------------------------------------------------------------------
    def kind_config(self) -> dict[str, Any]:
        """``{"variables": {label: token ids}}``."""
        return {"variables": {label: list(ids) for label, ids in zip(self.labels, self.variables, strict=True)}}


def _check_variables(variables) -> tuple[list[str], list[tuple[int, ...]]]:
    """``(labels, token-id tuples)`` of the variables, checked."""
    if isinstance(variables, Mapping):
        labels, seqs = [str(k) for k in variables], list(variables.values())
    elif isinstance(variables, Sequence) and not isinstance(variables, str):
        labels, seqs = [str(i) for i in range(len(variables))], list(variables)
    else:
        raise ConfigError("variables: expected a list of token-id lists or a dict label -> token ids.")
    if not seqs:
        raise ConfigError("variables: expected at least one variable (its name's token ids).")
    out = []
    for label, ids in zip(labels, seqs, strict=True):
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        if isinstance(ids, str) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ConfigError(f"variables[{label!r}]: expected a non-empty list of token ids (ints), got {ids!r}. "
                              "Fix: tokenizer(name, add_special_tokens=False)['input_ids'].")
        out.append(tuple(ids))
    return labels, out

