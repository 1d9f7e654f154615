"""How an activation-patching sweep is run: the strategies, and the pure choice among them.

A sweep is *planned* (:func:`steer_lens.patching._sites._plan`: which sites), a *strategy* is chosen
for it here (which work the passes may skip), and the engine *executes* it
(:mod:`steer_lens.patching._sweep`, passes in :mod:`steer_lens.patching._runner`, the last block in
:mod:`steer_lens.patching._last_query`). Every strategy gives the same numbers as TransformerLens's
``patching.get_act_patch_*`` (the tests compare each one); they differ in the work they skip:

* ``"full"``: every pass runs the whole model on all positions (the corrupted batch repeated, many
  sites per pass): the reference the others are checked against.
* ``"prefix"``: a site at block ``l`` cannot change blocks ``< l``: each pass starts at block ``l``
  from the corrupted run's cached block input; a last-position metric unembeds the last position
  only, and all passes' final residuals are unembedded together at the end (only the metric's
  columns for ``logit_diff``-like metrics).
* ``"suffix"``: a site at position ``p`` cannot change positions ``< p``: passes of a by-position
  sweep cover positions ``>= p0`` only, attending to the corrupted run's cached keys/values of the
  earlier ones; sites local to their position run their own block on the pass's positions alone. A
  metric of every position (any plain function of the logits) gets the corrupted run's logits for the
  positions ``< p0`` (they are unchanged, the model being causal); with a last-position metric,
  last-block sites before the last position need no pass.
* ``"last_query"``: (last-position metrics) the last block runs its query, attention output and MLP
  for the last position only; every pass's last block goes into a few merged calls.

Every strategy but ``"full"`` (asked for by name) also leaves out the sites before the first position
where the clean and corrupted tokens differ: their activations are equal, so their value is the
corrupted metric (:func:`steer_lens.patching.activation_patch`; minimal pairs gain most).

Each strategy includes the ones above it. ``"auto"`` (the default) takes the most economical one the
model, the metric and the steering vectors allow; asking for one they do not allow is an error that
says why. What each buys is measured by ``benchmarks/bench_patching.py --strategies`` (see
``docs/benchmarks/patching.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from steer_lens.errors import ConfigError

__all__ = ["STRATEGIES", "Strategy", "choose_strategy"]

STRATEGIES: tuple[str, ...] = ("full", "prefix", "suffix", "last_query")
"""The strategies, each including the work savings of the ones before it."""

StrategyName = Literal["auto", "full", "prefix", "suffix", "last_query"]


@dataclass(frozen=True)
class Strategy:
    """A patching strategy (see the module), as passed to ``activation_patch(strategy=...)``.

    Attributes:
        name: ``"auto"``, ``"full"``, ``"prefix"``, ``"suffix"`` or ``"last_query"``.
        position_groups: ``"suffix"`` / ``"last_query"`` by-position sweeps: the passes per layer, each
            over the positions from its earliest site on (``None``: chosen from the model's width and
            the number of sites; more groups skip more positions but make more, smaller calls).

    Raises:
        ConfigError: unknown name, or ``position_groups`` not a positive integer.
    """

    name: str = "auto"  # one of StrategyName
    position_groups: int | None = None

    def __post_init__(self) -> None:
        if self.name != "auto" and self.name not in STRATEGIES:
            raise ConfigError(
                f"strategy: expected 'auto' or one of {list(STRATEGIES)}, got {self.name!r}."
            )
        g = self.position_groups
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ConfigError(f"position_groups: expected a positive integer or None, got {g!r}.")

    @property
    def level(self) -> int:
        """Index in :data:`STRATEGIES` (``"auto"`` unresolved: -1)."""
        return STRATEGIES.index(self.name) if self.name in STRATEGIES else -1

    @property
    def prefix(self) -> bool:
        """Passes start at the patched block."""
        return self.level >= 1

    @property
    def suffix(self) -> bool:
        """Passes skip the positions before their earliest site."""
        return self.level >= 2

    @property
    def last_query(self) -> bool:
        """The last block runs the last position's query only."""
        return self.level >= 3


