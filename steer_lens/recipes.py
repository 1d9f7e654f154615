"""Paper recipes: each paper's method with every setting as its public code has it.

steer_lens's own defaults are chosen to serve users (relative learning rates, zero initialisation,
...); a recipe is how a user gets a *paper's* method instead. Each recipe returns a :class:`Recipe`:
the hooks to steer, the training config with the paper's values, where each value comes from, and
what differs from the paper on purpose or by necessity.

* :func:`dunefsky2025` - "One-shot Optimized Steering Vectors Mediate Safety-relevant Behaviors in
  LLMs" (Dunefsky & Cohan 2025), repository jacobdunefsky/one-shot-steering-repro.

The other papers' recipes (Sinii et al. 2025 RL vectors, Wang et al. 2025 LoRA natural vectors,
Ward et al. 2025 rank-1 LoRA SAEs) land with their methods; see the papers issue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steer_lens.errors import ConfigError
from steer_lens.hook_sites import HookSite
from steer_lens.train.one_shot import OneShotConfig

__all__ = ["Recipe", "dunefsky2025"]


@dataclass(frozen=True)
class Recipe:
    """A paper's method, ready to run.

    Attributes:
        paper: the paper's title and authors.
        hooks: the hook points the paper steers, for this model.
        config: the training config with the paper's values.
        sources: setting -> the file (and cell / function) of the paper's code it comes from.
        differs: what this recipe does differently from the paper, and why.
    """

    paper: str
    hooks: tuple[str, ...]
    config: Any
    sources: dict[str, str] = field(default_factory=dict)
    differs: tuple[str, ...] = ()

    def steered(self, model, **kwargs: Any):
        """A :class:`~steer_lens.SteeredTransformer` on ``model`` at the recipe's hooks (kwargs passed on)."""
        from steer_lens.steering import SteeredTransformer

        return SteeredTransformer(model, list(self.hooks), **kwargs)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.sources.items())
        diffs = "".join(f"<li>{d}</li>" for d in self.differs)
        return (f"<b>{self.paper}</b><br>hooks: {list(self.hooks)}<br><table><tr><th>setting</th>"
                f"<th>source</th></tr>{rows}</table>differs:<ul>{diffs}</ul>")


def dunefsky2025(model, *, layer: int | None = None) -> Recipe:
    """One-shot optimised steering vectors (Dunefsky & Cohan 2025), as in ``refusal.ipynb``.

    The paper's refusal experiments on Gemma-2-2B-it (26 layers) steer the input of layer 12 (a
    forward pre-hook on ``model.model.layers[12]``, i.e. ``blocks.12.hook_resid_pre``) and call
    ``optimize_completion(..., lr=0.5, max_iters=30, max_norm=30, target_loss=0.01,
    target_loss_target_iters=1)`` with the function's other defaults (temperature 0.7, ε = 1e-6,
    random initial vector of norm 1, Adam). For another model the default layer is the same relative
    depth, ``round(12 / 26 · n_layers)``.

    Args:
        model: the model to steer (its ``cfg.n_layers`` sets the default layer).
        layer: the block whose ``hook_resid_pre`` carries the vector.

    Returns:
        A :class:`Recipe` whose ``config`` is a :class:`~steer_lens.train.one_shot.OneShotConfig`;
        train with ``steer_lens.train.one_shot.one_shot(recipe.steered(model), examples, recipe.config)``.

    Raises:
        ConfigError: ``layer`` outside ``[0, n_layers)``.
    """
    n_layers = int(model.cfg.n_layers)
    if layer is None:
        layer = round(12 / 26 * n_layers)
    if not 0 <= int(layer) < n_layers:
        raise ConfigError(f"layer: expected 0 <= layer < n_layers={n_layers}, got {layer!r}.")
    nb = "refusal.ipynb, cell 31 (optimize_completion call)"
    fn = "steering_opt.py, optimize_completion signature"
    return Recipe(
        paper="Dunefsky & Cohan 2025, One-shot Optimized Steering Vectors Mediate Safety-relevant Behaviors in LLMs",
        hooks=(HookSite.name_of("resid_pre", int(layer)),),
        config=OneShotConfig(lr=0.5, max_iters=30, max_norm=30.0, target_loss=0.01, target_loss_target_iters=1),
        sources={
            "layer 12 of 26 (resid_pre)": nb, "lr=0.5": nb, "max_iters=30": nb, "max_norm=30": nb,
            "target_loss=0.01, target_loss_target_iters=1": nb, "temperature=0.7 (logits * T)": fn,
            "eps=1e-6": fn, "starting_norm=1 (random direction)": fn, "Adam": fn,
            "summed token losses (normalize_token_length=False)": fn,
        },
        differs=(
            "the target-loss test uses the summed loss over completions (the notebook's "
            "do_target_loss_avg=False checks each completion; identical with one completion per example)",
            "max_norm=30 is in Gemma-2-2B's residual units; other models have other residual norms",
            "the random initial vector is seeded (OneShotConfig.seed) where the paper's is not",
            "prompts may be conversations rendered with the model's own chat template; the paper writes "
            "Gemma's template by hand",
        ),
    )
