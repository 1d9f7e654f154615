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

``variants="full"`` adds the rest of the paper's head experiments (see :func:`path_patch`): every head
variant routed to ``all`` / ``residual`` / ``mlp``, q-only / k-only / v-only patches and their
inverses, and key-value-group patches; ``kl=True`` adds the paper's per-token KL next to the metric.

Paper code followed (corl-team/steering-reasoning, read in its public fork robertnward/steering-reasoning
at commit caf560b): ``steering_reasoning/models/head_patched_path/llama/transformers.py``,
``PatchedLlamaDecoderLayer.forward`` (head / inverse_head, L111-120; routes all / residual / mlp,
L137-145; skip_attn / skip_layer, L121-126 and L154-155); ``steering_reasoning/models/head_patched/
llama/vllm.py``, ``LlamaLastLayer.__call__`` (q_proj ... inverse_all_v_proj, L78-125, patched before
the rotary embedding, the residual stream steered); ``steering_reasoning/metrics/
pre_last_layer_steering.py`` (per-token ``KL(P || Q)`` in float64 of tempered logits, clamped at 0,
L74-163; its reference ``P``: the unpatched steered run for ``head``, ``skip_attn`` otherwise, L176).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError, MetricError
from steer_lens.metrics import Metric, MetricFn, call_metric, evaluate_metric
from steer_lens.patching._sites import _check_metric, _check_tokens
from steer_lens.patching.results import PathPatchResult, warn_if_noisy

__all__ = ["check_path_inputs", "first_reading_block", "path_patch", "per_token_kl"]

_KL_REFERENCES = ("paper", "steered", "base")
_ROUTES = ("all", "residual", "mlp")


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
    variants: bool | str = True,
    kl: bool | str = False,
    temperature: float = 1.0,
    max_batch: int | None = None,
    group_sets: Sequence[Sequence[int]] = (),
) -> PathPatchResult:
    """Split a steering vector's effect on ``metric`` into paths (see the module docstring).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` wrapping a ``HookedTransformer``.
        tokens: ``[batch, pos]`` input.
        metric: logits -> scalar (or ``[batch]``), or a :class:`~steer_lens.patching.Metric`.
        hook: which of the vector's hooks to analyse (default: its only hook). Other vectors stay off.
        variants: ``True``: the "Small Vectors, Big Effects" variants on the first block ``b`` reading the
            vector (skip_attention, skip_layer, attn_to_*, ``knockout head H`` / ``only head H``);
            ``"full"``: those, with each head variant routed (``"knockout head H -> all|residual|mlp"``,
            ``"only head H -> ..."``, replacing ``knockout head H`` / ``only head H``, which equal
            ``-> all``), plus ``"knockout q head H"`` / ``"only q head H"``, ``"knockout k kv-head G"``,
            ``"knockout v kv-head G"`` (and ``only``), ``"knockout v all heads"`` / ``"only v all
            heads"`` and ``"knockout group G"`` / ``"only group G"`` (the query heads sharing key-value
            head ``G``) -- the paper's ``head`` / ``inverse_head`` x ``patch_path``, ``q_proj`` ...
            ``inverse_all_v_proj`` and ``group`` / ``inverse_group``; ``False``: none.
        kl: also the per-token ``KL(p_ref || p_variant)`` of every variant (``[batch, pos]``, NaN at padding):
            ``True`` / ``"paper"``: ``p_ref`` is the steered run, or the ``skip_attention`` run for the
            ``only ...`` variants (pre_last_layer_steering.py L176); ``"steered"`` / ``"base"``: that run
            for every variant. Needs ``variants``.
        temperature: the logits are divided by it before the KL (the paper's sampling temperature).
        max_batch: most sequences per forward pass when evaluating the paths (default: all at once).
        group_sets: sets of key-value groups patched together, as ``"knockout groups 3+5"`` /
            ``"only groups 3+5"`` (the paper's ``group3_and`` ... ``inverse_group7_and1_and5_and``: see
            :func:`~steer_lens.patching.path_generation.group_combinations`); needs ``variants``.

    Returns:
        :class:`~steer_lens.patching.PathPatchResult` (effects in the metric's units; ``variant_kl``
        when ``kl``).

    Raises:
        ConfigError: not a SteeredTransformer over a HookedTransformer, ambiguous or unknown ``hook``,
            unknown ``variants`` / ``kl``, ``kl`` without variants, ``temperature <= 0``, a group outside
            ``[0, n_key_value_heads)`` in ``group_sets``.
        MetricError: the metric returns the wrong shape or NaN/inf.
    """
    hook = check_path_inputs(steered, hook)
    kl_ref = _check_options(variants, kl, temperature)
    model = steered.model
    tokens = _check_tokens(tokens, "tokens", model)
    _check_metric(metric)
    run = _PathRun(model, tokens, metric, hook, [(h, fn) for h, fn in steered.fwd_hooks() if h == hook])
    run.keep_logits = kl_ref is not None
    run.group_sets = _check_group_sets(group_sets, run.n_kv)
    with torch.no_grad():
        base_m, steered_m = run.capture()
        terms, head_keys = run.component_terms()
        keys, out = run.path_metrics(terms, max_batch)
        n_paths = len(keys)
        out.append(run.frozen_patterns_metric())
        b = run.attn_from if run.attn_from < run.n_layers else None  # the first block reading the vector
        variant_names, variant_kl = [], {}
        if variants and b is not None:
            variant_names, vals, variant_kl = run.variant_values(b, variants == "full", kl_ref, temperature)
            out += vals
        flat = torch.cat([torch.stack([base_m, steered_m]).double()] + [o.double().reshape(-1) for o in out])
        host = flat.cpu()
    if not torch.isfinite(host).all():
        raise MetricError("path_patch: the metric is NaN or inf for some path run.")
    base_v, steered_v = float(host[0]), float(host[1])
    floor = warn_if_noisy(steered_v, base_v, model.cfg.dtype, what="path_patch", names=("steered", "base"))
    vals = (host[2:] - base_v).tolist()
    effects = dict(zip(keys, vals[:n_paths], strict=True))
    effects["frozen_patterns"] = vals[n_paths]
    head_effects = None
    if head_keys:
        layers_read = sorted({j for j, _ in head_keys})
        head_effects = torch.tensor([[effects[f"head {j}.{i}"] for i in range(run.n_heads)] for j in layers_read])
    return PathPatchResult(
        effects=effects,
        variants=dict(zip(variant_names, vals[n_paths + 1 :], strict=True)),
        total_effect=steered_v - base_v,
        base_metric=base_v,
        steered_metric=steered_v,
        hook=hook,
        block=b,
        metric_name=getattr(metric, "name", getattr(metric, "__name__", "metric")),
        head_effects=head_effects,
        variant_kl=variant_kl if kl_ref is not None and variant_names else None,
        kl_reference=kl_ref,
        noise_floor=floor,
    )


