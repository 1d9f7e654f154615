"""Is a LoRA fine-tune just a constant steering vector? Per-token deltas, constancy and loss recovered.

For every sub-layer the adapter changes (an attention or MLP block of layer L), the per-token change of
what that sub-layer writes into the residual stream is

    Δ_t = out_LoRA(x_t) − out_base(x_t)

with the sub-layer's input x_t taken from the LoRA model's own forward pass. For the residual-writing
projections (``o_proj`` / ``down_proj``) this is exactly ``scaling · B · A · x_t`` (x_t: the heads' outputs
``hook_z`` or the MLP hidden ``hook_post``). For q/k/v and gate/up projections, whose outputs are not in
the residual stream, Δ_t is the resulting change of the sub-layer's output (``hook_attn_out`` /
``hook_mlp_out``) on the same input: a non-linear function of the LoRA. Both land at the sub-layer's
output hook, which is where the constant-vector test adds its vector.

If the fine-tune were a steering vector, Δ_t would not depend on t. :func:`compare` measures how far
from that it is, in three spaces:

* **activation space** (per site): mean pairwise |cos(Δ_t, Δ_t')|; the fraction of Σ‖Δ_t‖² explained by
  the mean (‖mean Δ‖² / mean ‖Δ_t‖², 1 for a constant); the top singular direction's share of Σ‖Δ_t‖²
  (uncentred) and the top principal component's share of the centred variance; cos(mean Δ, v) with a
  given steering vector v;
* **function space**: the next-token loss (nats/token) of the base, the LoRA model and the base plus the
  constant mean Δ at each site's output hook; the fraction of the LoRA's loss reduction the constant
  recovers, ``(L_base − L_const) / (L_base − L_LoRA)``, and ``KL(LoRA ‖ const)`` per token (float64);
* **weight space** (per module): the top left singular vectors of ΔW (its output side) against v and
  against the mean Δ.

Method: "Simple Mechanistic Explanations for Out-Of-Context Reasoning" (Wang, Engels, Clive-Griffin
2025), which finds LoRA fine-tunes acting mostly as a constant steering vector; here the same test is
run on any adapter and any texts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens._utils import batched, device_of
from steer_lens.errors import ConfigError, EmptyInputError, HookNameError, SequenceTooLongError
from steer_lens.hook_sites import HookSite
from steer_lens.lora._common import check_hooks
from steer_lens.lora.adapter import LoraAdapter, LoraModule, ln_output, merged_model, validate
from steer_lens.lora.report import LoraComparison
from steer_lens.models import HookedModel

__all__ = ["LoraComparison", "collect_texts", "compare", "effective_vectors", "mean_delta_vector", "prepare_texts"]

logger = logging.getLogger(__name__)

Texts = Sequence[str] | Sequence[Tensor] | Int[Tensor, "batch pos"]


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def prepare_texts(model: HookedModel, texts: Texts, batch_size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """Tokenize (BOS prepended) and right-pad texts into batches ``(tokens [b, pos], real [b, pos] bool)``.

    Right padding keeps every real token's positions and causal context unchanged, so no attention
    mask is needed. Token-id inputs (1-D tensors, or a 2-D tensor of unpadded rows) are used as given.

    Raises:
        EmptyInputError: no texts, or an empty text.
        SequenceTooLongError: a text longer than the model's ``n_ctx`` (index and lengths named).
        ConfigError: ``batch_size`` < 1 or a text of an unsupported type.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected an int >= 1, got {batch_size!r}.")
    if isinstance(texts, Tensor):
        if texts.ndim != 2:
            raise ConfigError(f"texts: a token tensor must be [batch, pos], got shape {list(texts.shape)}.")
        rows = list(texts)
    else:
        rows = list(texts)
    if not rows:
        raise EmptyInputError("texts: got none. Fix: pass a non-empty list of texts.")
    n_ctx = int(model.cfg.n_ctx)
    ids: list[Tensor] = []
    for i, t in enumerate(rows):
        if isinstance(t, str):
            if getattr(model, "tokenizer", None) is None:
                raise ConfigError("texts: the model has no tokenizer; pass token ids (1-D LongTensors).")
            tok = model.to_tokens(t, prepend_bos=True, truncate=False)[0]
        elif isinstance(t, Tensor) and t.ndim == 1:
            tok = t.long()
        else:
            raise ConfigError(f"texts[{i}]: expected a str or a 1-D token tensor, got {type(t).__name__}.")
        if tok.numel() == 0:
            raise EmptyInputError(f"texts[{i}] has no tokens.")
        if tok.numel() > n_ctx:
            raise SequenceTooLongError(
                f"texts[{i}] is {tok.numel()} tokens long; the model's context is n_ctx={n_ctx}. "
                "Fix: shorten or split the text."
            )
        ids.append(tok)
    dev = device_of(model)
    tok_obj = getattr(model, "tokenizer", None)
    pad = 0
    if tok_obj is not None and tok_obj.pad_token_id is not None:
        pad = int(tok_obj.pad_token_id)
    out = []
    for chunk in batched(ids, batch_size):
        n = max(x.numel() for x in chunk)
        toks = torch.full((len(chunk), n), pad, dtype=torch.long)
        real = torch.zeros((len(chunk), n), dtype=torch.bool)
        for i, x in enumerate(chunk):
            toks[i, : x.numel()] = x
            real[i, : x.numel()] = True
        out.append((toks.to(dev), real.to(dev)))
    return out


