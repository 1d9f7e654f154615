"""One-shot optimised steering vectors (Dunefsky & Cohan 2025), transcribed from the paper's code.

"One-shot Optimized Steering Vectors Mediate Safety-relevant Behaviors in LLMs" optimises one vector
on a single prompt so that given completions become more likely (*promotion*) or less likely
(*suppression*). Every default below is the paper's, from ``steering_opt.py`` in
jacobdunefsky/one-shot-steering-repro (function ``optimize_completion``):

* probabilities ``p = softmax(logits · temperature)`` with ``temperature = 0.7`` (the code
  *multiplies* the logits by the temperature, ``get_completion_loss``);
* promotion loss ``−Σ_t log(p_t + ε)``, suppression loss ``−Σ_t log(1 − p_t + ε)`` (``do_one_minus``),
  **summed** over the completion's tokens (``normalize_token_length=False``), ``ε = 1e-6``; each
  completion's loss is back-propagated on its own and the losses are summed over completions and
  examples;
* a random initial vector of norm ``starting_norm = 1``; Adam with ``lr = 0.01``;
* stop when the summed loss is ``≤ target_loss`` for ``target_loss_target_iters`` checks in a row,
  when it changes by less than ``ε`` between iterations, or after ``max_iters``;
* after each step, project onto the ball of radius ``max_norm`` (when set);
* an example flagged ``negative`` is steered with ``−v`` (``is_negative``);
* **output-constrained optimisation** (``do_output_constr``): then minimise ``||v||`` subject to each
  completion's loss staying ``≤ min(target_loss, its loss + ε)``, with the modified differential
  method of multipliers (the ``mdmm`` package, ``MaxConstraint`` with
  ``scale = ||v|| / (ε + target_loss)``, Adamax), until ``||v||`` stops decreasing; the last vector
  before the increase is kept (``max_iters`` also caps this phase; the paper's has no cap).

Steering at inference as in the paper (ablate the direction, then add it) is
:class:`~steer_lens.vectors.AblateAddVectors`; a wrapper built with it is optimised the same way
(the paper's ``vector_clamp``). What differs: one vector at one hook (the paper's code can tie one
vector across several layers); prompts may be conversations rendered with the chat template.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import Prompt
from steer_lens.config_types import check_field_types
from steer_lens.errors import ConfigError, EmptyInputError, MissingDependencyError

__all__ = ["OneShotConfig", "OneShotExample", "OneShotResult", "completion_loss", "one_shot"]


@dataclass(frozen=True, kw_only=True)
class OneShotExample:
    """One prompt and the completions to promote / suppress (the paper's ``TrainingDatapoint``).

    Attributes:
        prompt: a text (BOS first) or a conversation (chat template, generation prompt added).
        promote: completions to make more likely (``dst_completions``).
        suppress: completions to make less likely (``src_completions``).
        negative: steer this example with ``−v`` (``is_negative``).
    """

    prompt: Prompt
    promote: Sequence[str] = ()
    suppress: Sequence[str] = ()
    negative: bool = False

    def __post_init__(self) -> None:
        if not self.promote and not self.suppress:
            raise ConfigError(
                "OneShotExample: give at least one completion to promote or to suppress "
                "(promote=['...'] or suppress=['...'])."
            )


@dataclass(frozen=True, kw_only=True)
class OneShotConfig:
    """Settings of :func:`one_shot`; every default is ``steering_opt.optimize_completion``'s.

    Attributes:
        lr: Adam learning rate (``lr=0.01``).
        temperature: logits are multiplied by it before the softmax (``temperature=0.7``).
        eps: the ``ε`` in the logs and the convergence test (``eps=1e-6``).
        max_iters: iteration cap (``None``: none, as the paper; convergence or ``target_loss`` stop).
        target_loss: stop once the summed loss is at or below it (``None``: never).
        target_loss_target_iters: consecutive checks needed for either stop (``1``).
        starting_norm: norm of the random initial vector (``1``).
        max_norm: radius of the ball the vector is projected onto after each step (``None``).
        normalize_token_length: divide each completion's loss by its token count (``False``).
        do_output_constr: then minimise ``||v||`` under the loss constraints with MDMM (``False``).
        output_constr_lr: learning rate of that phase (``None``: ``lr``).
        seed: seed of the random initial vector (the paper draws it unseeded).

    Raises:
        ConfigError: a non-positive ``lr``/``temperature``/``starting_norm``/``max_norm``, ``eps < 0``,
            ``max_iters < 0`` or ``target_loss_target_iters < 1``.
    """

    lr: float = 0.01
    temperature: float = 0.7
    eps: float = 1e-6
    max_iters: int | None = None
    target_loss: float | None = None
    target_loss_target_iters: int = 1
    starting_norm: float = 1.0
    max_norm: float | None = None
    normalize_token_length: bool = False
    do_output_constr: bool = False
    output_constr_lr: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("lr", "temperature", "starting_norm"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"OneShotConfig.{name}: expected a positive finite number, got {value!r}.")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"OneShotConfig.max_norm: expected a positive number or None, got {self.max_norm!r}.")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"OneShotConfig.eps: expected a finite number >= 0, got {self.eps!r}.")
        if self.max_iters is not None and self.max_iters < 0:
            raise ConfigError(f"OneShotConfig.max_iters: expected >= 0 or None, got {self.max_iters!r}.")
        if self.target_loss_target_iters < 1:
            raise ConfigError(
                f"OneShotConfig.target_loss_target_iters: expected >= 1, got {self.target_loss_target_iters!r}."
            )


@dataclass(frozen=True)
class OneShotResult:
    """What :func:`one_shot` returns (the vector itself is left in the wrapper).

    Attributes:
        loss: the summed loss of the last iteration's vector (nats).
        losses: per iteration, the summed loss (nats).
        completion_losses: per example, ``{"promote": [...], "suppress": [...]}`` losses (nats).
        iters: optimisation steps taken.
        norm: the final vector's L2 norm.
        output_constr_iters: steps of the MDMM phase (0 without it).
    """

    loss: float
    losses: list[float]
    completion_losses: list[dict[str, list[float]]]
    iters: int
    norm: float
    output_constr_iters: int = 0
    norms: list[float] = field(default_factory=list)

    def to_pandas(self):
        """Table ``iteration, loss``."""
        import pandas as pd

        return pd.DataFrame({"iteration": range(len(self.losses)), "loss": self.losses})

    def plot(self):
        """Plotly line of the summed loss per iteration."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(y=self.losses, mode="lines"))
        fig.update_layout(title="one-shot optimisation", xaxis_title="iteration", yaxis_title="summed loss (nats)")
        return fig

    def _repr_html_(self) -> str:
        return (f"<b>OneShotResult</b>: loss {self.loss:.4f} nats after {self.iters} iterations, "
                f"‖v‖ = {self.norm:.3f}, MDMM iterations {self.output_constr_iters}")


def completion_loss(
    logits: Float[Tensor, "pos d_vocab"],
    completion: Int[Tensor, " n"],
    prompt_len: int,
    *,
    suppress: bool,
    temperature: float = 0.7,
    eps: float = 1e-6,
    normalize_token_length: bool = False,
) -> Float[Tensor, ""]:
    """The loss of one completion given the logits of ``prompt + completion`` (``get_completion_loss``).

    ``p_t = softmax(logits · temperature)[prompt_len + t − 1, completion[t]]``; promotion
    ``−Σ_t log(p_t + ε)``, suppression ``−Σ_t log(1 − p_t + ε)``; divided by the token count when
    ``normalize_token_length``. Units: nats.
    """
    probs = torch.softmax(logits.float() * temperature, dim=-1)
    rows = torch.arange(completion.shape[0], device=logits.device) + prompt_len - 1
    p = probs[rows, completion.to(logits.device)]
    loss = -(torch.log(1 - p + eps) if suppress else torch.log(p + eps)).sum()
    return loss / completion.shape[0] if normalize_token_length else loss


@dataclass(frozen=True)
class _Item:
    tokens: Tensor  # [1, prompt + completion]
    prompt_len: int
    completion: Tensor  # [n]
    suppress: bool
    negative: bool
    example: int


def _completion_ids(steered, prompt: Prompt, prompt_ids: Tensor, text: str) -> Tensor:
    """The completion's tokens as the paper takes them: ``tokens(prompt + completion)[prompt_len:]``.

    Where the tokenizer merges across the boundary (``tokens(prompt + completion)`` does not start
    with the prompt's tokens, e.g. ``" a" + " girl"`` -> ``" a girl"``), the paper's slice would cut a
    wrong completion; the completion is then tokenised alone, as it is for a conversation (whose
    rendered prompt ends in special tokens).
    """
    if isinstance(prompt, str):
        full = steered.to_tokens(prompt + text)
        n = prompt_ids.shape[0]
        if full.shape[0] > n and torch.equal(full[:n], prompt_ids):
            return full[n:]
    ids = steered.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device=prompt_ids.device)


