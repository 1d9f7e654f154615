"""Path-patching variants scored on sampled answers: each variant's patched model generates, a reward scores.

Sinii et al. 2025 ("Small Vectors, Big Effects") judge every path-patching variant of the first block
``b`` reading a steering vector (see :mod:`steer_lens.patching.path`) by the *benchmark accuracy of
answers sampled through the patched model*, the patch applied at every position and every decoding step
(corl-team/steering-reasoning, read in its public fork robertnward/steering-reasoning at commit caf560b:
``steering_reasoning/eval/eval.py``, ``run``: ``num_generations`` answers per problem sampled at
``generation_temperature`` through the patched model, each scored ``reward=int(is_correct)``; the patched last layer is
``models/head_patched/llama/vllm.py`` / ``models/head_patched_path/llama/transformers.py``).
:func:`path_variant_accuracy` does the same with a TransformerLens model.

**How the patched model runs.** A variant needs, at every position, block ``b``'s input in the base run
``B`` and in the steered run ``S`` (and their q / k / v / head outputs). Each sequence is run as three
copies stacked in one batch, sharing its tokens: the *base* copy (the vector off), the *steered* copy (on)
and the *patched* copy, whose activations at block ``b`` the variant's hooks rewrite from the other two
copies of the same forward pass. Every copy keeps its own key/value cache, so the paper's two attention
streams of the patched layer (vanilla and steered history, ``head_patched_path/llama/vllm.py``
``_vanilla_store`` / ``_steered_store``) and the patched copy's own history (patched keys / values for the
q / k / v variants, as vLLM caches them) are exact. The three copies get the sampled token of the
patched copy. Cost: three forward passes per token instead of one (the KV cache keeps it linear in
length); the prompt is prefilled once for all samples, and the base / steered copies of the prompt once
for all variants of a batch. The logits equal :func:`~steer_lens.patching.path_patch`'s variant runs on
the same tokens (tested) and, for ``"steered"`` / ``"attn_to_both"``, the steered model's.

Variants are named as in :func:`~steer_lens.patching.path_patch` (``variant_names`` lists them), plus
``"base"`` (the vector off) and ``"steered"`` (the vector on, no patch), the paper's ``base`` / ``no_patch``,
and the multi-group combinations ``"knockout groups 3+5"`` / ``"only groups 7+1+5"`` (the paper's
``group3_and`` ... ``inverse_group7_and1_and5_and``; see :func:`group_combinations`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError
from steer_lens.patching.results import PathVariantAccuracy

__all__ = ["DEFAULT_VARIANTS", "group_combinations", "path_variant_accuracy", "patched_logits", "variant_names",
           "wilson_interval"]

_WHOLE = ("base", "steered", "skip_attention", "skip_layer", "attn_to_both", "attn_to_residual", "attn_to_mlp")
_NAME = re.compile(
    r"(knockout|only) (?:(head|group|groups) (\d+(?:\+\d+)*)(?: -> (all|residual|mlp))?|([qkv]) (head|kv-head) (\d+)"
    r"|v all heads)"
)
DEFAULT_VARIANTS = ("base", "steered", "skip_attention", "skip_layer", "attn_to_residual", "attn_to_mlp",
                    "knockout v all heads", "only v all heads")
"""The whole-block variants and the all-heads value patches (the paper's baselines and ``all_v_proj``)."""


def group_combinations(fixed: Sequence[int], n_kv: int) -> list[tuple[int, ...]]:
    """The paper's multi-group sweeps: ``fixed`` groups plus each key-value group ``G`` in turn.

    ``groupF_and`` with ``head_idx = G`` patches the query heads of key-value groups ``F`` and ``G``;
    ``inverse_group7_and1_and`` with ``head_idx = G`` steers only groups 7, 1 and ``G`` (names listed in
    corl-team/steering-reasoning ``steering_reasoning/helpers/modify_config.py`` L25-37 and swept over
    ``head_idx in range(8)`` in ``steering_reasoning/visualize/patch_head.py``,
    ``get_llama3_1_8b_chat_model_groups_patch_heads``, fork robertnward/steering-reasoning at caf560b; the layer that
    implements them is not in the public code, so they are transcribed as the ``group`` / ``inverse_group``
    patch of :func:`~steer_lens.patching.path_patch` applied to the union of the groups' query heads).

    Args:
        fixed: the groups always patched (e.g. ``(7, 1)`` for ``inverse_group7_and1_and``).
        n_kv: number of key-value heads (groups) of the model.

    Returns:
        ``n_kv`` sorted tuples of distinct groups (``fixed`` alone where ``G`` is already in it), for
        variant names ``"knockout groups " + "+".join(...)`` / ``"only groups ..."``.

    Raises:
        ConfigError: a group outside ``[0, n_kv)``.
    """
    bad = [g for g in fixed if not 0 <= int(g) < n_kv]
    if bad:
        raise ConfigError(f"fixed: groups must be in [0, {n_kv}), got {bad}.")
    return [tuple(sorted({*map(int, fixed), g})) for g in range(n_kv)]


def variant_names(model, *, full: bool = True, group_sets: Sequence[Sequence[int]] = ()) -> list[str]:
    """Every variant name :func:`path_variant_accuracy` accepts for ``model`` (``full=False``: the whole-block
    variants and the unrouted per-head ones, as ``path_patch(variants=True)``), with ``group_sets`` as
    ``"knockout groups a+b"`` / ``"only groups a+b"``."""
    cfg = model.cfg
    n_heads, n_kv = int(cfg.n_heads), int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    names = [n for n in _WHOLE if not (parallel and n in ("attn_to_residual", "attn_to_mlp"))]
    kinds = ("knockout", "only")
    if not full:
        return names + [f"{k} head {i}" for i in range(n_heads) for k in kinds]
    routes = ("all",) if parallel else ("all", "residual", "mlp")
    names += [f"{k} head {i} -> {r}" for i in range(n_heads) for k in kinds for r in routes]
    names += [f"{k} q head {i}" for i in range(n_heads) for k in kinds]
    names += [f"{k} {p} kv-head {g}" for p in "kv" for g in range(n_kv) for k in kinds]
    names += [f"{k} v all heads" for k in kinds] + [f"{k} group {g}" for g in range(n_kv) for k in kinds]
    names += [f"{k} groups {'+'.join(map(str, s))}" for s in group_sets for k in kinds]
    return names


def wilson_interval(k: Tensor, n: int, z: float = 1.959963984540054) -> tuple[Tensor, Tensor]:
    """Wilson score interval of a binomial proportion ``k / n`` (default 95%), elementwise.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` (Wilson 1927), which stays inside [0, 1]
    and is not degenerate at ``k = 0`` or ``k = n``.

    Returns:
        ``(low, high)`` float64 tensors shaped like ``k``.
    """
    p = k.double() / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half).clamp_min(0.0), (centre + half).clamp_max(1.0)


