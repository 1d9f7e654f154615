"""Path patching of a steering vector: which routes carry its effect to the logits.

A vector ``delta`` added at hook ``h`` reaches the logits along many paths. :func:`path_patch`
measures the length-one and length-two paths separately, each with everything else frozen at the base
(unsteered) run, as in path patching (Wang et al. 2022, IOI; Goldowsky-Dill et al. 2023):

* ``direct``: ``delta`` → final norm → unembedding. Logits of ``ln_final(resid_base + delta)``.
* ``head L.H``: ``delta`` → attention head ``H`` of a later layer ``L`` → final norm → unembedding.
  The head is run on ``resid_pre_base[L] + delta`` (queries, keys and values all see the vector;
  every other component sees the base run) and only the change of *its* output, ``Δz · W_O``, is
  added to the base final residual.
* ``mlp L``: the same for the MLP of layer ``L`` (its input is ``resid_mid_base[L] + delta``).
* ``all_paths``: every path above at once (``ln_final(resid_base + delta + Σ head and MLP changes)``):
  its gap to the total is what longer paths (head → head, head → MLP) add; its gap to the sum of the
  single paths is the non-additivity of the final norm and the metric.
* ``frozen_patterns``: the whole steered run, but with every attention pattern at or after the
  vector's layer replaced by the base run's: queries and keys see the base, values see the steered
  residual. The gap to the total is the part of the effect that works by moving attention.

Effects are changes of the metric relative to the base run. Their sum over paths is compared with the
total effect ``metric(steered) - metric(base)`` (``PathPatchResult.additivity``); what is missing
comes from longer paths (head → head), from the non-linearity of the norms and from the metric.

The "Small Vectors, Big Effects" variants (Sinii et al. 2025, who study a vector in the last block)
act on the first block ``b`` that reads the vector, from that block's steered input ``S`` and base
input ``B``:

* ``skip_attention``: attention of block ``b`` sees ``B``; the residual and the MLP see ``S``;
* ``skip_layer``: block ``b`` runs on ``B`` and ``S - B`` is added after it;
* ``knockout head H``: head ``H``'s output is the base one (the head does not see the vector);
* ``only head H``: every head's output is the base one except head ``H``;
* ``attn_to_residual`` / ``attn_to_mlp`` / ``attn_to_both``: the steered attention output goes only
  to the residual stream (the MLP reads the base attention output), only to the MLP input (the
  residual carries the base attention output), or to both (the plain steered run).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError
from steer_lens.metrics import Metric, MetricFn, call_metric, evaluate_metric
from steer_lens.patching._sites import _check_metric, _check_tokens
from steer_lens.patching.results import PathPatchResult

__all__ = ["path_patch"]


def _hook_site(name: str) -> tuple[int, str]:
    """(layer, kind) of a residual-width hook name."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        kind = parts[2].removeprefix("hook_")
        if kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
            return int(parts[1]), kind
    raise ConfigError(
        f"path_patch: the vector's hook {name!r} is not a residual-stream hook of a block "
        "(blocks.L.hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out)."
    )


def path_patch(
    steered,
    tokens: Int[Tensor, "batch pos"],
    metric: MetricFn | Metric,
    *,
    hook: str | None = None,
    variants: bool = True,
    max_batch: int | None = None,
) -> PathPatchResult:
    """Split a steering vector's effect on ``metric`` into paths (see the module docstring).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` wrapping a ``HookedTransformer``.
        tokens: ``[batch, pos]`` input.
        metric: logits -> scalar (or ``[batch]``), or a :class:`~steer_lens.patching.Metric`.
        hook: which of the vector's hooks to analyse (default: its only hook). Other vectors stay off.
        variants: also run the "Small Vectors, Big Effects" variants on the first block reading the vector.
        max_batch: most sequences per forward pass when evaluating the paths (default: all at once).

    Returns:
        :class:`~steer_lens.patching.PathPatchResult` (effects in the metric's units).

    Raises:
        ConfigError: not a SteeredTransformer over a HookedTransformer, ambiguous or unknown ``hook``.
        MetricError: the metric returns the wrong shape or NaN/inf.
    """
    hook = _check_inputs(steered, hook)
    model = steered.model
    tokens = _check_tokens(tokens, "tokens", model)
    _check_metric(metric)
    run = _PathRun(model, tokens, metric, hook, [(h, fn) for h, fn in steered.fwd_hooks() if h == hook])
    with torch.no_grad():
        base_m, steered_m = run.capture()
        terms, head_keys = run.component_terms()
        keys, out = run.path_metrics(terms, max_batch)
        n_paths = len(keys)
        out.append(run.frozen_patterns_metric())
        b = run.attn_from if run.attn_from < run.n_layers else None  # the first block reading the vector
        variant_names: list[str] = []
        if variants and b is not None:
            for name, x, hooks in run.variant_runs(b):
                variant_names.append(name)
                out.append(call_metric(metric, run.run_from(b, x, hooks)).reshape(1))
        flat = torch.cat([torch.stack([base_m, steered_m]).double()] + [o.double().reshape(-1) for o in out])
        host = flat.cpu()
    if not torch.isfinite(host).all():
        raise MetricError("path_patch: the metric is NaN or inf for some path run.")
    base_v, steered_v = float(host[0]), float(host[1])
    vals = (host[2:] - base_v).tolist()
    effects = dict(zip(keys, vals[:n_paths], strict=True))
    effects["frozen_patterns"] = vals[n_paths]
    variant_vals = dict(zip(variant_names, vals[n_paths + 1 :], strict=True))
    head_effects = None
    if head_keys:
        layers_read = sorted({j for j, _ in head_keys})
        head_effects = torch.tensor([[effects[f"head {j}.{i}"] for i in range(run.n_heads)] for j in layers_read])
    return PathPatchResult(
        effects=effects,
        variants=variant_vals,
        total_effect=steered_v - base_v,
        base_metric=base_v,
        steered_metric=steered_v,
        hook=hook,
        block=b,
        metric_name=getattr(metric, "name", getattr(metric, "__name__", "metric")),
        head_effects=head_effects,
    )


