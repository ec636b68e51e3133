"""`llm-sae demo` end to end at its reduced size, on the shipped model and the stdlib corpus."""

from __future__ import annotations

import json

import pytest

from llm_sae.demo import DemoConfig, demo, format_summary


@pytest.mark.slow
def test_demo_small_runs_every_stage_on_the_shipped_model(tmp_path):
    out = tmp_path / "demo"
    s = demo(DemoConfig(out=str(out), small=True))  # tiny-stdlib on `stdlib`, as a user runs it
    assert set(s["stage_seconds"]) == {"harvest", "train", "analyze", "dashboard", "eval"}
    assert s["tokens_harvested"] == 40_000
    assert s["hook"] == "blocks.2.hook_resid_post"  # the middle of the 4-layer model
    assert s["l0"] == pytest.approx(16)
    assert 0 <= s["fvu"] < 0.5 and 0 <= s["dead_fraction"] <= 1
    # Splicing the SAE in must keep most of the model's next-token loss, even at this size.
    assert s["loss_recovered_mean"] > 0.5
    index_js = (out / "site" / "data" / "index.js").read_text()
    index = json.loads(index_js.split("=", 1)[1].rstrip().rstrip(";"))
    assert s["n_features"] == 4 * 128  # small: expansion 4 on tiny-stdlib's width 128
    assert index["id"] == list(range(4 * 128))
    # Token strings come from the shipped tokenizer, not "<id N>" placeholders.
    top = [t for toks in index["top"] for t in toks]
    assert top and not any(t.startswith("<id ") for t in top)
    assert json.loads((out / "demo_summary.json").read_text())["dashboard"].endswith("index.html")
    text = format_summary(s)
    assert "FVU" in text and str(out / "site" / "index.html") in text


def test_default_hook_is_the_middle_block_of_any_architecture(tiny_gpt2_dir, tiny_llama_dir):
    from llm_sae.demo import middle_hook

    assert middle_hook("tiny-stdlib") == "blocks.2.hook_resid_post"  # 4 layers (n_layer)
    assert middle_hook(str(tiny_gpt2_dir)) == "blocks.1.hook_resid_post"  # 2 layers
    assert middle_hook(str(tiny_llama_dir)) == "blocks.1.hook_resid_post"  # num_hidden_layers