# ---------------------------------------------------------------------------------------------------
# variant -> edits of the patched copy at block b
# ---------------------------------------------------------------------------------------------------
# An edit is (hook point of block b, fn(base_rows, steered_rows, patched_rows, state) -> patched_rows).


def _mask(n: int, heads, like: Tensor) -> Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=like.device)
    m[list(heads)] = True
    return m[None, None, :, None]


def _save(*keys):
    def fn(b, s, p, st):
        st.update(zip(keys, (b, s, p), strict=False))
        return p

    return fn


def _z_edits(kind: str, heads: list[int], n_heads: int) -> list:
    if kind == "knockout":
        return [("z", lambda b, s, p, st: torch.where(_mask(n_heads, heads, p), b, p))]
    return [("z", lambda b, s, p, st: torch.where(_mask(n_heads, heads, p), s, b))]


def _route_edits(route: str) -> list:
    """path.py ``_route_hooks``: the patched attention output only along ``route`` (L137-145 of the paper)."""
    if route == "all":
        return []
    save = ("attn_out", lambda b, s, p, st: st.update(a_s=s, own=p) or p)
    if route == "residual":
        return [save, ("resid_mid", lambda b, s, p, st: p - st["own"] + st["a_s"]),
                ("resid_post", lambda b, s, p, st: p + st["own"] - st["a_s"])]
    return [save, ("resid_post", lambda b, s, p, st: p + st["a_s"] - st["own"])]


def _qkv_edits(kind: str, part: str, heads: list[int], n: int) -> list:
    if kind == "knockout":
        return [(part, lambda b, s, p, st: torch.where(_mask(n, heads, p), b, p))]
    rest = [(o, lambda b, s, p, st: b) for o in "qkv" if o != part]
    return [(part, lambda b, s, p, st: torch.where(_mask(n, heads, p), p, b)), *rest]