def _check_options(variants, kl, temperature: float) -> str | None:
    """The KL reference (``None``: no KL) after checking ``variants``, ``kl``, ``temperature``."""
    if not (isinstance(variants, bool) or variants == "full"):
        raise ConfigError(f"variants: expected True, False or 'full', got {variants!r}.")
    if kl is False:
        return None
    ref = "paper" if kl is True else kl
    if ref not in _KL_REFERENCES:
        raise ConfigError(f"kl: expected a bool or one of {list(_KL_REFERENCES)}, got {kl!r}.")
    if not variants:
        raise ConfigError("kl: the per-token KL is computed for the variants; pass variants=True or 'full'.")
    if not temperature > 0:
        raise ConfigError(f"temperature: expected > 0, got {temperature!r}.")
    return ref


def per_token_kl(
    p_logits: Float[Tensor, "*batch vocab"],
    q_logits: Float[Tensor, "*batch vocab"],
    *,
    temperature: float = 1.0,
) -> Float[Tensor, "*batch"]:
    """Per-token ``KL(P || Q)`` of two sets of next-token logits, as the paper computes it.

    ``P = softmax(p_logits / temperature)``, ``Q = softmax(q_logits / temperature)``, in float64, clamped
    at 0 (corl-team/steering-reasoning, steering_reasoning/metrics/pre_last_layer_steering.py,
    ``kl_categorical_rowwise_chunked_math_f64_out_bf16``, L74-163: ``kl_divergence(Categorical(P),
    Categorical(Q)).clamp_min(0)`` row by row; P is the reference run, Q the patched one).

    Args:
        p_logits: ``[*batch, vocab]`` logits of the reference distribution ``P``.
        q_logits: ``[*batch, vocab]`` logits of ``Q`` (same shape).
        temperature: divides both before the softmax (> 0).

    Returns:
        ``[*batch]`` float64 KL in nats, one per position.
    """
    lp = torch.log_softmax(p_logits.double() / temperature, dim=-1)
    lq = torch.log_softmax(q_logits.double() / temperature, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)


def check_path_inputs(steered, hook: str | None) -> str:
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