def _items(steered, examples: Sequence[OneShotExample]) -> list[_Item]:
    """Every (example, completion) pair, tokenised once."""
    items = []
    for i, ex in enumerate(examples):
        prompt_ids = steered.prompt_tokens(ex.prompt)
        plen = int(prompt_ids.shape[0])
        for suppress, completions in ((True, ex.suppress), (False, ex.promote)):
            for text in completions:
                comp = _completion_ids(steered, ex.prompt, prompt_ids, text)
                if comp.shape[0] == 0:
                    raise EmptyInputError(f"examples[{i}]: the completion {text!r} has no tokens.")
                full = torch.cat([prompt_ids, comp])[None]
                items.append(_Item(full, plen, comp, suppress, ex.negative, i))
    return items


def _item_loss(steered, item: _Item, cfg: OneShotConfig) -> Tensor:
    scale = -steered.scale if item.negative else steered.scale
    with steered.scaled(scale):
        logits = steered(item.tokens, prompt_lengths=[item.prompt_len])[0]
    return completion_loss(logits, item.completion, item.prompt_len, suppress=item.suppress,
                           temperature=cfg.temperature, eps=cfg.eps,
                           normalize_token_length=cfg.normalize_token_length)


def _check(steered, examples) -> str:
    if len(steered.hook_names) != 1:
        raise ConfigError(
            f"one_shot optimises one vector; the wrapper has vectors at {list(steered.hook_names)}. "
            "Fix: SteeredTransformer(model, hooks=['blocks.L.hook_resid_pre'])."
        )
    if not examples:
        raise EmptyInputError("examples: got none; give at least one OneShotExample.")
    bad = [i for i, e in enumerate(examples) if not isinstance(e, OneShotExample)]
    if bad:
        raise ConfigError(f"examples{bad}: expected OneShotExample(prompt=..., promote=[...]/suppress=[...]).")
    return steered.hook_names[0]