def _limits(model, *, last_position_metric: bool, positional: bool, n_pos: int) -> list[str | None]:
    """For each strategy after ``"full"``: ``None`` if this run allows it, else the reason it does not."""
    from transformer_lens import HookedTransformer

    cfg = model.cfg
    pos_type = getattr(cfg, "positional_embedding_type", "")
    prefix = None
    if not isinstance(model, HookedTransformer):
        prefix = f"the model is a {type(model).__name__}, not a HookedTransformer (no start_at_layer)"
    elif pos_type == "shortformer":
        prefix = "shortformer positional embeddings are added at every block (no start_at_layer)"
    suffix = prefix
    if suffix is None:
        if pos_type not in ("standard", "rotary"):
            suffix = f"{pos_type!r} positional embeddings cannot resume from a key/value cache"
        elif getattr(cfg, "use_qk_norm", False) and not hasattr(model.blocks[0].attn, "_apply_qk_norm"):
            suffix = "this TransformerLens cannot apply the q/k norm to cached keys"
        elif positional:
            suffix = "the steering vectors are position-specific (positions other than 'all')"
    last = suffix
    if last is None and not last_position_metric:
        last = "the metric reads more than the last position (a Metric with last_position_only)"
    if last is None:
        last = _last_query_limit(model, n_pos)
    return [prefix, suffix, last]


def _last_query_limit(model, n_pos: int) -> str | None:
    """Why the last block's keys/values cannot be computed apart from its query (None if they can:
    the block feeds ``ln1(resid_pre)`` straight to ``attn.calculate_qkv_matrices`` and caches what it
    returns)."""
    cfg = model.cfg
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - other TransformerLens versions
        return "this TransformerLens has no table of post-norm architectures"
    post_norm = set(POST_NORM_ARCHITECTURES) | {"OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"}
    block = model.blocks[int(cfg.n_layers) - 1]
    if n_pos < 2:
        return "the prompts have one position"
    if getattr(cfg, "use_attn_in", False) or getattr(cfg, "use_split_qkv_input", False):
        return "use_attn_in / use_split_qkv_input give each head its own input"
    if getattr(cfg, "original_architecture", None) in post_norm:
        return f"{cfg.original_architecture} normalises after attention"
    if getattr(cfg, "clip_qkv", None) is not None:
        return "clip_qkv clips the projections inside the block"
    if not hasattr(block, "ln1") or not hasattr(block.attn, "calculate_qkv_matrices"):
        return "the last block has no ln1 / attn.calculate_qkv_matrices"
    return None


def choose_strategy(
    model,
    strategy: str | Strategy = "auto",
    *,
    last_position_metric: bool,
    positional: bool = False,
    n_pos: int,
) -> Strategy:
    """The strategy a sweep runs with: ``strategy`` checked against what this run allows, or for
    ``"auto"`` the most economical one it allows. A pure function of its arguments.

    Args:
        model: the ``HookedTransformer`` (or another model with the shared hook API) being patched.
        strategy: a name (see :data:`STRATEGIES`, or ``"auto"``) or a :class:`Strategy`.
        last_position_metric: the metric reads the last position only (``Metric.last_position_only``).
        positional: the run's steering vectors find their positions by absolute index.
        n_pos: positions of the corrupted prompts.

    Returns:
        A :class:`Strategy` with a resolved name (never ``"auto"``).

    Raises:
        ConfigError: unknown strategy, or one this run does not allow (the message says why and
            which to use instead).
    """
    if isinstance(strategy, str):
        strategy = Strategy(strategy)
    elif not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy: expected a name ('auto', {', '.join(map(repr, STRATEGIES))}) or a "
            f"sl.patching.Strategy, got {type(strategy).__name__}."
        )
    limits = _limits(model, last_position_metric=last_position_metric, positional=positional, n_pos=n_pos)
    allowed = next((i for i, why in enumerate(limits) if why is not None), len(limits))  # levels 0..allowed
    if strategy.name == "auto":
        return Strategy(STRATEGIES[allowed], strategy.position_groups)
    if strategy.level > allowed:
        raise ConfigError(
            f"strategy={strategy.name!r} cannot run here: {limits[strategy.level - 1]}. Fix: use "
            f"strategy={STRATEGIES[allowed]!r} (or 'auto')."
        )
    return strategy
