"""One hook grammar: what a TransformerLens hook name means (layer, kind, head axis, width).

Every module that reads a hook name goes through :class:`HookSite` instead of splitting strings:
the steering wrapper sizes its vectors by :meth:`HookSite.trailing_shape`, the patching sweeps map a
short kind (``"resid_pre"``, ``"z"``) to full names with :meth:`HookSite.name_of`, and the analyses
order residual-stream hooks with :attr:`HookSite.stream_order`.

The grammar is TransformerLens's (``transformer_lens.utils.get_act_name``): block hooks are
``blocks.{layer}.hook_{kind}`` (residual stream, block outputs), ``blocks.{layer}.attn.hook_{kind}``
(per-head attention activations) and ``blocks.{layer}.mlp.hook_{kind}`` (MLP neurons); model-level
hooks are ``hook_embed``, ``hook_pos_embed`` and ``ln_final.hook_normalized``. The per-kind trailing
shapes follow pyvene's per-architecture dimension tables, read from the model's ``cfg``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from steer_lens.errors import HookNameError

__all__ = ["KINDS", "RESIDUAL_KINDS", "HookSite"]

# kind -> (hook name template, trailing dims as cfg attribute names, head axis?)
# trailing dims are the activation's dims after [batch, pos].
KINDS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", ("d_model",), False),
    "attn_out": ("blocks.{}.hook_attn_out", ("d_model",), False),
    "resid_mid": ("blocks.{}.hook_resid_mid", ("d_model",), False),
    "mlp_out": ("blocks.{}.hook_mlp_out", ("d_model",), False),
    "resid_post": ("blocks.{}.hook_resid_post", ("d_model",), False),
    "mlp_in": ("blocks.{}.hook_mlp_in", ("d_model",), False),
    "attn_in": ("blocks.{}.hook_attn_in", ("n_heads", "d_model"), True),
    "q_input": ("blocks.{}.hook_q_input", ("n_heads", "d_model"), True),
    "k_input": ("blocks.{}.hook_k_input", ("n_kv_heads", "d_model"), True),
    "v_input": ("blocks.{}.hook_v_input", ("n_kv_heads", "d_model"), True),
    "q": ("blocks.{}.attn.hook_q", ("n_heads", "d_head"), True),
    "k": ("blocks.{}.attn.hook_k", ("n_kv_heads", "d_head"), True),
    "v": ("blocks.{}.attn.hook_v", ("n_kv_heads", "d_head"), True),
    "z": ("blocks.{}.attn.hook_z", ("n_heads", "d_head"), True),
    "result": ("blocks.{}.attn.hook_result", ("n_heads", "d_model"), True),
    "pattern": ("blocks.{}.attn.hook_pattern", (), True),
    "attn_scores": ("blocks.{}.attn.hook_attn_scores", (), True),
    "mlp_pre": ("blocks.{}.mlp.hook_pre", ("d_mlp",), False),
    "mlp_post": ("blocks.{}.mlp.hook_post", ("d_mlp",), False),
    "embed": ("hook_embed", ("d_model",), False),
    "pos_embed": ("hook_pos_embed", ("d_model",), False),
    "ln_final": ("ln_final.hook_normalized", ("d_model",), False),
}
"""The hook kinds steer_lens knows: full-name template, trailing dims (cfg names), head axis."""

RESIDUAL_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
"""The per-block residual-stream kinds, in the order a block writes them."""

_BY_TEMPLATE = {t.split("{}.", 1)[-1]: k for k, (t, _, _) in KINDS.items()}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HookSite:
    """A parsed hook name: ``blocks.1.attn.hook_z`` -> ``HookSite(name, layer=1, kind="z")``.

    Attributes:
        name: the full TransformerLens hook name.
        layer: the block index, ``None`` for model-level hooks (``hook_embed``, ``ln_final``).
        kind: the short kind (a key of :data:`KINDS`), e.g. ``"resid_pre"``, ``"z"``, ``"mlp_post"``.
    """

    name: str
    layer: int | None
    kind: str

    @classmethod
    def parse(cls, name: str) -> HookSite:
        """Parse a full hook name.

        Raises:
            HookNameError: the name does not follow TransformerLens's grammar for a known kind.
        """
        if not isinstance(name, str):
            raise HookNameError(f"hook name: expected a string such as 'blocks.0.hook_resid_pre', got {name!r}.")
        m = _BLOCK.match(name)
        layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
        kind = _BY_TEMPLATE.get(rest)
        if kind is None or (layer is None) != ("{}" not in KINDS[kind][0]):
            raise HookNameError(
                f"hook {name!r} is not a hook name steer_lens knows; expected e.g. "
                "'blocks.1.hook_resid_pre', 'blocks.0.attn.hook_z' or 'blocks.0.mlp.hook_post' "
                f"(kinds: {sorted(KINDS)})."
            )
        return cls(name, layer, kind)

    @staticmethod
    def name_of(kind: str, layer: int | None = None) -> str:
        """The full hook name of ``kind`` at ``layer`` (as ``transformer_lens.utils.get_act_name``).

        Raises:
            HookNameError: unknown kind, or a block kind without a layer.
        """
        if kind not in KINDS:
            raise HookNameError(f"hook kind {kind!r} is unknown; expected one of {sorted(KINDS)}.")
        template = KINDS[kind][0]
        if "{}" in template:
            if layer is None:
                raise HookNameError(f"hook kind {kind!r} is a block hook; give its layer.")
            return template.format(int(layer))
        return template

    @property
    def has_head_axis(self) -> bool:
        """Whether the activation has a head axis right after ``pos`` (``[batch, pos, head, ...]``)."""
        return KINDS[self.kind][2]

    @property
    def is_residual(self) -> bool:
        """Whether this is a per-block residual-stream hook (``d_model`` wide, see :data:`RESIDUAL_KINDS`)."""
        return self.kind in RESIDUAL_KINDS

    @property
    def stream_order(self) -> tuple[int, int]:
        """``(layer, rank within the block)`` of a residual-stream hook, for ordering along the stream.

        Raises:
            HookNameError: not a residual-stream hook.
        """
        if not self.is_residual or self.layer is None:
            raise HookNameError(
                f"hook {self.name!r} is not on the residual stream of a block; expected "
                "blocks.L.hook_resid_pre / attn_out / resid_mid / mlp_out / resid_post."
            )
        return self.layer, RESIDUAL_KINDS.index(self.kind)

    def trailing_shape(self, cfg: Any) -> tuple[int, ...]:
        """The activation's shape after ``[batch, pos]`` for a model config, e.g. ``(n_heads, d_head)``.

        ``n_kv_heads`` is the config's ``n_key_value_heads`` (grouped-query attention) or ``n_heads``.
        """
        out = []
        for attr in KINDS[self.kind][1]:
            if attr == "n_kv_heads":
                value = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
            else:
                value = getattr(cfg, attr)
            out.append(int(value))
        return tuple(out)
