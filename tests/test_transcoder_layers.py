"""Transcoders at several layers of one harvest: `llm-sae eval` on transcoder runs (the
replacement model per layer and all at once)."""

from __future__ import annotations

import json

import pytest

from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train

PAIRS = [(f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out") for i in (0, 1)]


@pytest.fixture(scope="module")
def layer_pairs(tmp_path_factory, tiny_gpt2_dir, text_dir):
    """Both layers' (MLP input, MLP output) stores from one harvest of tiny_gpt2."""
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    out = tmp_path_factory.mktemp("stores") / "layers"
    dirs = harvest(HarvestConfig(
        model=str(tiny_gpt2_dir), hook=[o for _, o in PAIRS], pair=[f"{i}:{o}" for i, o in PAIRS],
        dataset=str(text_dir / "docs.jsonl"), tokens=1500, out=str(out), context_length=32, batch_size=16,
        device="cpu", shard_rows=512, progress=False,
    ))
    return [(dirs[i], dirs[o]) for i, o in PAIRS]


def test_cli_eval_reports_the_replacement_model(layer_pairs, tmp_path, one_thread, capsys):
    from llm_sae.cli import main
    from llm_sae.errors import LlmSaeError

    runs = []
    for layer, (d_in, d_out) in enumerate(layer_pairs):
        runs.append(str(train(TrainConfig(
            store=str(d_in), target_store=str(d_out), out=str(tmp_path / f"tc{layer}"), arch="topk", k=8,
            expansion=4, skip=layer == 1, batch_size=64, tokens=64 * 60, device="cpu"))))
    assert main(["eval", "--sae", ",".join(runs), "--out", str(tmp_path / "ev"), "--n-contexts", "4",
                 "--eval-rows", "512", "--model-batch-size", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "replacement model over" in table and "all" in table
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rep = report["replacement"]["replaced"]
    assert set(rep) == {"tc0", "tc1", "all"} and rep["all"]["transcoders"] == ["tc0", "tc1"]
    for name in ("tc0", "tc1"):
        e = report["saes"][name]
        assert e["out_hook"] == f"blocks.{name[-1]}.hook_mlp_out" and e["reconstruction"]["rows"] == 512
        assert 0 < e["reconstruction"]["fvu"] < 1  # of the MLP output, not of the input
        assert e["replacement"] == rep[name]
    for row in rep.values():
        assert row["loss_recovered_with_error"] == pytest.approx(1.0, abs=1e-4)
        assert row["kl"] > row["kl_with_error"]  # (a random tiny model: LR itself is noisy)
    # An SAE among transcoders is refused before any work.
    sae_run = train(TrainConfig(store=str(layer_pairs[0][1]), out=str(tmp_path / "sae"), k=4, expansion=2,
                                batch_size=64, tokens=64 * 2, device="cpu"))
    from llm_sae.evaluate.config import EvalConfig
    from llm_sae.evaluate.run import evaluate

    with pytest.raises(LlmSaeError, match="separate runs"):
        evaluate(EvalConfig(sae=[runs[0], str(sae_run)]))
