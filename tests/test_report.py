"""``steer-lens report``: one offline HTML file whose numbers are the library's (and TransformerLens's).

References: the saved safetensors file itself (norms), TransformerLens's ``run_with_cache`` on the bare
model (activation norms), the cosine formula transcribed by hand (vector lens), and the library's own
``layer_logit_lens`` / ``generation_shift`` / ``sample`` / ``steering_patch`` results on the same
inputs (each tested against its own reference in its own test file). Offline: no http(s) resource in
any script, link, img, iframe or source tag, plotly.js inlined exactly once, every inline script
valid JavaScript (``node --check`` where node exists; no headless browser on this machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import steer_lens as sl
from steer_lens.cli import main
from steer_lens.errors import ConfigError, EmptyInputError, IncompatibleVectorError
from steer_lens.report import build_report, load_vector, read_prompts, vector_report
from steer_lens.vectors.io import load_safetensors

HOOKS = ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out")
PROMPTS = ["Once upon a time", "The little dog ran to the"]
NEW, SAMPLES = 10, 2


class _Page(HTMLParser):
    """Tables by id (rows of cell texts), resource URLs of script/link/img/iframe/source, script bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._script: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "img", "iframe", "source", "embed", "object"):
            self.urls += [v for k, v in a.items() if k in ("src", "href", "data", "srcset") and v]
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "script":
            self._script = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "script" and self._script is not None:
            self.scripts.append("".join(self._script))
            self._script = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._script is not None:
            self._script.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _rows(page: _Page, table_id: str) -> list[list[str]]:
    return page.tables[table_id][1:]  # without the header row


def _save(model, folder, hooks=HOOKS, scale=2.0):
    g = torch.Generator().manual_seed(0)
    init = {h: 3.0 * torch.randn(int(model.cfg.d_model), generator=g) for h in hooks}
    sl.SteeredTransformer(model, hooks=list(hooks), init=init, scale=scale).save(folder)
    return folder


@pytest.fixture(scope="module")
def made(real_model, tmp_path_factory):
    """A saved folder, its report (with the patching summary) and the parsed page."""
    tmp = tmp_path_factory.mktemp("report")
    folder = _save(real_model, tmp / "vec")
    out = vector_report(folder, tmp / "r.html", model=real_model, prompts=PROMPTS, max_new_tokens=NEW,
                        n_samples=SAMPLES, patching=True)
    return folder, out, _parse(out), sl.SteeredTransformer.load(folder, real_model)


@pytest.mark.real_model
def test_norms_table_equals_the_saved_tensors_and_the_base_activations(made, real_model):
    folder, _, page, _ = made
    saved = load_safetensors(folder / "vectors.safetensors")
    rows = {r[0]: r for r in _rows(page, "norms")}
    assert list(rows) == list(HOOKS)
    toks = [real_model.to_tokens(p)[0] for p in PROMPTS]
    for h in HOOKS:
        norm = float(torch.linalg.vector_norm(saved[h].double()))
        assert float(rows[h][2]) == pytest.approx(norm, rel=1e-5)
        assert float(rows[h][3]) == pytest.approx(2.0 * norm, rel=1e-5)
        # mean ||activation|| at the hook on the bare model (TransformerLens), first token excluded
        acts = [real_model.run_with_cache(t[None], names_filter=h)[1][h][0, 1:].double().norm(dim=-1) for t in toks]
        assert float(rows[h][4]) == pytest.approx(float(torch.cat(acts).mean()), rel=1e-5)


@pytest.mark.real_model
def test_lens_tables_equal_the_lens_and_the_cosine_formula(made, real_model):
    _, _, page, steered = made
    cos = sl.lens.vector_logit_lens(steered, k=10, mode="cosine")
    raw = sl.lens.vector_logit_lens(steered, k=10, mode="raw")
    W_U = real_model.W_U.detach().double()
    for i, h in enumerate(HOOKS):
        rows = _rows(page, f"lens-cosine-{i}")
        assert [r[2] for r in rows] == [repr(t) for t in cos[h].top_tokens + cos[h].bottom_tokens]
        v = steered.vectors.direction(h).detach().double() * steered.scale
        for r in rows:
            t = int(r[3])
            by_hand = float(W_U[:, t] @ v / (W_U[:, t].norm() * v.norm()))
            assert float(r[4]) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
            assert float(r[5]) == pytest.approx(float(W_U[:, t] @ v), rel=1e-5, abs=1e-5)
        raw_rows = _rows(page, f"lens-raw-{i}")
        assert [int(r[3]) for r in raw_rows] == raw[h].top_ids.tolist() + raw[h].bottom_ids.tolist()


