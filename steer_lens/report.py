"""One offline HTML report of a steering vector: ``steer-lens report VECTOR_DIR --out report.html``.

:func:`vector_report` loads a saved vector folder (anything :meth:`SteeredTransformer.save
<steer_lens.SteeredTransformer.save>` wrote, including a llama.cpp control vector brought in with
``steer-lens import``) onto its recorded model, runs the library's own analyses and writes one
self-contained HTML file: plotly.js is inlined once (in the first figure), there is no external
script, stylesheet, font or image, so the file opens in a browser with the network off.

Sections (each computed by the library function named, so the report shows exactly its numbers):

1. **norms**: per hook, the vector's L2 norm (:meth:`SteeringVectors.norms
   <steer_lens.vectors.SteeringVectors.norms>`), times the wrapper's scale, and the mean norm of the
   activation at that hook in the base run over the prompts' tokens (first token excluded) for scale;
2. **vector logit lens**: top and bottom tokens by cosine with ``W_U`` (with the dot product beside
   it; Sinii et al. 2025) and by dot product ``W_U·v`` (:func:`~steer_lens.lens.vector_logit_lens`,
   ``mode="cosine"`` and ``"raw"``);
3. **per-layer logit lens** of the steered and the base run on each prompt, last position
   (:func:`~steer_lens.lens.layer_logit_lens`, nostalgebraist 2020);
4. **position shift**: per generated position, the total variation between the steered and the base
   next-token distribution on steered samples (:func:`~steer_lens.analysis.generation_shift`);
5. **generations**: greedy continuations (``do_sample=False``) of each prompt, base and steered;
6. only when asked: the **SAE** summary (:func:`~steer_lens.sae.vector_features` and
   :func:`~steer_lens.analysis.activation_shift`) and the **patching** summary
   (:func:`~steer_lens.patching.steering_patch`, denoising the base run of the first prompt with the
   steered ``resid_post`` per layer and position; metric ``KL(steered ‖ patched)`` at the last
   position, shown as the fraction of the gap recovered).

Everything is computed before the file is written (atomically, :func:`~steer_lens.vectors.io.atomic_write_bytes`),
so bad input leaves no file behind.
"""

from __future__ import annotations

import html
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer_lens._utils import Prompt, is_conversation
from steer_lens.errors import ConfigError, EmptyInputError, IncompatibleVectorError
from steer_lens.steering import SteeredTransformer
from steer_lens.vector_folder import CONFIG_FILE, FORMAT
from steer_lens.vectors.io import atomic_write_bytes, read_json

__all__ = ["DEFAULT_PROMPTS", "VectorReport", "build_report", "load_vector", "read_prompts", "vector_report"]

DEFAULT_PROMPTS = (
    "Once upon a time",
    "The little dog ran to the",
    "She opened the door and saw",
    "Tell me about your favourite day.",
)
"""Prompts used when none are given (plain text; ``messages=True`` sends each as a user message)."""

_PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
_CSS = ("body{font-family:sans-serif;max-width:1150px;margin:auto;padding:0 12px}"
        "table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:2px 7px;"
        "text-align:left;vertical-align:top}th{background:#f0f0f0}pre{white-space:pre-wrap;background:#f6f6f6;"
        "padding:6px;margin:0}.note{color:#7a4a00}")