def one_shot(steered, examples: Sequence[OneShotExample], config: OneShotConfig | None = None) -> OneShotResult:
    """Optimise the wrapper's one vector on a few examples (Dunefsky & Cohan 2025, ``optimize_completion``).

    The vector is re-initialised at random (norm ``starting_norm``) and optimised in place; see the
    module docstring for the objective and the stopping rules.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` with exactly one hook (e.g.
            ``blocks.L.hook_resid_pre``, the paper's site); its ``positions`` and ``scale`` apply.
        examples: the prompts and completions (:class:`OneShotExample`).
        config: :class:`OneShotConfig` (default: the paper's settings).

    Returns:
        A :class:`OneShotResult`.

    Raises:
        ConfigError: several hooks, or an example that is not a :class:`OneShotExample`.
        EmptyInputError: no examples, or a completion with no tokens.
        MissingDependencyError: ``do_output_constr`` without the ``mdmm`` package.
    """
    cfg = config or OneShotConfig()
    hook = _check(steered, examples)
    items = _items(steered, examples)
    vector = steered.vectors[hook]
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    with torch.no_grad():
        init = torch.randn(vector.shape, generator=gen)
        vector.copy_((cfg.starting_norm * init / init.norm()).to(vector.device))
    with steered.gradients():  # steered calls record the graph into the vector only inside it
        per_item, losses, iters = _optimise(steered, items, vector, cfg)
        out_iters = 0
        if cfg.do_output_constr:
            out_iters = _output_constrained(steered, items, vector, per_item, cfg)
    completion_losses = [{"promote": [], "suppress": []} for _ in examples]
    for item, value in zip(items, per_item, strict=True):
        completion_losses[item.example]["suppress" if item.suppress else "promote"].append(value)
    return OneShotResult(loss=sum(per_item), losses=losses, completion_losses=completion_losses,
                         iters=iters, norm=float(vector.detach().norm()), output_constr_iters=out_iters)