def _check_inputs(steered, hook: str | None) -> str:
    """The hook to analyse, after checking the wrapper (raises ConfigError)."""
    from transformer_lens import HookedTransformer

    from steer_lens.steering import SteeredTransformer

    if not isinstance(steered, SteeredTransformer) or not isinstance(steered.model, HookedTransformer):
        raise ConfigError(
            "steered: expected a SteeredTransformer wrapping a HookedTransformer, got "
            f"{type(steered).__name__}."
        )
    if hook is None:
        if len(steered.hook_names) != 1:
            raise ConfigError(
                f"hook: the vector sits at {list(steered.hook_names)}; pass hook=<one of them> to choose."
            )
        hook = steered.hook_names[0]
    if hook not in steered.hook_names:
        raise ConfigError(
            f"hook: expected one of the vector's hooks {list(steered.hook_names)}, got {hook!r}."
        )
    return hook


def _saver(store: dict[str, Tensor]):
    def save(act, hook):
        store[hook.name] = act.detach()

    return save


class _PathRun:
    """The runs of one path-patching analysis: base and steered caches, then each path's run."""

    def __init__(self, model, tokens: Tensor, metric, hook: str, steer: list) -> None:
        self.model, self.tokens, self.metric, self.hook, self.steer = model, tokens, metric, hook, steer
        cfg = model.cfg
        self.n_layers, self.n_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.batch = tokens.shape[0]
        layer, site = _hook_site(hook)
        # which components read the vector directly
        self.attn_from = layer if site == "resid_pre" else layer + 1
        reads_mid = site == "resid_pre" or (not self.parallel and site in ("resid_mid", "attn_out"))
        self.mlp_from = layer if reads_mid else layer + 1
        self.final = f"blocks.{self.n_layers - 1}.hook_resid_post"
        self.base: dict[str, Tensor] = {}
        self.stv: dict[str, Tensor] = {}

    def _names(self) -> list[str]:
        names = []
        for j in range(self.n_layers):
            names += [f"blocks.{j}.{n}" for n in ("hook_resid_pre", "attn.hook_z", "hook_attn_out",
                                                  "attn.hook_pattern", "hook_mlp_out")]
            if not self.parallel:
                names.append(f"blocks.{j}.hook_resid_mid")
        names.append(self.final)
        return [n for n in names if n in self.model.hook_dict]

    def capture(self) -> tuple[Tensor, Tensor]:
        """Base and steered runs with every needed activation cached; their metrics."""
        model, names, pre = self.model, self._names(), {}
        with model.hooks(fwd_hooks=[(n, _saver(self.base)) for n in names]):
            base_m = call_metric(self.metric, model(self.tokens))
        with model.hooks(fwd_hooks=[(self.hook, _saver(pre)), *self.steer] + [(n, _saver(self.stv)) for n in names]):
            steered_m = call_metric(self.metric, model(self.tokens))
        self.delta = self.stv[self.hook] - pre[self.hook]  # [batch, pos, d_model]: what the vector added
        self.attn_mask = model.input_to_embed(self.tokens)[3]
        return base_m, steered_m

    def run_from(self, j: int, x: Tensor, hooks: list, stop: int | None = None) -> Tensor:
        """The model from block ``j`` on input ``x`` (stacked copies of the batch) with ``hooks``."""
        k = x.shape[0] // self.batch
        m = None if self.attn_mask is None else self.attn_mask.repeat(k, 1)
        with self.model.hooks(fwd_hooks=hooks):
            return self.model(x, start_at_layer=j, stop_at_layer=stop, attention_mask=m)

    def component_terms(self) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
        """1. What each reading component (head, MLP) writes when only it sees the vector."""
        base, delta = self.base, self.delta
        terms: dict[str, Tensor] = {"direct": delta}
        head_keys: list[tuple[int, int]] = []
        for j in range(min(self.attn_from, self.mlp_from), self.n_layers):
            reads_attn, reads_mlp = j >= self.attn_from, j >= self.mlp_from
            got: dict[str, Tensor] = {}
            hooks: list[Any] = [(f"blocks.{j}.attn.hook_z", _saver(got)), (f"blocks.{j}.hook_mlp_out", _saver(got))]
            if not self.parallel:
                mid = base[f"blocks.{j}.hook_resid_mid"] + (delta if reads_mlp else 0)
                hooks.append((f"blocks.{j}.hook_resid_mid", lambda act, hook, mid=mid: mid))
            x = base[f"blocks.{j}.hook_resid_pre"] + (delta if reads_attn else 0)  # parallel: MLP reads x too
            self.run_from(j, x, hooks, stop=j + 1)
            if reads_attn:
                dz = got[f"blocks.{j}.attn.hook_z"] - base[f"blocks.{j}.attn.hook_z"]  # [b, pos, head, d_head]
                w_o = self.model.blocks[j].attn.W_O  # [head, d_head, d_model]
                for i in range(self.n_heads):
                    terms[f"head {j}.{i}"] = dz[:, :, i] @ w_o[i]
                    head_keys.append((j, i))
            if reads_mlp:
                terms[f"mlp {j}"] = got[f"blocks.{j}.hook_mlp_out"] - base[f"blocks.{j}.hook_mlp_out"]
        return terms, head_keys

    def path_metrics(self, terms: dict[str, Tensor], max_batch: int | None) -> tuple[list[str], list[Tensor]]:
        """2. Each term added to the base final residual alone -> logits -> metric (and all at once)."""
        base_final, batch = self.base[self.final], self.batch
        keys = list(terms)
        rows = [base_final + terms[k] for k in keys]
        rows.append(base_final + sum(terms[k] for k in keys))  # every single path at once
        keys.append("all_paths")
        stacked = torch.cat(rows)  # [K * batch, pos, d_model]
        chunk = len(keys) if max_batch is None else max(1, max_batch // batch)
        out = []
        for s in range(0, len(keys), chunk):
            xs = stacked[s * batch : (s + chunk) * batch]
            logits = self.model(xs, start_at_layer=self.n_layers)  # final norm + unembedding only
            out.append(evaluate_metric(self.metric, logits, xs.shape[0] // batch))
        return keys, out

    def frozen_patterns_metric(self) -> Tensor:
        """3. The steered run with attention patterns frozen from the first block that reads the vector."""
        frozen = [
            (f"blocks.{j}.attn.hook_pattern", lambda act, hook: self.base[hook.name])
            for j in range(self.attn_from, self.n_layers)
        ]
        with self.model.hooks(fwd_hooks=self.steer + frozen):
            return call_metric(self.metric, self.model(self.tokens)).reshape(1)

    def variant_runs(self, b: int) -> list[tuple[str, Tensor, list]]:
        """4. The "Small Vectors, Big Effects" variants on block ``b``: (name, block input, hooks)."""
        base, stv = self.base, self.stv
        s_in, b_in = stv[f"blocks.{b}.hook_resid_pre"], base[f"blocks.{b}.hook_resid_pre"]
        z_b, z_s = base[f"blocks.{b}.attn.hook_z"], stv[f"blocks.{b}.attn.hook_z"]
        a_b, a_s = base[f"blocks.{b}.hook_attn_out"], stv[f"blocks.{b}.hook_attn_out"]
        runs: list[tuple[str, Tensor, list]] = [
            ("skip_attention", s_in, [(f"blocks.{b}.hook_attn_out", lambda act, hook: a_b)]),
            ("skip_layer", b_in, [(f"blocks.{b}.hook_resid_post", lambda act, hook: act + (s_in - b_in))]),
            ("attn_to_both", s_in, []),
        ]
        if not self.parallel:
            runs += [
                ("attn_to_residual", s_in, [
                    (f"blocks.{b}.hook_resid_mid", lambda act, hook: s_in + a_b),
                    (f"blocks.{b}.hook_resid_post", lambda act, hook: act + (a_s - a_b)),
                ]),
                ("attn_to_mlp", s_in, [(f"blocks.{b}.hook_resid_post", lambda act, hook: act - (a_s - a_b))]),
            ]
        for i in range(self.n_heads):
            knock = torch.zeros(self.n_heads, dtype=torch.bool, device=z_b.device)
            knock[i] = True
            m_k = knock[None, None, :, None]
            z = f"blocks.{b}.attn.hook_z"
            runs.append((f"knockout head {i}", s_in, [(z, lambda act, hook, m=m_k: torch.where(m, z_b, act))]))
            runs.append((f"only head {i}", s_in, [(z, lambda act, hook, m=m_k: torch.where(m, z_s, z_b))]))
        return runs