# ---------------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------------
def _folder_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked to be a steer_lens vector config."""
    if not folder.is_dir():
        raise ConfigError(
            f"{str(folder)!r}: no such folder. Fix: pass a folder written by SteeredTransformer.save "
            "(steer-lens train ... --out OUT writes OUT/vector; steer-lens import writes one too)."
        )
    try:
        cfg = read_json(folder / CONFIG_FILE)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(
            f"{str(folder)!r}: not a vector folder with a readable {CONFIG_FILE} ({e}). Fix: pass a folder "
            "written by SteeredTransformer.save."
        ) from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise IncompatibleVectorError(f"{str(folder / CONFIG_FILE)!r} is not a steer_lens vector config.")
    return cfg


def load_vector(
    folder: str | Path,
    model: Any = None,
    *,
    gguf_file: str | None = None,
    allow_other_model: bool = False,
    device: str = "cpu",
) -> SteeredTransformer:
    """Load a saved vector folder onto its model (loaded by name when ``model`` is a name or ``None``).

    Args:
        folder: a folder written by :meth:`SteeredTransformer.save <steer_lens.SteeredTransformer.save>`.
        model: ``None`` (the model the folder records, with its GGUF file and weight processing), a
            Hugging Face name, or a loaded model.
        gguf_file: GGUF file of the model (default: the recorded one when the name is the recorded name).
        allow_other_model: load the vectors onto a model with another name (same ``d_model``).
        device: where a model loaded by name goes.

    Raises:
        ConfigError: the folder does not exist or has no readable ``config.json``; it records no model
            name and none was given.
        IncompatibleVectorError: not a steer_lens folder, damaged, or made on another model than the one
            named (both names given; checked before the model is loaded) or given.
        NonFiniteError: the saved vectors hold NaN or inf.
    """
    import steer_lens as sl

    folder = Path(folder)
    cfg = _folder_config(folder)
    recorded = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if model is None or isinstance(model, str):
        name = model or recorded.get("name")
        if not name:
            raise ConfigError(f"{folder}/{CONFIG_FILE} records no model name. Fix: pass --model NAME.")
        if name != recorded.get("name") and not allow_other_model:
            raise IncompatibleVectorError(
                f"the vectors in {str(folder)!r} were made on model {recorded.get('name')!r}; the given model is "
                f"{name!r}. Fix: leave the model out (the recorded one is loaded), or pass allow_other_model=True "
                "(--allow-other-model) to load them anyway (same d_model)."
            )
        gguf = gguf_file or (recorded.get("gguf_file") if name == recorded.get("name") else None)
        processing = cfg.get("weight_processing") if isinstance(cfg.get("weight_processing"), dict) else {}
        model = sl.load_model(name, gguf_file=gguf, device=device,
                              **{k: bool(v) for k, v in processing.items() if k in _PROCESSING})
    return SteeredTransformer.load(folder, model, allow_other_model=allow_other_model)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per non-empty line (``\\n`` inside a line stays literal).

    Raises:
        ConfigError: the file does not exist.
        EmptyInputError: the file holds no non-empty line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist. Fix: give a text file, one prompt per line.")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EmptyInputError(f"prompts file {str(path)!r} holds no prompt; write one prompt per line.")
    return prompts


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ConfigError(f"out: {str(out)!r} is a folder. Fix: give a file name such as report.html.")


def _prompt_label(p: Prompt) -> str:
    return p[-1]["content"] if is_conversation(p) else str(p)


# ---------------------------------------------------------------------------------------------------
# what the report holds
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VectorReport:
    """Everything :func:`vector_report` shows, computed by the library's own functions (CPU results).

    Attributes:
        header: model name, source folder, kind, scale, positions, training config, library version.
        prompts: the prompts used (texts or conversations); prompt_labels: their text.
        norms: ``{hook: ‖v‖}`` (:meth:`SteeringVectors.norms`); shapes: ``{hook: shape}``.
        activation_norms: ``{hook: mean ‖activation‖}`` at the hook in the base run over the prompts'
            tokens, first token excluded (same units as the norms).
        lens_cosine, lens_raw: :class:`~steer_lens.lens.VectorLogitLens` (``None`` when it does not apply,
            see ``notes``).
        layer_lens: one :class:`~steer_lens.lens.LayerLogitLens` per prompt.
        shift: the :class:`~steer_lens.analysis.GenerationShift`.
        generations: ``{"base": [...], "steered": [...]}`` greedy completions per prompt.
        sae_features, sae_shift: the SAE summary (``None`` unless an SAE was given).
        patching: the :class:`~steer_lens.patching.PatchResult` (``None`` unless asked).
        notes: why a section was left out or what to keep in mind, by section.
        seconds: wall-clock time per section.
    """

    header: dict[str, Any]
    prompts: list[Any]
    prompt_labels: list[str]
    norms: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    activation_norms: dict[str, float]
    lens_cosine: Any
    lens_raw: Any
    layer_lens: list[Any]
    shift: Any
    generations: dict[str, list[str]]
    sae_features: Any = None
    sae_shift: Any = None
    patching: Any = None
    notes: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_html(self) -> str:
        """The report as one self-contained HTML document (plotly.js inlined once)."""
        return _render(self)


# ---------------------------------------------------------------------------------------------------
# computing
# ---------------------------------------------------------------------------------------------------
def _header(steered: SteeredTransformer, source: str | None) -> dict[str, Any]:
    from steer_lens import __version__

    cfg = steered.config_dict()
    return {"model": steered.info.name, "gguf_file": steered.info.gguf_file, "source": source,
            "kind": steered.vectors.kind, "hooks": list(steered.hook_names), "scale": steered.scale,
            "positions": cfg["positions"], "d_model": int(steered.cfg.d_model),
            "n_layers": int(steered.cfg.n_layers), "training": steered.training_config,
            "library_version": __version__}


@torch.no_grad()
def _activation_norms(steered: SteeredTransformer, token_rows: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean activation norm at each vector hook in the base run (first token of each prompt excluded)."""
    hooks = list(steered.hook_names)
    total = {h: 0.0 for h in hooks}
    count = 0
    for toks in token_rows:
        with steered.disabled():
            _, cache = steered.run_with_cache(toks[None], names_filter=lambda n: n in hooks)
        start = 1 if toks.shape[0] > 1 else 0
        for h in hooks:
            a = cache[h][0, start:].float()
            total[h] += float(a.reshape(a.shape[0], -1).norm(dim=-1).sum())
        count += toks.shape[0] - start
    return {h: total[h] / count for h in hooks}