def _whole_edits(name: str) -> list:
    save_attn = ("attn_out", lambda b, s, p, st: st.update(a_b=b, a_s=s) or p)
    return {
        "base": [("resid_pre", lambda b, s, p, st: b)],
        "steered": [],
        "attn_to_both": [],
        "skip_attention": [("attn_out", lambda b, s, p, st: b)],
        "skip_layer": [("resid_pre", lambda b, s, p, st: st.update(d=s - b) or b),
                       ("resid_post", lambda b, s, p, st: p + st["d"])],
        "attn_to_residual": [save_attn, ("resid_mid", lambda b, s, p, st: p - st["a_s"] + st["a_b"]),
                             ("resid_post", lambda b, s, p, st: p + st["a_s"] - st["a_b"])],
        "attn_to_mlp": [save_attn, ("resid_post", lambda b, s, p, st: p - st["a_s"] + st["a_b"])],
    }[name]


def _edits(name: str, cfg) -> list:
    """The edits of the patched copy for variant ``name`` (checked against :func:`variant_names`)."""
    n_heads, n_kv = int(cfg.n_heads), int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    if name in _WHOLE:
        return _whole_edits(name)
    m = _NAME.fullmatch(name)
    kind, unit, idx, route, part, _, pidx = m.groups()
    if unit is not None:
        ids = [int(x) for x in idx.split("+")]
        rep = n_heads // n_kv
        heads = ids if unit == "head" else [h for g in ids for h in range(g * rep, (g + 1) * rep)]
        return _z_edits(kind, heads, n_heads) + _route_edits(route or "all")
    if part is None:  # "v all heads"
        return _qkv_edits(kind, "v", list(range(n_kv)), n_kv)
    return _qkv_edits(kind, part, [int(pidx)], n_heads if part == "q" else n_kv)


def _check_variants(variants, model) -> list[str]:
    if isinstance(variants, str):
        variants = [variants]
    variants = list(variants)
    cfg = model.cfg
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    sets = []
    for v in variants:  # multi-group names: any set of existing groups
        m = _NAME.fullmatch(v) if isinstance(v, str) else None
        if m is not None and m.group(2) == "groups":
            sets.append(tuple(int(x) for x in m.group(3).split("+")))
    known = set(variant_names(model, full=True, group_sets=[s for s in sets if all(0 <= g < n_kv for g in s)]))
    known |= set(variant_names(model, full=False))
    bad = [v for v in variants if v not in known]
    if bad or not variants or len(set(variants)) != len(variants):
        raise ConfigError(
            f"variants: expected distinct names among variant_names(model) (e.g. {list(DEFAULT_VARIANTS)}), "
            f"got {bad or variants!r}."
        )
    return variants


# ---------------------------------------------------------------------------------------------------
# the stacked run
# ---------------------------------------------------------------------------------------------------
_POINTS = {"resid_pre": "hook_resid_pre", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
           "z": "attn.hook_z", "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid",
           "resid_post": "hook_resid_post"}