def _optimise(steered, items: list[_Item], vector: Tensor, cfg: OneShotConfig):
    """The main loop of ``optimize_completion`` (stopping tests at the top, as the paper's code)."""
    optimizer = torch.optim.Adam([vector], lr=cfg.lr)
    loss = prev_loss = None
    iters = target_hits = converged = 0
    per_item: list[float] = [math.inf] * len(items)
    losses: list[float] = []
    while True:
        if cfg.max_iters is not None and iters > cfg.max_iters:
            break
        if cfg.target_loss is not None and loss is not None:
            target_hits = target_hits + 1 if loss <= cfg.target_loss else 0
            if target_hits >= cfg.target_loss_target_iters:
                break
        optimizer.zero_grad()
        prev_loss, loss = loss, 0.0
        for k, item in enumerate(items):
            cur = _item_loss(steered, item, cfg)
            per_item[k] = float(cur.detach())
            loss += per_item[k]
            cur.backward()
        losses.append(loss)
        if prev_loss is not None and abs(prev_loss - loss) < cfg.eps:
            converged += 1
        if converged >= cfg.target_loss_target_iters:
            break
        optimizer.step()
        if cfg.max_norm is not None:
            with torch.no_grad():
                n = vector.norm()
                if n > cfg.max_norm:
                    vector.mul_(cfg.max_norm / n)
        iters += 1
    return per_item, losses, iters


def _output_constrained(steered, items: list[_Item], vector: Tensor, per_item: list[float],
                        cfg: OneShotConfig) -> int:
    """Minimise ``||v||`` subject to each completion's loss bound, with MDMM (the paper's second phase)."""
    try:
        import mdmm
    except ImportError as e:
        raise MissingDependencyError(
            "do_output_constr needs the `mdmm` package. Fix: pip install mdmm (or steer-lens, which "
            "depends on it)."
        ) from e
    target = cfg.target_loss if cfg.target_loss is not None else max(per_item)
    scale = float(vector.detach().norm()) / (cfg.eps + target)
    constraints = [
        mdmm.MaxConstraint((lambda it=item: _item_loss(steered, it, cfg)), scale=scale,
                           max=min(target, per_item[k] + cfg.eps))
        for k, item in enumerate(items)
    ]
    module = mdmm.MDMM(constraints)
    optimizer = module.make_optimizer([vector], lr=cfg.output_constr_lr or cfg.lr)
    loss = prev_loss = None
    prev_vec = vector.detach().clone()
    iters = 0
    while prev_loss is None or loss <= prev_loss:
        if cfg.max_iters is not None and iters > cfg.max_iters:
            break
        prev_loss = loss
        prev_vec = vector.detach().clone()
        optimizer.zero_grad()
        norm = torch.linalg.norm(vector)
        norm.backward()
        loss = float(norm.detach())
        for c in module:
            c().value.backward()
        optimizer.step()
        iters += 1
    with torch.no_grad():
        vector.copy_(prev_vec)
    return iters