# ---------------------------------------------------------------------------------------------------
# per-site deltas
# ---------------------------------------------------------------------------------------------------
def _site_hooks(site_modules: list[LoraModule]) -> list[str]:
    m = site_modules[0]
    layer = m.layer
    if all(x.writes_residual for x in site_modules):
        return sorted({x.input_hook for x in site_modules})
    if m.site == "attn":
        return [f"blocks.{layer}.ln1.hook_normalized", m.output_hook]
    return [f"blocks.{layer}.ln2.hook_normalized", m.output_hook]


def _site_delta(base, site_modules: list[LoraModule], cache) -> Float[Tensor, "batch pos d_model"]:
    """Δ for one site from the LoRA run's cache (exact low-rank formula for residual writers)."""
    if all(x.writes_residual for x in site_modules):
        total = None
        for m in site_modules:
            x = m.module_input(base, cache)
            A = m.A.to(x.device, x.dtype)
            B = m.B.to(x.device, x.dtype)
            d = m.scaling * ((x @ A.T) @ B.T)
            total = d if total is None else total + d
        return total
    layer = site_modules[0].layer
    block = base.blocks[layer]
    if site_modules[0].site == "attn":
        n = ln_output(base, layer, "ln1", cache[f"blocks.{layer}.ln1.hook_normalized"])
        out = block.attn(query_input=n, key_input=n, value_input=n)
        if getattr(base.cfg, "use_normalization_before_and_after", False):
            out = block.ln1_post(out)
    else:
        out = block.apply_mlp(ln_output(base, layer, "ln2", cache[f"blocks.{layer}.ln2.hook_normalized"]))
    return cache[site_modules[0].output_hook] - out


@dataclass
class _Collected:
    deltas: dict[str, list[Tensor]] = field(default_factory=dict)  # site -> [n_b, d] CPU fp32
    resid_diff: dict[str, Tensor] = field(default_factory=dict)  # hook -> sum [d] fp64
    n_real: Tensor | None = None
    loss_base: Tensor | None = None
    loss_lora: Tensor | None = None
    n_pred: Tensor | None = None
    kl_lora_base: Tensor | None = None
    lora_logp: list[Tensor] = field(default_factory=list)


def _targets(toks: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """For the real positions (flattened): the next token and whether it is real (a loss target)."""
    nxt = torch.cat([toks[:, 1:], toks[:, :1]], 1)[real]
    has_next = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], 1)[real]
    return nxt, has_next


def _logp64(logits: Tensor, real: Tensor) -> Tensor:
    """Float64 log-probabilities at the real positions only, ``[n_real, d_vocab]``."""
    return logits[real].double().log_softmax(-1)


def _nll(logp: Tensor, nxt: Tensor, has_next: Tensor) -> Tensor:
    """Sum of -log p(next token) over real positions whose next token is real (fp64)."""
    return -(logp.gather(-1, nxt[:, None])[:, 0] * has_next).sum()


def _kl(logp_p: Tensor, logp_q: Tensor) -> Tensor:
    """Sum over positions of KL(p ‖ q) in float64 (nats)."""
    return (logp_p.exp() * (logp_p - logp_q)).sum()


