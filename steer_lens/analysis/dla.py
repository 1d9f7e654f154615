"""Direct logit attribution of a steering vector's effect (:func:`vector_dla`).

The logit of a token ``t`` at one position is linear in the final residual stream up to the final
LayerNorm: ``logit_t − b_U[t] = LN(x) · W_U[:, t]`` with ``x = Σ_c x_c`` the sum of what every
component wrote (the embeddings, each attention head, each MLP, the attention output biases and,
in the steered run, the vector itself). Freezing the LayerNorm's scale at the value it had in the
run, each component's *direct* contribution is ``(x_c − mean(x_c)) / scale · w_ln · W_U[:, t]``
(centering only for LayerNorm, not RMSNorm), and the contributions sum exactly to the logit
(minus ``b_U``). This is direct logit attribution (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"; Nanda's TransformerLens ``ActivationCache.decompose_resid`` /
``stack_head_results`` / ``apply_ln_to_stack``, which do the decomposition here).

:func:`vector_dla` does it twice, for the base run and the steered run, so one sees which
components' direct effects the vector changes (steered − base) besides its own direct write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from steer_lens._utils import token_strings, unwrap
from steer_lens.analysis._common import single_token, text_tokens
from steer_lens.errors import ConfigError
from steer_lens.hook_sites import RESIDUAL_KINDS, HookSite
from steer_lens.results import Result
from steer_lens.steering import SteeredTransformer
from steer_lens.train.data import TokenIds
from steer_lens.vectors import SteeringVectors

__all__ = ["VectorDLA", "vector_dla"]

_SITES = ("embed", "pos_embed", *RESIDUAL_KINDS)
"""Hook kinds whose vector is a write into the residual stream (so it has a direct logit effect)."""

Token = str | int
Target = Token | tuple[Token, Token]


@dataclass(frozen=True, kw_only=True)
class VectorDLA(Result):
    """Direct logit attribution of the base and the steered run, per component (see :func:`vector_dla`).

    All values are in logits (of the target, or of the target pair's difference), at one position.

    Attributes:
        labels: one per component, TransformerLens's names where it has them: ``"embed"``,
            ``"pos_embed"`` (models with learned positions), ``"L{l}H{h}"`` (each attention head,
            without ``b_O``), ``"{l}_mlp_out"`` (each MLP, with its output bias), ``"bias"`` (the
            attention output biases ``Σ_l b_O[l]`` plus the final LayerNorm's bias), then
            ``"vector @ <hook>"`` per steered hook.
        kinds: per component ``"embed"``, ``"pos_embed"``, ``"head"``, ``"mlp"``, ``"bias"`` or ``"vector"``.
        layers: per component its block (``None`` for embeddings, bias and vectors).
        base: ``[batch, component]`` direct contributions in the base run (the vectors' are 0).
        steered: ``[batch, component]`` direct contributions in the steered run.
        base_logit: ``[batch]`` the base model's target logit (difference) minus ``b_U``, from its logits.
        steered_logit: ``[batch]`` the same for the steered model.
        targets: per text, the target as text (``"' dog'"`` or ``"' dog' − ' cat'"``).
        position: the position (index into the left-padded tokens; ``-1`` is every text's last token).
        str_tokens: per text, the token at ``position``.
    """

    labels: list[str]
    kinds: list[str]
    layers: list[int | None]
    base: Float[Tensor, "batch component"]
    steered: Float[Tensor, "batch component"]
    base_logit: Float[Tensor, " batch"]
    steered_logit: Float[Tensor, " batch"]
    targets: list[str]
    position: int
    str_tokens: list[str]

    _rank_by = "diff"
    _rank_abs = True

    @property
    def diff(self) -> Float[Tensor, "batch component"]:
        """``steered − base`` per text and component (logits)."""
        return self.steered - self.base

    @property
    def max_error(self) -> float:
        """Largest ``|Σ_components − logit|`` over texts and both runs (logits; ~1e-6 in fp32)."""
        return float(torch.cat([(self.base.sum(-1) - self.base_logit).abs(),
                                (self.steered.sum(-1) - self.steered_logit).abs()]).max())

    def to_pandas(self, per_text: bool = False):
        """One row per component, means over texts: ``component, kind, layer, base, steered, diff``.

        With ``per_text=True``, one row per text and component (with ``text`` and ``target`` columns).
        """
        import pandas as pd

        def rows(i, base, steered):
            return [{"component": c, "kind": k, "layer": layer, "base": b, "steered": s, "diff": s - b}
                    | ({} if i is None else {"text": i, "target": self.targets[i]})
                    for c, k, layer, b, s in zip(self.labels, self.kinds, self.layers, base.tolist(),
                                                 steered.tolist(), strict=True)]

        if per_text:
            return pd.DataFrame([r for i in range(self.base.shape[0]) for r in rows(i, self.base[i], self.steered[i])])
        return pd.DataFrame(rows(None, self.base.mean(0), self.steered.mean(0)))

    def plot(self):
        """Grouped bars per component: base, steered and steered − base (means over texts, logits)."""
        from steer_lens.plotting import bars

        series = {name: (self.labels, values.mean(0)) for name, values in
                  (("base", self.base), ("steered", self.steered), ("steered − base", self.diff))}
        return bars(series, title=f"direct logit attribution of {self.targets[0]!s} at position {self.position}",
                    y_title="direct contribution (logits)", x_title="component")

    def _summary(self) -> str:
        from html import escape

        b, s = float(self.base_logit.mean()), float(self.steered_logit.mean())
        return (f"<b>VectorDLA</b> of {escape(self.targets[0])} at position {self.position} over "
                f"{len(self.targets)} text(s): base {b:.4g} → steered {s:.4g} logits (Δ {s - b:+.4g})")


@torch.no_grad()
def vector_dla(steered: SteeredTransformer, texts: str | TokenIds | Sequence[str | TokenIds],
               target: Target | Sequence[Target], *, position: int = -1) -> VectorDLA:
    """Direct logit attribution of the base and the steered run, per component, and of the vector.

    Method (direct logit attribution, Elhage et al. 2021, computed with TransformerLens): each run's
    cache is decomposed with ``ActivationCache.decompose_resid`` (embeddings, MLP outputs) and
    ``stack_head_results`` (each head, without ``b_O``); the attention output biases
    ``Σ_l b_O[l]`` and each vector's write are added as components of their own. The stack goes
    through ``apply_ln_to_stack`` with *that run's own* cached final LayerNorm scale (centred for
    LayerNorm), then ``· w_ln · W_U[:, t]`` (``w_ln`` the final LayerNorm's weight, 1 when folded);
    the final LayerNorm's bias ``b_ln · W_U[:, t]`` joins ``"bias"``. Each run's scale is used
    because it is the one that run applied: so the components of a run sum to its own logit minus
    ``b_U[t]`` exactly (the check, :attr:`VectorDLA.max_error`). The base run uses the base scale, so
    ``steered − base`` of a component mixes its changed write with the changed scale.

    The vector's term is what the steering hook added at ``position`` (recorded in the run, so
    ``scale``, ``positions`` and :meth:`~steer_lens.SteeredTransformer.only_hooks` apply as in
    ``steered.run_with_cache(tokens)``): at ``hook_resid_pre/mid/post`` it is in no component; at
    ``hook_attn_out`` it is not in the heads; at ``hook_mlp_out`` / ``hook_embed`` /
    ``hook_pos_embed`` TransformerLens's cached component includes it, so it is subtracted there and
    reported as ``"vector @ <hook>"``. Its base value is 0.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` with plain
            :class:`~steer_lens.vectors.SteeringVectors` of shape ``[d_model]``.
        texts: one text or a list (BOS prepended, left-padded), or token ids (``[batch, pos]``, one
            sequence, or a list; BOS first).
        target: a token (string of exactly one token, or id): its logit; a pair ``(a, b)``: the
            logit difference ``logit_a − logit_b``; or a list with one token/pair per text.
        position: the position to attribute, an index into the left-padded tokens (default ``-1``:
            every text's last token).

    Returns:
        A :class:`VectorDLA`: ``base``/``steered`` ``[batch, component]`` in logits, their sums'
        reference values ``base_logit``/``steered_logit`` ``[batch]``.

    Raises:
        ConfigError: another vector kind, a vector at a hook that does not write to the residual
            stream (e.g. ``hook_mlp_in``, ``ln_final.hook_normalized``), a bad target, or a position
            outside the tokens.
        ShapeMismatchError: a vector not of shape ``[d_model]`` (e.g. per-head at ``attn.hook_z``).
        EmptyInputError: no texts.
    """
    _check_vectors(steered)
    model = unwrap(steered)
    tokens, mask, _ = text_tokens(steered, texts)
    n_pos = tokens.shape[1]
    if isinstance(position, bool) or not isinstance(position, int) or not -n_pos <= position < n_pos:
        raise ConfigError(f"position: expected an int in [{-n_pos}, {n_pos}) for these {n_pos} positions, "
                          f"got {position!r}.")
    position = position % n_pos
    ids, target_names = _targets(model, target, tokens.shape[0])
    direction = _unembed_directions(model, ids)
    runs = []
    for on in (False, True):
        logits, cache, deltas = _run(steered, tokens, mask, on)
        values, names = _attribution(model, cache, deltas, direction, position)
        runs.append((values, _target_logit(model, logits[:, position], ids)))
    labels, kinds, layers = (list(x) for x in zip(*names, strict=True))
    return VectorDLA(labels=labels, kinds=kinds, layers=layers, base=runs[0][0], steered=runs[1][0],
                     base_logit=runs[0][1], steered_logit=runs[1][1], targets=target_names, position=position,
                     str_tokens=[token_strings(model, [int(t)])[0] for t in tokens[:, position].tolist()])


def _check_vectors(steered) -> None:
    """Raise unless ``steered`` carries plain ``[d_model]`` vectors at residual-stream writes."""
    if not isinstance(steered, SteeredTransformer):
        raise ConfigError(f"vector_dla: expected a SteeredTransformer, got {type(steered).__name__}.")
    if type(steered.vectors) is not SteeringVectors:
        raise ConfigError(
            f"vector_dla supports plain SteeringVectors, got {type(steered.vectors).__name__}. Fix: copy the "
            "vector it adds into a plain SteeredTransformer(model, hooks, init={hook: v})."
        )
    steered.vectors.require_residual_width("vector_dla")
    bad = [h for h in steered.hook_names if HookSite.parse(h).kind not in _SITES]
    if bad:
        raise ConfigError(
            f"vector_dla: the vectors at {bad} are not written into the residual stream, so they have no direct "
            "logit effect of their own. Fix: use vectors at hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, "
            "hook_embed or hook_pos_embed."
        )


def _one_token(model, token, what: str) -> tuple[int, str]:
    """``(id, repr of its text)`` of one token given as an id or a string of exactly one token."""
    text, tid = single_token(model, token, what)
    return tid, repr(text)


def _targets(model, target, batch: int) -> tuple[list[tuple[int, int | None]], list[str]]:
    """Per text ``(token id, id subtracted or None)`` and its label."""
    if isinstance(target, list):
        if len(target) != batch:
            raise ConfigError(f"target: a list gives one target per text; got {len(target)} for {batch} texts.")
        per_text = target
    else:
        per_text = [target] * batch
    ids, names = [], []
    for i, t in enumerate(per_text):
        if isinstance(t, tuple):
            if len(t) != 2:
                raise ConfigError(f"target: a tuple is a logit-difference pair (a, b); got {len(t)} entries.")
            (a, na), (b, nb) = _one_token(model, t[0], f"target[{i}][0]"), _one_token(model, t[1], f"target[{i}][1]")
            ids.append((a, b))
            names.append(f"{na} − {nb}")
        else:
            a, na = _one_token(model, t, f"target[{i}]")
            ids.append((a, None))
            names.append(na)
    return ids, names


def _unembed_directions(model, ids) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch d_model"]]:
    """Per text ``W_U[:, a] − W_U[:, b]`` (the final LN's bias reads it) and ``w_ln ·`` that (the
    direction the LN-scaled residual is read along; ``w_ln = 1`` when folded)."""
    W_U = model.W_U
    raw = torch.stack([W_U[:, a] - (0 if b is None else W_U[:, b]) for a, b in ids])
    w = getattr(getattr(model, "ln_final", None), "w", None)
    return raw, (raw if w is None else raw * w)


def _target_logit(model, logits: Float[Tensor, "batch d_vocab"], ids) -> Float[Tensor, " batch"]:
    """The model's own target logit (difference) minus ``b_U``, per text (the reference of the sums)."""
    out = logits - model.b_U
    return torch.stack([out[i, a] - (0 if b is None else out[i, b]) for i, (a, b) in enumerate(ids)]).float().cpu()


def _run(steered, tokens, mask, on: bool):
    """One run with a cache of what the decomposition reads, and ``{hook: [batch, pos, d_model]}``
    the vectors' writes (what the steering hook added; zeros in the base run)."""
    model = unwrap(steered)
    hooks = set(steered.hook_names)

    def wanted(name: str) -> bool:
        return name in hooks or name in ("hook_embed", "hook_pos_embed", "ln_final.hook_scale") or name.endswith(
            ("hook_mlp_out", "attn.hook_z", "attn.hook_result"))

    before: dict[str, Tensor] = {}

    def record(act, hook):
        before[hook.name] = act.detach().clone()

    if not on:
        with steered.disabled():
            logits, cache = steered.run_with_cache(tokens, attention_mask=mask, names_filter=wanted)
        return logits, cache, {h: torch.zeros_like(cache[h]) for h in steered.hook_names}
    with model.hooks(fwd_hooks=[(h, record) for h in steered.hook_names]):  # runs before the steering hook
        logits, cache = steered.run_with_cache(tokens, attention_mask=mask, names_filter=wanted)
    return logits, cache, {h: cache[h] - before[h] for h in steered.hook_names}


def _attribution(model, cache, deltas, direction, position: int):
    """Direct contributions ``[batch, component]`` and the components' ``(label, kind, layer)``."""
    embeds_mlps, em_labels = cache.decompose_resid(mode="mlp", pos_slice=position, return_labels=True)
    parts = dict(zip(em_labels, embeds_mlps, strict=True))
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=position, return_labels=True)
    for h, d in deltas.items():  # the vector inside a component TransformerLens caches: take it out
        site = HookSite.parse(h)
        key = {"embed": "embed", "pos_embed": "pos_embed", "mlp_out": f"{site.layer}_mlp_out"}.get(site.kind)
        if key is not None:
            parts[key] = parts[key] - d[:, position]
    rows = [(k, k, None, parts[k]) for k in ("embed", "pos_embed") if k in parts]
    n_heads = int(model.cfg.n_heads)
    for layer in range(int(model.cfg.n_layers)):
        rows += [(head_labels[i], "head", layer, heads[i]) for i in range(layer * n_heads, (layer + 1) * n_heads)]
        if f"{layer}_mlp_out" in parts:
            rows.append((f"{layer}_mlp_out", "mlp", layer, parts[f"{layer}_mlp_out"]))
    rows.append(("bias", "bias", None, sum(block.attn.b_O for block in model.blocks).expand_as(rows[0][3])))
    rows += [(f"vector @ {h}", "vector", None, d[:, position]) for h, d in deltas.items()]
    stack = cache.apply_ln_to_stack(torch.stack([r[3] for r in rows]), layer=None, pos_slice=position)
    values = (stack * direction[1]).sum(-1)
    b_ln = getattr(getattr(model, "ln_final", None), "b", None)
    if b_ln is not None:  # the final LN's bias: a constant, added to the "bias" row
        values[-1 - len(deltas)] += direction[0] @ b_ln
    return values.T.float().cpu(), [r[:3] for r in rows]