def _lenses(steered: SteeredTransformer, norms: dict[str, float], k: int, notes: dict[str, str]):
    from steer_lens.lens import vector_logit_lens

    if not steered.vectors.is_residual_width:
        notes["lens"] = ("some vectors are not [d_model] (e.g. per-head vectors), so they cannot be read "
                         "through the unembedding; the vector logit lens is left out.")
        return None, None
    zero = [h for h, n in norms.items() if not n > 0]
    raw = vector_logit_lens(steered, k=k, mode="raw")
    if zero:
        notes["lens"] = f"zero vectors at {zero}: their cosine with W_U is undefined, so only the dot product is shown."
        return None, raw
    return vector_logit_lens(steered, k=k, mode="cosine"), raw


def _generations(steered: SteeredTransformer, prompts: list[Any], max_new_tokens: int, seed: int):
    kw = {"do_sample": False, "seed": seed}
    steered_out = steered.sample(prompts, max_new_tokens, **kw).completions
    with steered.disabled():
        base_out = steered.sample(prompts, max_new_tokens, **kw).completions
    return {"base": list(base_out or []), "steered": list(steered_out or [])}


def _load_sae(spec: str):
    """``RELEASE:ID`` (sae-lens pretrained) or a folder (sae-lens format, e.g. :meth:`TrainedSAE.save`)."""
    from steer_lens import sae as sae_mod

    if Path(spec).is_dir():
        return sae_mod.load(spec)
    if ":" not in spec:
        raise ConfigError(f"sae: expected RELEASE:ID (a sae-lens pretrained SAE) or an SAE folder, got {spec!r}.")
    release, sae_id = spec.split(":", 1)
    return sae_mod.load(release, sae_id=sae_id)


def _sae_summary(steered, sae, texts: list[str], k: int, notes: dict[str, str]):
    from steer_lens.analysis import activation_shift
    from steer_lens.sae import HookMismatchWarning, vector_features

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HookMismatchWarning)
        feats = vector_features(steered, sae, k=k)
        shift = activation_shift(steered, sae, texts)
    msgs = [str(w.message) for w in caught if issubclass(w.category, HookMismatchWarning)]
    if msgs:
        notes["sae"] = " ".join(dict.fromkeys(msgs))
    return feats, shift


