"""`llm-sae demo` end to end at its reduced size: every stage runs and the site lists the features."""

from __future__ import annotations

import json

import pytest

from llm_sae.demo import DemoConfig, demo, format_summary


@pytest.mark.slow
def test_demo_small_runs_every_stage(tmp_path, tiny_gpt2_dir, text_dir, capsys):
    out = tmp_path / "demo"
    s = demo(DemoConfig(
        out=str(out), model=str(tiny_gpt2_dir), dataset=str(text_dir / "docs.jsonl"),
        small=True, context_length=32, train_tokens=50_000,
    ))
    assert set(s["stage_seconds"]) == {"harvest", "train", "analyze", "dashboard", "eval"}
    assert 0 < s["tokens_harvested"] <= 40_000
    assert s["l0"] == pytest.approx(16)
    assert 0 <= s["fvu"] < 1 and 0 <= s["dead_fraction"] <= 1
    assert "loss_recovered_mean" in s
    index_js = (out / "site" / "data" / "index.js").read_text()
    index = json.loads(index_js.split("=", 1)[1].rstrip().rstrip(";"))
    assert s["n_features"] == 4 * 32  # small: expansion 4 on the tiny model's width 32
    assert index["id"] == list(range(4 * 32))
    assert json.loads((out / "demo_summary.json").read_text())["dashboard"].endswith("index.html")
    text = format_summary(s)
    assert "FVU" in text and str(out / "site" / "index.html") in text