@torch.no_grad()
def _collect(model, tuned, lora: LoraAdapter, batches, *, resid: bool, losses: bool, keep_logp: bool):
    sites = lora.sites()
    hooks = sorted({h for mods in sites.values() for h in _site_hooks(mods)})
    n_layers = int(model.cfg.n_layers)
    resid_hooks = [HookSite.name_of("resid_post", i) for i in range(n_layers)] if resid else []
    check_hooks(model, hooks + resid_hooks)
    c = _Collected(deltas={s: [] for s in sites})
    dev = device_of(model)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    c.n_real, c.loss_base, c.loss_lora, c.n_pred, c.kl_lora_base = zero, zero, zero, zero, zero
    c.resid_diff = {
        h: torch.zeros(int(model.cfg.d_model), dtype=torch.float64, device=dev) for h in resid_hooks
    }
    for toks, real in batches:
        logits_t, cache = tuned.run_with_cache(toks, names_filter=hooks + resid_hooks)
        for s, mods in sites.items():
            c.deltas[s].append(_site_delta(model, mods, cache)[real].float().cpu())
        c.n_real = c.n_real + real.sum()
        if resid or losses:
            logits_b, cache_b = model.run_with_cache(toks, names_filter=resid_hooks)
            for h in resid_hooks:
                c.resid_diff[h] += ((cache[h] - cache_b[h]).double() * real[..., None]).sum((0, 1))
            if losses:
                nxt, has_next = _targets(toks, real)
                logp_t, logp_b = _logp64(logits_t, real), _logp64(logits_b, real)
                c.loss_base = c.loss_base + _nll(logp_b, nxt, has_next)
                c.loss_lora = c.loss_lora + _nll(logp_t, nxt, has_next)
                c.n_pred = c.n_pred + has_next.sum()
                c.kl_lora_base = c.kl_lora_base + _kl(logp_t, logp_b)
                if keep_logp:
                    c.lora_logp.append(logits_t[real])  # fp32 output at real positions; fp64 later
    return c


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------
def _mean_abs_cos(D: Tensor, max_tokens: int) -> float:
    norms = D.norm(dim=1)
    U = D[norms > 0] / norms[norms > 0, None]
    n = U.shape[0]
    if n < 2:
        return float("nan")
    if n > max_tokens:
        U = U[torch.linspace(0, n - 1, max_tokens).long()]
        n = max_tokens
    U = U.float()  # fp32 products, fp64 sum: error ~1e-7 per pair
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, n, 1024):
        total += (U[s : s + 1024] @ U.T).abs().sum(dtype=torch.float64)
    return float((total - n) / (n * (n - 1)))  # diagonal |cos| = 1 removed


def _site_stats(D: Tensor, max_tokens: int) -> dict[str, float]:
    D = D.double()
    mu = D.mean(0)
    energy = (D * D).sum(1).mean()
    G = D.T @ D
    C = (D - mu).T @ (D - mu)
    eg = torch.linalg.eigvalsh(G).clamp(min=0)
    ec = torch.linalg.eigvalsh(C).clamp(min=0)
    tiny = 1e-12 * float(eg.sum()) if float(eg.sum()) > 0 else 0.0
    return {
        "mean_abs_cos": _mean_abs_cos(D, max_tokens),
        "mean_energy": float(mu @ mu / energy) if float(energy) > 0 else float("nan"),
        "top_sv_energy": float(eg[-1] / eg.sum()) if float(eg.sum()) > 0 else float("nan"),
        "top_pc_share": float(ec[-1] / ec.sum()) if float(ec.sum()) > tiny else float("nan"),
        "delta_norm": float(D.norm(dim=1).mean()),
        "mean_norm": float(mu.norm()),
    }


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = a.norm() * b.norm()
    return float(a @ b / den) if float(den) > 0 else float("nan")