@pytest.mark.real_model
def test_layer_lens_shift_generations_and_patching_equal_the_library(made):
    _, _, page, steered = made
    for i, p in enumerate(PROMPTS):
        ll = sl.lens.layer_logit_lens(steered, p)
        rows = _rows(page, f"layer-lens-{i}")
        assert [r[0] for r in rows] == ll.labels
        torch.testing.assert_close(torch.tensor([float(r[1]) for r in rows]), ll.kl[:, -1].float(),
                                   rtol=1e-5, atol=1e-7)
    shift = sl.analysis.generation_shift(steered, PROMPTS, max_new_tokens=NEW, n_samples=SAMPLES, seed=0)
    torch.testing.assert_close(torch.tensor([float(r[1]) for r in _rows(page, "shift")]), shift.mean_tv,
                               rtol=1e-5, atol=1e-7)
    steered_text = steered.sample(PROMPTS, NEW, do_sample=False).completions
    with steered.disabled():
        base_text = steered.sample(PROMPTS, NEW, do_sample=False).completions
    gens = _rows(page, "generations")
    assert [r[0] for r in gens] == PROMPTS
    assert [r[1] for r in gens] == base_text and [r[2] for r in gens] == steered_text
    assert base_text != steered_text  # the vector (norm ~70 at scale 2) changes greedy text
    toks = steered.to_tokens(PROMPTS[0])[None]
    with torch.no_grad():
        ref = steered(toks)
    patch = sl.patching.steering_patch(steered, toks, sl.metrics.kl_to(ref), hook="resid_post")
    got = torch.tensor([float(r[2]) for r in _rows(page, "patching")])
    torch.testing.assert_close(got, patch.normalized()[:, -1].float(), rtol=1e-5, atol=1e-6)
    assert got[-1] == pytest.approx(1.0)  # the last layer's resid_post at the last position is the output


@pytest.mark.real_model
def test_the_file_is_offline_with_plotly_inlined_once(made):
    _, out, page, _ = made
    text = out.read_text(encoding="utf-8")
    assert not [u for u in page.urls if u.strip().lower().startswith(("http:", "https:", "//"))]
    assert page.urls == []  # no external resource of any kind: everything is inline
    assert sum("* plotly.js v" in s for s in page.scripts) == 1
    assert text.count("* plotly.js v") == 1
    n_figs = text.count('class="plotly-graph-div"')
    assert n_figs >= 7 and sum("Plotly.newPlot(" in s for s in page.scripts) == n_figs
    assert "<link" not in text and "@import" not in text and "@font-face" not in text