def _patching(steered: SteeredTransformer, toks: torch.Tensor):
    from steer_lens.metrics import kl_to
    from steer_lens.patching import steering_patch

    with torch.no_grad():
        ref = steered(toks[None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a vector that does not move the output: the result says within_noise
        return steering_patch(steered, toks[None], kl_to(ref), hook="resid_post", mode="denoise")


def _timed(seconds: dict[str, float], name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[name] = time.perf_counter() - t
    return out


def _check_counts(**counts: int) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {v!r}.")


def _as_prompts(steered: SteeredTransformer, prompts: Sequence[str] | None, messages: bool) -> list[Any]:
    texts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not texts:
        raise EmptyInputError("prompts: got an empty list; give at least one prompt.")
    if getattr(steered.model, "tokenizer", None) is None:
        raise ConfigError("the model has no tokenizer, so text prompts cannot be run; load it by its hub name.")
    if not messages:
        return texts
    convs = [[{"role": "user", "content": t}] for t in texts]
    steered.chat_text(convs[0])  # ConfigError now when the model has no chat template
    return convs


def build_report(
    steered: SteeredTransformer,
    *,
    source: str | None = None,
    prompts: Sequence[str] | None = None,
    messages: bool = False,
    k: int = 10,
    max_new_tokens: int = 32,
    n_samples: int = 4,
    seed: int = 0,
    sae: Any = None,
    patching: bool = False,
) -> VectorReport:
    """Compute every section of the report for a wrapper (see the module docstring).

    Args:
        steered: the :class:`~steer_lens.SteeredTransformer` to report on.
        source: the folder it was loaded from (shown in the header).
        prompts: texts (default :data:`DEFAULT_PROMPTS`).
        messages: send each prompt as a user message through the model's chat template.
        k: tokens per side in the vector lens, features in the SAE summary.
        max_new_tokens: tokens generated per prompt (greedy generations and the position shift).
        n_samples: sampled continuations per prompt for the position shift (seeded).
        seed: seed of the sampling.
        sae: ``None``, an SAE (sae-lens or :class:`~steer_lens.sae.TrainedSAE`), or a spec string
            ``RELEASE:ID`` / an SAE folder.
        patching: add the steering-patching summary (first prompt).

    Returns:
        A :class:`VectorReport`.

    Raises:
        EmptyInputError: no prompts.
        ConfigError: ``k``, ``max_new_tokens`` or ``n_samples`` below 1; no tokenizer; ``messages``
            without a chat template; a bad SAE spec.
        ModelNotAvailableError: a pretrained SAE that is not cached (offline).
        HookNameError: an SAE of another model (and what the other analyses raise).
    """
    from steer_lens.analysis import generation_shift
    from steer_lens.lens import layer_logit_lens

    _check_counts(k=k, max_new_tokens=max_new_tokens, n_samples=n_samples)
    plist = _as_prompts(steered, prompts, messages)
    sae = _load_sae(sae) if isinstance(sae, str) else sae
    notes: dict[str, str] = {}
    sec: dict[str, float] = {}
    rows = [steered.prompt_tokens(p) for p in plist]
    norms = steered.vectors.norms()
    shapes = {h: tuple(steered.vectors.direction(h).shape) for h in steered.hook_names}
    act = _timed(sec, "norms", _activation_norms, steered, rows)
    cos, raw = _timed(sec, "vector lens", _lenses, steered, norms, k, notes)
    layers = _timed(sec, "layer lens", lambda: [layer_logit_lens(steered, r) for r in rows])
    shift = _timed(sec, "position shift", generation_shift, steered, plist, max_new_tokens=max_new_tokens,
                   n_samples=n_samples, seed=seed)
    gens = _timed(sec, "generations", _generations, steered, plist, max_new_tokens, seed)
    labels = [_prompt_label(p) for p in plist]
    feats = sae_shift = patch = None
    if sae is not None:
        feats, sae_shift = _timed(sec, "sae", _sae_summary, steered, sae, labels, k, notes)
    if patching:
        patch = _timed(sec, "patching", _patching, steered, rows[0])
    return VectorReport(_header(steered, source), plist, labels, norms, shapes, act, cos, raw, layers, shift,
                        gens, feats, sae_shift, patch, notes, sec)


def vector_report(
    steered_or_folder: SteeredTransformer | str | Path,
    out: str | Path = "report.html",
    *,
    model: Any = None,
    gguf_file: str | None = None,
    allow_other_model: bool = False,
    device: str = "cpu",
    **report_kwargs: Any,
) -> Path:
    """Write one offline HTML report of a vector (a wrapper or a saved folder) to ``out``.

    Args:
        steered_or_folder: a :class:`~steer_lens.SteeredTransformer`, or a saved vector folder.
        out: the HTML file to write (atomically; nothing is written when anything fails).
        model, gguf_file, allow_other_model, device: how a folder is loaded (:func:`load_vector`);
            ``model`` must be ``None`` for a wrapper.
        **report_kwargs: ``prompts``, ``messages``, ``k``, ``max_new_tokens``, ``n_samples``, ``seed``,
            ``sae``, ``patching`` (:func:`build_report`).

    Returns:
        The path written.

    Raises:
        ConfigError: ``out`` is a folder; ``model`` given with a wrapper; and as :func:`load_vector` and
        :func:`build_report`.
    """
    out = Path(out)
    _check_out(out)
    if isinstance(steered_or_folder, SteeredTransformer):
        if model is not None:
            raise ConfigError("model: a SteeredTransformer already holds its model; pass model=None.")
        steered, source = steered_or_folder, None
    else:
        steered = load_vector(steered_or_folder, model, gguf_file=gguf_file, allow_other_model=allow_other_model,
                              device=device)
        source = str(steered_or_folder)
    report = build_report(steered, source=source, **report_kwargs)
    atomic_write_bytes(out, report.to_html().encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"<td>{v:.6g}</td>"
    return f"<td>{html.escape(str(v))}</td>"


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


class _Figures:
    """Figures to HTML: plotly.js inlined in the first one only; div ids numbered (a stable file)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, fig) -> str:
        self.n += 1
        height = f"{int(fig.layout.height)}px" if fig.layout.height else "450px"
        return fig.to_html(full_html=False, include_plotlyjs=self.n == 1, div_id=f"figure-{self.n}",
                           default_height=height, config={"displaylogo": False})


def _norms_html(r: VectorReport, fig: _Figures) -> str:
    from steer_lens import plotting

    scale = float(r.header["scale"])
    rows = [[h, str(list(r.shapes[h])), r.norms[h], scale * r.norms[h], r.activation_norms[h],
             scale * r.norms[h] / r.activation_norms[h] if r.activation_norms[h] > 0 else float("nan")]
            for h in r.norms]
    table = _table("norms", ["hook", "shape", "norm", "scale × norm", "mean activation norm (base)",
                             "ratio"], rows)
    bars = plotting.bars({"scale × norm": (list(r.norms), [row[3] for row in rows]),
                          "mean activation norm (base)": (list(r.norms), [row[4] for row in rows])},
                         title="Vector norm per hook, beside the activation's norm there", y_title="L2 norm")
    return "<h2 id='sec-norms'>Vector norms per hook</h2>" + table + fig(bars)


def _lens_tables(lens, prefix: str, value: str, with_dot: bool) -> str:
    parts = []
    for i, (hook, ts) in enumerate(lens.items()):
        rows = []
        for side, ids, toks in (("top", ts.top_ids, ts.top_tokens), ("bottom", ts.bottom_ids, ts.bottom_tokens)):
            for rank, (tid, tok) in enumerate(zip(ids.tolist(), toks, strict=True), start=1):
                row = [side, rank, repr(tok), tid, float(ts.scores[tid])]
                rows.append([*row, float(ts.dot[tid])] if with_dot else row)
        header = ["side", "rank", "token", "token_id", value] + (["dot (logits)"] if with_dot else [])
        parts.append(f"<h4>{html.escape(hook)}</h4>" + _table(f"{prefix}-{i}", header, rows))
    return "".join(parts)


def _lens_html(r: VectorReport, fig: _Figures) -> str:
    out = ["<h2 id='sec-lens'>Vector logit lens</h2>"]
    if "lens" in r.notes:
        out.append(f"<p class='note'>{html.escape(r.notes['lens'])}</p>")
    if r.lens_cosine is not None:
        out.append("<h3>By cosine with each token's unembedding (Sinii et al. 2025)</h3>")
        out.append(_lens_tables(r.lens_cosine, "lens-cosine", "cosine", True) + fig(r.lens_cosine.plot()))
    if r.lens_raw is not None:
        out.append("<h3>By dot product W_U·v (the vector's direct logit attribution, logits)</h3>")
        out.append(_lens_tables(r.lens_raw, "lens-raw", "dot (logits)", False) + fig(r.lens_raw.plot()))
    return "".join(out)


def _layer_lens_html(r: VectorReport, fig: _Figures) -> str:
    from steer_lens import plotting

    out = ["<h2 id='sec-layer-lens'>Per-layer logit lens, steered vs base (last position)</h2>"]
    series = {f"prompt {i}": (ll.labels, ll.kl[:, -1].float()) for i, ll in enumerate(r.layer_lens)}
    out.append(fig(plotting.lines(series, title="KL(steered ‖ base) of the lens at the last position",
                                  x_title="layer", y_title="KL (nats)")))
    for i, (label, ll) in enumerate(zip(r.prompt_labels, r.layer_lens, strict=True)):
        df = ll.to_pandas(position=-1, k=3)
        rows = [[row.layer, float(row.kl_steered_base), row.steered_top, row.base_top] for row in df.itertuples()]
        out.append(f"<h3>prompt {i}: <code>{html.escape(label)}</code></h3>")
        out.append(_table(f"layer-lens-{i}", ["layer", "KL(steered ‖ base), nats", "steered top-3 (prob)",
                                              "base top-3 (prob)"], rows))
    out.append("<h3>prompt 0, every position</h3>" + fig(r.layer_lens[0].plot()))
    return "".join(out)


def _shift_html(r: VectorReport, fig: _Figures) -> str:
    s = r.shift
    rows = [[int(row.position), float(row.mean_tv), row.top_gains] for row in s.to_pandas().itertuples()]
    return ("<h2 id='sec-shift'>Position shift</h2><p>Total variation between the steered and the base "
            f"next-token distribution at each generated position of {s.tv.shape[0]} steered samples "
            f"(temperature 1, seeded); position 0 carries {s.first_position_share:.1%} of the total.</p>"
            + _table("shift", ["position", "mean TV", "tokens that gain most"], rows) + fig(s.plot()))


def _generations_html(r: VectorReport) -> str:
    g = r.generations
    if not g["base"]:
        return "<h2 id='sec-generations'>Generations</h2><p class='note'>no tokenizer: no text.</p>"
    rows = "".join(f"<tr><td><pre>{html.escape(p)}</pre></td><td><pre>{html.escape(b)}</pre></td>"
                   f"<td><pre>{html.escape(s)}</pre></td></tr>"
                   for p, b, s in zip(r.prompt_labels, g["base"], g["steered"], strict=True))
    return ("<h2 id='sec-generations'>Generations, base vs steered (greedy)</h2><table id='generations'>"
            f"<tr><th>prompt</th><th>base</th><th>steered</th></tr>{rows}</table>")


def _sae_html(r: VectorReport, fig: _Figures) -> str:
    f, s = r.sae_features, r.sae_shift
    note = f"<p class='note'>{html.escape(r.notes['sae'])}</p>" if "sae" in r.notes else ""
    rows = [[int(i), float(f.cosine[i]), float(f.pre_activation[i])] for i in f.top_cosine.tolist()]
    df = s.to_pandas(len(rows))
    shift_rows = [[int(x.feature), float(x.mean_shift), float(x.mean_abs_shift), float(x.mean_base),
                   float(x.mean_steered)] for x in df.itertuples()]
    return ("<h2 id='sec-sae'>SAE features</h2>" + note
            + f"<p>Vector at <code>{html.escape(f.hook)}</code>, SAE at <code>{html.escape(f.sae_hook)}</code>; "
              f"{len(rows)}-sparse reconstruction leaves {f.residual_norm:.4g} of norm {f.vector_norm:.4g}. "
              f"On the prompts the features explain {s.explained:.1%} of the residual change per token.</p>"
            + _table("sae-features", ["feature", "cosine with decoder", "encoder pre-activation"], rows)
            + _table("sae-shift", ["feature", "mean shift", "mean |shift|", "mean base", "mean steered"], shift_rows)
            + fig(s.plot()))


def _patching_html(r: VectorReport, fig: _Figures) -> str:
    p = r.patching
    frac = p.normalized()
    last = frac[:, -1].tolist()
    rows = [[lab, float(p.values[i, -1]), float(last[i])] for i, lab in enumerate(p.labels["layer"])]
    return ("<h2 id='sec-patching'>Steering patching (first prompt)</h2><p>The base run patched with the "
            "steered <code>resid_post</code> at one layer and position; metric KL(steered ‖ patched) at the "
            f"last position (steered {p.clean_metric:.4g}, base {p.corrupted_metric:.4g} nats). The table is "
            "the last position's column.</p>"
            + _table("patching", ["layer", "KL(steered ‖ patched), nats", "fraction recovered"], rows)
            + fig(p.plot(normalized=True)))


def _header_html(r: VectorReport) -> str:
    h = r.header
    rows = [[k, json.dumps(v, default=str) if isinstance(v, dict | list) else v] for k, v in h.items()
            if k != "training"]
    training = json.dumps(h["training"], indent=1, default=str) if h["training"] else "none recorded"
    return (f"<h1>Steering vector report: {html.escape(str(h['model']))}</h1>"
            + _table("header", ["field", "value"], rows)
            + f"<details><summary>training config</summary><pre>{html.escape(training)}</pre></details>")


def _render(r: VectorReport) -> str:
    fig = _Figures()
    parts = [_header_html(r), _norms_html(r, fig)]
    parts += [_lens_html(r, fig), _layer_lens_html(r, fig), _shift_html(r, fig), _generations_html(r)]
    if r.sae_features is not None:
        parts.append(_sae_html(r, fig))
    if r.patching is not None:
        parts.append(_patching_html(r, fig))
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    parts.append(f"<p><small>Computed in: {html.escape(timing)}.</small></p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>steer_lens vector report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")