def _lowrank_svd(m: LoraModule) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``[d_out, r]`` and singular values ``[r]`` of ΔW = s·B·A (via two QRs)."""
    Qb, Rb = torch.linalg.qr(m.B.double())
    _, Ra = torch.linalg.qr(m.A.double().T)
    U, S, _ = torch.linalg.svd(m.scaling * Rb @ Ra.T)
    return (Qb @ U).float(), S.float()


def _pick_vector(vectors: dict[str, Tensor], site: str) -> tuple[str | None, Tensor | None]:
    if not vectors:
        return None, None
    if site in vectors:
        return site, vectors[site]
    if len(vectors) == 1:
        h = next(iter(vectors))
        return h, vectors[h]
    layer = HookSite.parse(site).layer

    def dist(h: str) -> int:
        try:
            other = HookSite.parse(h).layer
        except HookNameError:
            other = None
        return abs(other - layer) if other is not None and layer is not None else 1 << 20

    h = min(vectors, key=dist)
    return h, vectors[h]


# ---------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------
def collect_texts(model: HookedModel, lora: LoraAdapter, texts: Texts, batch_size: int, *, resid: bool) -> Any:
    """Validate, batch ``texts`` and collect the per-site deltas (and residual differences) without losses.

    Returns an object with ``deltas`` (``{site hook: [per-batch [n_tokens, d_model] deltas]}``),
    ``n_real`` (tokens) and, with ``resid``, the residual differences; shared by
    :func:`mean_delta_vector`, :func:`effective_vectors` and :func:`steer_lens.lora.natural.natural_vector`.

    Raises:
        As :func:`compare`.
    """
    validate(model, lora)
    batches = prepare_texts(model, texts, batch_size)
    tuned = merged_model(model, lora)
    return _collect(model, tuned, lora, batches, resid=resid, losses=False, keep_logp=False)


def _steering_vectors(steered) -> dict[str, Tensor]:
    if steered is None:
        return {}
    if isinstance(steered, dict):
        return {h: torch.as_tensor(v).detach().float().cpu() for h, v in steered.items()}
    return steered.vectors.as_dict()


@torch.no_grad()
def compare(
    model: HookedModel,
    lora: LoraAdapter,
    texts: Texts,
    steered: Any = None,
    *,
    batch_size: int = 16,
    max_tokens_cos: int = 2048,
    tuned: HookedModel | None = None,
) -> LoraComparison:
    """Compare a LoRA adapter with a constant steering vector on texts (see the module docstring).

    Cost: one forward pass of the merged LoRA model and one of the base (with caches of the few hooks
    needed), one pass of the base plus the constant vector, and one more with ``steered`` if given.
    The LoRA model's logits at the real positions are kept on the device between the passes
    (``n_tokens · d_vocab`` fp32 values: lower ``len(texts)`` for a large vocabulary).

    Args:
        model: the base ``HookedTransformer``.
        lora: the adapter (:func:`~steer_lens.lora.load_adapter`).
        texts: texts (BOS is prepended), or token ids (1-D tensors, or a 2-D tensor of unpadded rows).
        steered: optional steering vector(s) to compare with: a ``SteeredTransformer`` (its vectors are
            also run for the loss) or a dict ``{hook: Float[Tensor, "d_model"]}`` (geometry only). Each
            site is compared with the vector at the same hook, else the only vector, else the nearest layer's.
        batch_size: texts per forward pass.
        max_tokens_cos: mean pairwise |cos| uses at most this many evenly spaced tokens (O(n²)).
        tuned: the merged model if you already have it (default: ``merged_model(model, lora)``).

    Returns:
        A :class:`LoraComparison`.

    Raises:
        EmptyInputError: no texts, or no position with a next token.
        SequenceTooLongError: a text longer than ``n_ctx``.
        ShapeMismatchError, NonFiniteError: an adapter that does not fit the model.
    """
    from steer_lens.steering import SteeredTransformer

    validate(model, lora)
    batches = prepare_texts(model, texts, batch_size)
    tuned = merged_model(model, lora) if tuned is None else tuned
    c = _collect(model, tuned, lora, batches, resid=True, losses=True, keep_logp=True)
    if int(c.n_pred) == 0:
        raise EmptyInputError("texts: no text has a token after BOS, so there is no loss to compare.")
    sites = list(lora.sites())
    D = {s: torch.cat(c.deltas[s]) for s in sites}
    means = {s: D[s].double().mean(0).float() for s in sites}

    const = SteeredTransformer(model, hooks=sites, init={s: means[s] for s in sites})
    runs = [("const", const)]
    if isinstance(steered, SteeredTransformer):
        runs.append(("steered", steered))
    dev = batches[0][0].device
    sums = {key: [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(2)] for key, _ in runs}
    for (toks, real), logits_t in zip(batches, c.lora_logp, strict=True):
        logp_t = logits_t.double().log_softmax(-1)
        nxt, has_next = _targets(toks, real)
        for key, st in runs:
            logp = _logp64(st(toks), real)
            sums[key][0] += _nll(logp, nxt, has_next)
            sums[key][1] += _kl(logp_t, logp)

    vectors = _steering_vectors(steered)
    stats: dict[str, dict[str, float]] = {}
    steer_hooks: dict[str, str | None] = {}
    cos_to_mean: dict[str, Tensor] = {}
    for s in sites:
        st = _site_stats(D[s], max_tokens_cos)
        h, v = _pick_vector(vectors, s)
        st["cos_steering"] = _cos(means[s], v) if v is not None else float("nan")
        stats[s], steer_hooks[s] = st, h
        mu = means[s]
        nrm = D[s].norm(dim=1) * mu.norm()
        cos_to_mean[s] = torch.where(nrm > 0, D[s] @ mu / nrm.clamp(min=1e-30), torch.nan)
    weights = []
    for m in lora.modules:
        U, S = _lowrank_svd(m)
        e = S.double() ** 2
        row = {
            "module": m.name,
            "site": m.output_hook,
            "rank": m.rank,
            "sv": S,
            "top_sv_energy": float(e[0] / e.sum()) if float(e.sum()) > 0 else float("nan"),
            "cos_u1_steering": float("nan"),
            "max_cos_u_steering": float("nan"),
            "cos_u1_mean_delta": float("nan"),
        }
        if m.writes_residual:
            _, v = _pick_vector(vectors, m.output_hook)
            if v is not None:
                cs = [abs(_cos(U[:, i], v)) for i in range(U.shape[1])]
                row["cos_u1_steering"], row["max_cos_u_steering"] = cs[0], max(cs)
            row["cos_u1_mean_delta"] = abs(_cos(U[:, 0], means[m.output_hook]))
        weights.append(row)
    n_pred = float(c.n_pred)
    n_real = float(c.n_real)
    return LoraComparison(
        sites=tuple(sites),
        site_modules={s: tuple(m.name for m in mods) for s, mods in lora.sites().items()},
        n_tokens=int(n_real),
        stats=stats,
        steering_hooks=steer_hooks,
        mean_delta=means,
        cos_to_mean=cos_to_mean,
        weights=tuple(weights),
        loss_base=float(c.loss_base) / n_pred,
        loss_lora=float(c.loss_lora) / n_pred,
        loss_const=float(sums["const"][0]) / n_pred,
        loss_steered=float(sums["steered"][0]) / n_pred if "steered" in sums else None,
        kl_lora_base=float(c.kl_lora_base) / n_real,
        kl_lora_const=float(sums["const"][1]) / n_real,
        kl_lora_steered=float(sums["steered"][1]) / n_real if "steered" in sums else None,
        effective_vectors={h: (v / n_real).float().cpu() for h, v in c.resid_diff.items()},
    )


@torch.no_grad()
def mean_delta_vector(model: HookedModel, lora: LoraAdapter, texts: Texts, *, batch_size: int = 16) -> Any:
    """The LoRA's "natural steering vector": mean Δ_t at each changed sub-layer's output hook.

    For a ``down_proj`` LoRA in layer L the vector sits at ``blocks.L.hook_mlp_out``; for ``o_proj`` (or
    q/k/v) at ``blocks.L.hook_attn_out``. The result is an ordinary steering vector: save it with
    ``.save(folder)``, train it further, read it with the lens.

    Args:
        model: the base ``HookedTransformer``.
        lora: the adapter.
        texts: texts or token ids (as :func:`compare`).
        batch_size: texts per forward pass.

    Returns:
        A :class:`~steer_lens.SteeredTransformer` on ``model`` with ``positions="all"``; its
        ``training_config`` records the source (``"lora.mean_delta_vector"``) and the token count.

    Raises:
        As :func:`compare`.
    """
    from steer_lens.steering import SteeredTransformer

    c = collect_texts(model, lora, texts, batch_size, resid=False)
    means = {s: torch.cat(d).double().mean(0).float() for s, d in c.deltas.items()}
    steered = SteeredTransformer(model, hooks=list(means), init=means)
    steered.training_config = {
        "source": "lora.mean_delta_vector",
        "modules": lora.names,
        "n_tokens": int(c.n_real),
    }
    return steered


@torch.no_grad()
def effective_vectors(
    model: HookedModel, lora: LoraAdapter, texts: Texts, *, batch_size: int = 16
) -> dict[str, Float[Tensor, " d_model"]]:
    """Difference of means of the residual stream between the LoRA model and the base, at every layer.

    ``v_l = mean_t (resid_post_l^LoRA(t) − resid_post_l^base(t))`` over all real tokens of ``texts``: the
    "effective steering vector" the fine-tune amounts to at each layer (a CAA-style difference of means
    between two models instead of two prompt sets). Feed it to ``SteeredTransformer(..., init=...)``.

    Returns:
        ``{f"blocks.{l}.hook_resid_post": Float[Tensor, "d_model"]}`` (fp32, CPU).

    Raises:
        As :func:`compare`.
    """
    c = collect_texts(model, lora, texts, batch_size, resid=True)
    return {h: (v / float(c.n_real)).float().cpu() for h, v in c.resid_diff.items()}