def first_reading_block(hook: str, cfg) -> int | None:
    """The first block whose attention reads the vector at residual-width ``hook`` (the block the variants
    act on), or ``None`` when it is past the last block. Raises ConfigError for other hooks."""
    layer, site = _hook_site(hook)
    b = layer if site == "resid_pre" else layer + 1
    return b if b < int(cfg.n_layers) else None


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
        self.n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)  # key-value heads (GQA)
        self.keep_logits = False  # keep the base and steered logits (for the KL)
        self.group_sets: list[tuple[int, ...]] = []  # multi-group variants (group_set_runs)
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
        names += [f"blocks.{self.attn_from}.attn.hook_{p}" for p in "qkv"]  # the q/k/v variants' base values
        return [n for n in names if n in self.model.hook_dict]

    def capture(self) -> tuple[Tensor, Tensor]:
        """Base and steered runs with every needed activation cached; their metrics."""
        model, names, pre = self.model, self._names(), {}
        with model.hooks(fwd_hooks=[(n, _saver(self.base)) for n in names]):
            base_logits = model(self.tokens)
        with model.hooks(fwd_hooks=[(self.hook, _saver(pre)), *self.steer] + [(n, _saver(self.stv)) for n in names]):
            steered_logits = model(self.tokens)
        base_m, steered_m = call_metric(self.metric, base_logits), call_metric(self.metric, steered_logits)
        if self.keep_logits:
            self.ref_logits = {"base": base_logits, "steered": steered_logits}
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

    def variant_values(
        self, b: int, full: bool, kl_ref: str | None, temperature: float
    ) -> tuple[list[str], list[Tensor], dict[str, Tensor]]:
        """4. Run every variant on block ``b``: names, metric values and (when ``kl_ref``) per-token KL."""
        runs = self.variant_runs(b, full)
        if full:
            runs += self.head_route_runs(b) + self.qkv_runs(b) + self.group_runs(b)
        runs += self.group_set_runs(b)
        names, vals, kls = [], [], {}
        refs = getattr(self, "ref_logits", {})
        pad = None if self.attn_mask is None else self.attn_mask == 0  # [batch, pos]: padding
        for name, x, hooks in runs:
            logits = self.run_from(b, x, hooks)
            names.append(name)
            vals.append(call_metric(self.metric, logits).reshape(1))
            if kl_ref is None:
                continue
            if name == "skip_attention":
                refs["skip_attention"] = logits
            ref = "skip_attention" if kl_ref == "paper" and name.startswith("only ") else kl_ref
            ref = "steered" if ref == "paper" else ref
            kl = per_token_kl(refs[ref], logits, temperature=temperature)
            kls[name] = (kl if pad is None else kl.masked_fill(pad.to(kl.device), float("nan"))).cpu()
        return names, vals, kls

    def variant_runs(self, b: int, full: bool = False) -> list[tuple[str, Tensor, list]]:
        """4a. The "Small Vectors, Big Effects" variants on block ``b``: (name, block input, hooks)."""
        base, stv = self.base, self.stv
        s_in, b_in = stv[f"blocks.{b}.hook_resid_pre"], base[f"blocks.{b}.hook_resid_pre"]
        z_b = base[f"blocks.{b}.attn.hook_z"]
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
        for i in range(0 if full else self.n_heads):  # "full": routed per-head variants instead
            mask = _mask(self.n_heads, [i], z_b)
            runs += [(f"{kind} head {i}", s_in, self._z_hooks(b, mask, kind)) for kind in ("knockout", "only")]
        return runs

    def _z_hooks(self, b: int, mask: Tensor, kind: str) -> list:
        """``knockout``: the masked heads' outputs (``hook_z``) from the base run, the others steered;
        ``only``: the masked heads' outputs steered, the others from the base run."""
        z = f"blocks.{b}.attn.hook_z"
        z_b, z_s = self.base[z], self.stv[z]
        if kind == "knockout":
            return [(z, lambda act, hook: torch.where(mask, z_b, act))]
        return [(z, lambda act, hook: torch.where(mask, z_s, z_b))]

    def _route_hooks(self, b: int, route: str) -> list:
        """Send the run's attention output of block ``b`` only along ``route``; the other path reads the
        steered attention output (head_patched_path/llama/transformers.py L137-145)."""
        if route == "all":
            return []
        a_s, own = self.stv[f"blocks.{b}.hook_attn_out"], {}

        def save(act, hook):
            own["a"] = act

        mid, post = f"blocks.{b}.hook_resid_mid", f"blocks.{b}.hook_resid_post"
        if route == "residual":  # the MLP reads S + a_steered; the residual carries S + a_patched
            return [(f"blocks.{b}.hook_attn_out", save), (mid, lambda act, hook: act - own["a"] + a_s),
                    (post, lambda act, hook: act + own["a"] - a_s)]
        # "mlp": the MLP reads S + a_patched; the residual carries S + a_steered
        return [(f"blocks.{b}.hook_attn_out", save), (post, lambda act, hook: act + a_s - own["a"])]

    def head_route_runs(self, b: int) -> list[tuple[str, Tensor, list]]:
        """4b. ``knockout head H -> route`` / ``only head H -> route`` (the paper's head / inverse_head
        x patch_path; parallel attention + MLP blocks have only ``all``)."""
        s_in, z_b = self.stv[f"blocks.{b}.hook_resid_pre"], self.base[f"blocks.{b}.attn.hook_z"]
        routes = ("all",) if self.parallel else _ROUTES
        runs = []
        for i in range(self.n_heads):
            for kind in ("knockout", "only"):
                z_hooks = self._z_hooks(b, _mask(self.n_heads, [i], z_b), kind)
                runs += [(f"{kind} head {i} -> {r}", s_in, z_hooks + self._route_hooks(b, r)) for r in routes]
        return runs

    def _qkv_hooks(self, b: int, part: str, mask: Tensor, kind: str) -> list:
        """``knockout``: ``part`` (q, k or v, before the rotary embedding) of the masked heads from the base
        run, everything else steered; ``only``: the masked heads' ``part`` steered, every other q / k / v
        from the base run (head_patched/llama/vllm.py L78-125)."""
        base = self.base
        name = f"blocks.{b}.attn.hook_{part}"
        if kind == "knockout":
            return [(name, lambda act, hook: torch.where(mask, base[hook.name], act))]
        rest = [(f"blocks.{b}.attn.hook_{p}", lambda act, hook: base[hook.name]) for p in "qkv" if p != part]
        return [(name, lambda act, hook: torch.where(mask, act, base[hook.name])), *rest]

    def qkv_runs(self, b: int) -> list[tuple[str, Tensor, list]]:
        """4c. q-only / k-only / v-only patches and their inverses: per query head for q, per key-value head
        for k and v (the paper's q_proj, k_proj, v_proj, inverse_*), and v of all heads (all_v_proj)."""
        s_in, ref = self.stv[f"blocks.{b}.hook_resid_pre"], self.base[f"blocks.{b}.attn.hook_z"]
        runs = []
        kinds = ("knockout", "only")
        for part, n, unit in (("q", self.n_heads, "head"), ("k", self.n_kv, "kv-head"), ("v", self.n_kv, "kv-head")):
            for i in range(n):
                mask = _mask(n, [i], ref)
                runs += [(f"{kind} {part} {unit} {i}", s_in, self._qkv_hooks(b, part, mask, kind)) for kind in kinds]
        every = _mask(self.n_kv, range(self.n_kv), ref)
        runs += [(f"{kind} v all heads", s_in, self._qkv_hooks(b, "v", every, kind)) for kind in kinds]
        return runs

    def group_runs(self, b: int) -> list[tuple[str, Tensor, list]]:
        """4d. ``knockout group G`` / ``only group G``: the outputs of all query heads that share key-value
        head ``G`` (query head ``i`` reads key-value head ``i // (n_heads / n_kv)``, as TransformerLens's and
        HF's ``repeat_kv`` do), like the head variants (the paper's group / inverse_group)."""
        s_in, z_b = self.stv[f"blocks.{b}.hook_resid_pre"], self.base[f"blocks.{b}.attn.hook_z"]
        rep = self.n_heads // self.n_kv
        runs = []
        for g in range(self.n_kv):
            mask = _mask(self.n_heads, range(g * rep, (g + 1) * rep), z_b)
            runs += [(f"{kind} group {g}", s_in, self._z_hooks(b, mask, kind)) for kind in ("knockout", "only")]
        return runs

    def group_set_runs(self, b: int) -> list[tuple[str, Tensor, list]]:
        """4e. ``knockout groups a+b`` / ``only groups a+b``: the group variants on the union of the groups'
        query heads (the paper's multi-group ``group3_and`` ... ``inverse_group7_and1_and5_and``)."""
        s_in, z_b = self.stv[f"blocks.{b}.hook_resid_pre"], self.base[f"blocks.{b}.attn.hook_z"]
        rep = self.n_heads // self.n_kv
        runs = []
        for gs in self.group_sets:
            mask = _mask(self.n_heads, [h for g in gs for h in range(g * rep, (g + 1) * rep)], z_b)
            label = "+".join(map(str, gs))
            runs += [(f"{kind} groups {label}", s_in, self._z_hooks(b, mask, kind)) for kind in ("knockout", "only")]
        return runs


def _check_group_sets(group_sets, n_kv: int) -> list[tuple[int, ...]]:
    """``group_sets`` as sorted tuples of distinct groups (raises ConfigError for a group out of range)."""
    out = []
    for gs in group_sets:
        t = tuple(sorted({int(g) for g in gs}))
        if not t or t[0] < 0 or t[-1] >= n_kv:
            raise ConfigError(f"group_sets: expected non-empty sets of groups in [0, {n_kv}), got {list(gs)!r}.")
        out.append(t)
    return out


def _mask(n: int, heads, like: Tensor) -> Tensor:
    """``[1, 1, n, 1]`` bool mask of ``heads`` on the head axis of a ``[batch, pos, head, d_head]`` hook."""
    m = torch.zeros(n, dtype=torch.bool, device=like.device)
    m[list(heads)] = True
    return m[None, None, :, None]