@pytest.mark.real_model
def test_every_inline_script_is_valid_javascript(made, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the inline scripts are not syntax-checked")
    _, _, page, _ = made
    for i, s in enumerate(page.scripts):
        f = tmp_path / f"s{i}.js"
        f.write_text(s, encoding="utf-8")
        res = subprocess.run([node, "--check", str(f)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[:500]


@pytest.mark.real_model
def test_bad_input_raises_named_errors_and_writes_nothing(real_model, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old")
    with pytest.raises(ConfigError, match="no such folder"):
        vector_report(tmp_path / "missing", out, model=real_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a vector folder"):
        vector_report(tmp_path / "empty", out, model=real_model)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(IncompatibleVectorError, match="not a steer_lens vector config"):
        vector_report(tmp_path / "other", out)
    folder = _save(real_model, tmp_path / "vec")
    with pytest.raises(IncompatibleVectorError, match=r"TinyStories-656K.*some/other-model"):
        load_vector(folder, "some/other-model")  # refused before any model is loaded
    with pytest.raises(ConfigError, match="is a folder"):
        vector_report(folder, tmp_path, model=real_model)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        vector_report(folder, out, model=real_model, max_new_tokens=0)
    with pytest.raises(ConfigError, match="chat template"):
        vector_report(folder, out, model=real_model, messages=True)
    steered = sl.SteeredTransformer.load(folder, real_model)
    with pytest.raises(ConfigError, match="model=None"):
        vector_report(steered, out, model=real_model)
    assert out.read_text() == "old"
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(EmptyInputError):
        read_prompts(tmp_path / "p.txt")


@pytest.mark.real_model
def test_cli_report_with_a_prompts_file(real_model, tmp_path, capsys):
    folder = _save(real_model, tmp_path / "vec")
    (tmp_path / "p.txt").write_text("A cat sat\n\nThe sun was\n")
    out = tmp_path / "sub" / "r.html"
    args = ["report", str(folder), "--out", str(out), "--prompts", str(tmp_path / "p.txt"),
            "--max-new-tokens", "6", "--samples", "1", "--k", "5"]
    assert main(args) == 0 and "written to" in capsys.readouterr().out
    page = _parse(out)
    assert [r[0] for r in _rows(page, "generations")] == ["A cat sat", "The sun was"]
    assert len(_rows(page, "lens-cosine-0")) == 10 and len(_rows(page, "shift")) == 6
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Fix:" in err and not (tmp_path / "x.html").exists()
    assert main(["report", str(folder), "--model", "some/other-model", "--out", str(tmp_path / "x.html")]) == 2
    assert "allow-other-model" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


@pytest.mark.real_model
def test_an_imported_control_vector_folder_reports_the_file_directions(real_model, tmp_path):
    gguf = pytest.importorskip("gguf")
    hook = "blocks.1.hook_resid_post"
    g = torch.Generator().manual_seed(1)
    steered = sl.SteeredTransformer(real_model, hooks=[hook], init={hook: torch.randn(128, generator=g)}, scale=3.0)
    sl.export.export(steered, tmp_path / "v.gguf", format="gguf")
    sl.export.import_control_vector(tmp_path / "v.gguf", real_model).save(tmp_path / "imported")
    out = vector_report(tmp_path / "imported", tmp_path / "r.html", prompts=PROMPTS[:1], max_new_tokens=4,
                        n_samples=1)
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    direction = torch.tensor(next(t for t in reader.tensors if t.name == "direction.1").data.copy())
    (row,) = _rows(_parse(out), "norms")
    assert row[0] == hook and float(row[3]) == pytest.approx(float(direction.double().norm()), rel=1e-5)


@pytest.mark.real_model
def test_sae_summary_from_an_sae_folder(real_model, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=128, d_sae=64, k=6))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T)
    sae.cfg.metadata.hook_name = hook
    sae.save_model(tmp_path / "sae")
    folder = _save(real_model, tmp_path / "vec", hooks=(hook,))
    steered = sl.SteeredTransformer.load(folder, real_model)
    report = build_report(steered, prompts=PROMPTS, max_new_tokens=4, n_samples=1, k=5, sae=str(tmp_path / "sae"))
    page = _Page()
    page.feed(report.to_html())
    ref = sl.sae.vector_features(steered, sl.sae.load(tmp_path / "sae"), k=5)
    rows = _rows(page, "sae-features")
    assert [int(r[0]) for r in rows] == ref.top_cosine.tolist()
    torch.testing.assert_close(torch.tensor([float(r[1]) for r in rows]), ref.cosine[ref.top_cosine],
                               rtol=1e-5, atol=1e-6)
    shift = sl.analysis.activation_shift(steered, sl.sae.load(tmp_path / "sae"), PROMPTS)
    assert [int(r[0]) for r in _rows(page, "sae-shift")] == shift.to_pandas(5).feature.tolist()
    with pytest.raises(ConfigError, match="RELEASE:ID"):
        build_report(steered, prompts=PROMPTS, sae="not-a-folder-or-release")


@pytest.mark.chat_model
def test_chat_prompts_through_the_template(chat_model):
    hook = "blocks.10.hook_resid_post"
    steered = sl.SteeredTransformer(chat_model, hooks=[hook], init="random", init_norm=4.0, seed=0)
    report = build_report(steered, prompts=["Hi"], messages=True, max_new_tokens=3, n_samples=1)
    assert report.layer_lens[0].str_tokens[:2] == ["<|im_start|>", "system"]
    assert len(report.layer_lens[0].labels) == 31
    assert report.prompt_labels == ["Hi"]


def _browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.real_model
def test_every_figure_renders_in_a_headless_browser_with_the_network_off(made):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser (apt-get install chromium-headless-shell): rendering not checked")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("cannot run the browser in a namespace without network (unshare -n needs root)")
    _, out, _, _ = made
    cmd = ["unshare", "-n", browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
           "--dump-dom", "--virtual-time-budget=10000", out.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-1000:]
    assert "Uncaught" not in res.stderr
    n_figs = out.read_text(encoding="utf-8").count('class="plotly-graph-div"')
    # plotly.js ran: every figure div holds its rendered plot container (SVG), none left empty
    assert res.stdout.count('class="plot-container plotly"') == n_figs
    assert res.stdout.count('class="main-svg"') >= n_figs