class _Stack:
    """Hooks that run base / steered / patched copies in one batch. ``groups``: per variant, the row indices
    ``(base, steered, patched)`` of its copies in the current batch (set before each pass)."""

    def __init__(self, steered, hook: str, block: int, others: bool) -> None:
        self.steered, self.model, self.hook, self.block, self.others = steered, steered.model, hook, block, others
        self.groups: list[tuple[list, Tensor, Tensor, Tensor, dict]] = []  # (edits, ib, is, ip, state)
        self.base_rows: Tensor | None = None
        self._pre: dict[str, Tensor] = {}

    def set_layout(self, edits: list[list], rows: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        self.groups = [(e, ib, is_, ip, {}) for e, (ib, is_, ip) in zip(edits, rows, strict=True)]
        self.base_rows = torch.cat([ib for ib, _, _ in rows]).unique()

    def _point(self, point: str):
        def hook(act, hook):
            out = act.clone()
            for edits, ib, is_, ip, st in self.groups:
                for p, fn in edits:
                    if p == point:
                        out[ip] = fn(act[ib], act[is_], out[ip], st)
            return out

        return hook

    def _restore(self, act, hook):
        """The analysed vector off in the base rows (the other vectors as configured)."""
        out = act.clone()
        out[self.base_rows] = self._pre["x"][self.base_rows]
        return out

    @contextlib.contextmanager
    def installed(self, prompt_end: Tensor, tokens: Tensor):
        used = {p for edits, *_ in self.groups for p, _ in edits}  # the first layout holds every variant
        points = [(f"blocks.{self.block}.{_POINTS[p]}", self._point(p)) for p in _POINTS if p in used]
        only = contextlib.nullcontext() if self.others else self.steered.only_hooks([self.hook])
        with self.model.hooks(fwd_hooks=[(self.hook, lambda a, hook: self._pre.update(x=a))]), only, \
                self.steered.steering(prompt_end=prompt_end, tokens=tokens), \
                self.model.hooks(fwd_hooks=[(self.hook, self._restore), *points]):
            yield


def _select_cache(cache, idx: Tensor):
    """The key/value cache of the rows ``idx`` (rows may repeat)."""
    entries = [dataclasses.replace(e, past_keys=e.past_keys[idx], past_values=e.past_values[idx])
               for e in cache.entries]
    return dataclasses.replace(cache, entries=entries, previous_attention_mask=cache.previous_attention_mask[idx])


def _last_logits(model, x, attn, cache, rows: Tensor) -> Tensor:
    """Logits at the last position of ``rows`` (the final norm and unembedding only for those rows)."""
    resid = model(x, attention_mask=attn, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    return model(resid[rows, -1:], start_at_layer=model.cfg.n_layers)[:, -1]


def patched_logits(
    steered, tokens: Int[Tensor, "batch pos"], variant: str, *, hook: str | None = None, others: bool = False
) -> Float[Tensor, "batch pos d_vocab"]:
    """Teacher-forced logits ``[batch, pos, d_vocab]`` of ``variant``'s patched model on ``tokens`` (no cache).

    The same stacked run as :func:`path_variant_accuracy` over a whole sequence; what the generation's
    per-step logits are checked against. Errors as :func:`path_variant_accuracy`.
    """
    hook, block = _block_of(steered, hook)
    (variant,) = _check_variants([variant], steered.model)
    n = tokens.shape[0]
    stack = _Stack(steered, hook, block, others)
    r = torch.arange(n, device=tokens.device)
    stack.set_layout([_edits(variant, steered.model.cfg)], [(r, r + n, r + 2 * n)])
    x = tokens.repeat(3, 1)
    with torch.no_grad(), stack.installed(torch.full((3 * n,), tokens.shape[1], device=tokens.device), x):
        return steered.model(x)[2 * n:]


def _block_of(steered, hook: str | None) -> tuple[str, int]:
    from steer_lens.patching.path import check_path_inputs, first_reading_block

    hook = check_path_inputs(steered, hook)
    block = first_reading_block(hook, steered.model.cfg)
    if block is None:
        raise ConfigError(f"hook: no block reads the vector at {hook!r} (it is after the last block's "
                          "attention); generation-level variants need a later block. Fix: choose an earlier hook.")
    return hook, block


# ---------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Sampling:
    n_samples: int
    temperature: float
    do_sample: bool
    max_new_tokens: int
    seed: int
    eos: int | None
    pad: int
    keep_logits: bool = False


def _decode(model, stack: _Stack, cache, logits0: Tensor, n: int, plen: int, prompt_end, s: _Sampling):
    """One variant's decoding loop over ``n`` sequences (rows ``[base | steered | patched]``, ``3n`` in the
    cache). Returns new tokens ``[n, steps]``, their mask and (``keep_logits``) per-step logits."""
    from steer_lens.generation import pick_next_token

    gen = torch.Generator(device=logits0.device).manual_seed(s.seed)
    finished = torch.zeros(n, dtype=torch.bool, device=logits0.device)
    rows = torch.arange(2 * n, 3 * n, device=logits0.device)
    logits, toks, alive, kept = logits0, [], [], []
    for i in range(s.max_new_tokens):
        if s.keep_logits:
            kept.append(logits.cpu())
        nxt = pick_next_token(logits, s.do_sample, s.temperature, 1.0, None, gen)
        alive.append(~finished)
        nxt = torch.where(finished, torch.full_like(nxt, s.pad), nxt)
        toks.append(nxt)
        if s.eos is not None:
            finished = finished | (nxt == s.eos)
        if i == s.max_new_tokens - 1 or bool(finished.all()):
            break
        x = nxt.repeat(3)[:, None]
        stack.steered.set_offset(plen + i, prompt_end, tokens=x)
        logits = _last_logits(model, x, torch.ones_like(x), cache, rows)
    return torch.stack(toks, 1), torch.stack(alive, 1), kept


def _run_chunk(stack: _Stack, model, tokens, attn, names: list[str], s: _Sampling):
    """Prefill ``tokens`` (``P`` prompts) for every variant in ``names`` at once, then decode each variant
    with ``n_samples`` copies of every prompt. Yields ``(name, new tokens, mask, logits)``."""
    from steer_lens.generation import new_kv_cache

    p, plen = tokens.shape
    dev = tokens.device
    r = torch.arange(p, device=dev)
    k = len(names)
    stack.set_layout([_edits(v, model.cfg) for v in names], [(r, r + p, r + (2 + j) * p) for j in range(k)])
    x, a = tokens.repeat(2 + k, 1), attn.repeat(2 + k, 1)
    cache = new_kv_cache(model, x.shape[0], dev)
    with stack.installed(torch.full((x.shape[0],), plen, device=dev), x):
        first = _last_logits(model, x, a, cache, torch.arange(2 * p, (2 + k) * p, device=dev))
        n = p * s.n_samples
        rep = r.repeat_interleave(s.n_samples)
        m = torch.arange(n, device=dev)
        for j, name in enumerate(names):
            stack.set_layout([_edits(name, model.cfg)], [(m, m + n, m + 2 * n)])
            own = _select_cache(cache, torch.cat([rep, rep + p, rep + (2 + j) * p]))
            pe = torch.full((3 * n,), plen, device=dev)
            stack.steered.set_offset(plen, pe)
            new, mask, kept = _decode(model, stack, own, first[j * p:(j + 1) * p][rep], n, plen, pe, s)
            yield name, new, mask, kept


def path_variant_accuracy(
    steered,
    prompts,
    reward: Callable[..., Any],
    *,
    variants: Sequence[str] | str = DEFAULT_VARIANTS,
    hook: str | None = None,
    n_samples: int = 4,
    temperature: float = 1.0,
    do_sample: bool = True,
    max_new_tokens: int = 40,
    seed: int = 0,
    others: bool = False,
    correct_above: float = 0.0,
    max_batch: int = 96,
    keep_logits: bool = False,
) -> PathVariantAccuracy:
    """Accuracy of answers sampled through each path-patching variant's patched model (Sinii et al. 2025).

    Every prompt is answered ``n_samples`` times by each variant's model (the variant's patch at block ``b``
    at every position and decoding step, see the module docstring) and each answer is scored by
    ``reward(prompt_texts, completions)``; an answer is correct when its reward is ``> correct_above``
    (``math_answer``'s ±1 and ``exact_answer``'s 1/0 both work with the default 0).

    All variants share the random numbers: the same ``seed`` gives the same draws to every variant, so
    variants with equal logits give equal answers (``"attn_to_both"`` and ``"steered"``), and paired
    differences between variants are less noisy than independent runs.

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` over a ``HookedTransformer``.
        prompts: texts, conversations (``[{"role": "user", "content": ...}]``, rendered with the chat
            template) or token ids ``[n_prompts, pos]``; rewards see a conversation's last user message
            and a token row as its ids separated by spaces (as ``sl.train.rl``).
        reward: ``(prompts: list[str], completions: list[str]) -> [batch]`` (e.g.
            ``sl.train.rewards.math_answer(answers)``); without a tokenizer completions are token ids
            separated by spaces.
        variants: names from :func:`variant_names` (default :data:`DEFAULT_VARIANTS`), including
            ``"base"``, ``"steered"`` and ``"knockout groups a+b"`` / ``"only groups a+b"``.
        hook: which of the vector's hooks to analyse (default: its only hook).
        n_samples: answers per prompt and variant.
        temperature: sampling temperature (> 0; the paper samples at 1).
        do_sample: ``False``: greedy decoding (then ``n_samples`` copies are identical).
        max_new_tokens: longest answer, in tokens (each stops at the tokenizer's EOS).
        seed: seed of the draws (one ``torch.Generator`` per batch of prompts, shared by the variants).
        others: ``False`` (as :func:`~steer_lens.patching.path_patch`): the wrapper's other vectors are off
            in every copy; ``True``: they stay on in every copy, and only the analysed vector is patched.
        correct_above: reward threshold of a correct answer.
        max_batch: most rows per forward pass (each sequence is 3 rows while decoding; the prompt
            prefill runs ``2 + len(variants)`` rows per prompt, in groups that fit).
        keep_logits: keep the patched model's next-token logits of every step (for checks; large).

    Returns:
        :class:`~steer_lens.patching.PathVariantAccuracy`: per variant the accuracy, its Wilson 95%
        interval over the ``n_prompts * n_samples`` answers, the per-prompt accuracy, the rewards and the
        completions.

    Raises:
        ConfigError: not a SteeredTransformer over a HookedTransformer, unknown ``hook`` or no block reads
            it, unknown or repeated variant names, bad sampling arguments.
        SequenceTooLongError: a prompt plus ``max_new_tokens`` exceeds ``n_ctx``.
        RewardError: the reward raised or returned a wrong shape / NaN.
    """
    from steer_lens.generation import check_sampling_args
    from steer_lens.train.rewards import score
    from steer_lens.train.rl.rollout import prompt_items

    hook, block = _block_of(steered, hook)
    model = steered.model
    names = _check_variants(variants, model)
    check_sampling_args(max_new_tokens, seed, None)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples: expected an int >= 1, got {n_samples!r}.")
    if do_sample and not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature: expected a positive finite number, got {temperature!r}.")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 3:
        raise ConfigError(f"max_batch: expected an int >= 3 (rows per pass), got {max_batch!r}.")
    items, texts = prompt_items(prompts)
    tok_all, attn_all = _tokens(steered, items, max_new_tokens)
    s = _Sampling(n_samples, temperature, do_sample, max_new_tokens, seed, steered.eos_token_id,
                  steered.pad_token_id, keep_logits)
    stack = _Stack(steered, hook, block, others)
    per_chunk = max(1, max_batch // (3 * n_samples))
    out: dict[str, dict[str, list]] = {v: {"rewards": [], "completions": [], "logits": []} for v in names}
    with torch.no_grad():
        for c in range(0, len(items), per_chunk):
            tok, attn = tok_all[c:c + per_chunk], attn_all[c:c + per_chunk]
            tok, attn = _trim_left(tok, attn)
            group = max(1, max_batch // tok.shape[0] - 2)
            s.seed = seed + c
            prompt_texts = [t for t in texts[c:c + per_chunk] for _ in range(n_samples)]
            for g in range(0, len(names), group):
                for name, new, mask, kept in _run_chunk(stack, model, tok, attn, names[g:g + group], s):
                    comps = _completions(model, new, mask, s.eos)
                    out[name]["rewards"].append(score(reward, prompt_texts, comps))
                    out[name]["completions"] += comps
                    out[name]["logits"].append(kept)
    return _result(out, names, len(items), n_samples, correct_above, hook, block, s, others)


def _tokens(steered, items, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    from steer_lens.errors import SequenceTooLongError

    if isinstance(items[0], Tensor):
        toks = torch.stack([t.to(steered.device) for t in items])
        attn = torch.ones_like(toks)
    else:
        toks, attn = steered.left_pad([steered.prompt_tokens(p) for p in items])
    n_ctx = int(steered.model.cfg.n_ctx)
    if toks.shape[1] + max_new_tokens > n_ctx:
        raise SequenceTooLongError(
            f"prompt of {toks.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context "
            f"n_ctx={n_ctx}. Fix: shorten the prompts or lower max_new_tokens."
        )
    return toks, attn


def _trim_left(tok: Tensor, attn: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the left-padding columns that every row of this chunk pads."""
    keep = int((attn.sum(0) > 0).nonzero()[0]) if attn.numel() else 0
    return tok[:, keep:], attn[:, keep:]


def _completions(model, new: Tensor, mask: Tensor, eos: int | None) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    rows = [[t for t, keep in zip(r, m, strict=True) if keep and t != eos]
            for r, m in zip(new.tolist(), mask.tolist(), strict=True)]
    if tok is None:
        return [" ".join(map(str, r)) for r in rows]
    return [tok.decode(r) for r in rows]


def _result(out, names, n_prompts, n_samples, correct_above, hook, block, s: _Sampling, others) -> PathVariantAccuracy:
    rewards = torch.stack([torch.cat(out[v]["rewards"]).double().view(n_prompts, n_samples) for v in names])
    correct = rewards > correct_above
    k = correct.sum((1, 2))
    n = n_prompts * n_samples
    low, high = wilson_interval(k, n)
    logits = None
    if s.keep_logits:  # per variant, one [rows of the chunk, steps, d_vocab] tensor per chunk of prompts
        logits = {v: tuple(torch.stack(chunk, 1) for chunk in out[v]["logits"]) for v in names}
    return PathVariantAccuracy(
        variants=tuple(names), accuracy=k.double() / n, ci_low=low, ci_high=high,
        per_prompt=correct.double().mean(2), rewards=rewards,
        completions={v: tuple(out[v]["completions"]) for v in names}, hook=hook, block=block,
        n_samples=n_samples, temperature=s.temperature if s.do_sample else 0.0,
        max_new_tokens=s.max_new_tokens, others=others, step_logits=logits,
    )
