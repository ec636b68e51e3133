"""The recovery benchmark: a planted dictionary scores 1, a random one low, training runs."""

from __future__ import annotations

import json

import pytest
import torch

from llm_sae.bench.recovery import DictionarySAE, RecoveryConfig, make_data, recovery, score_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> RecoveryConfig:
    base = dict(d=16, n_true=32, n_latents=64, k=3, tokens=4096, batch_size=256, eval_tokens=1024,
                progress=False, device="cpu")
    return RecoveryConfig(**{**base, **kw})


def test_planted_dictionary_scores_one_and_random_scores_low():
    cfg = _cfg(d=32)
    data = make_data(cfg)
    # The true features (shuffled, rescaled, padded with extra random rows) are a perfect dictionary.
    perm = torch.randperm(cfg.n_true)
    extra = torch.randn(cfg.n_latents - cfg.n_true, cfg.d)
    W = torch.cat([data.features_FD[perm] * 3.0, extra])
    planted = score_sae(DictionarySAE(W, cfg.k), data, cfg, torch.device("cpu"))
    assert planted["mean_max_cos"] == pytest.approx(1.0, abs=1e-5)
    assert planted["frac_recovered"] == 1.0
    rand = score_sae(DictionarySAE(torch.randn(cfg.n_latents, cfg.d), cfg.k), data, cfg, torch.device("cpu"))
    assert rand["mean_max_cos"] < 0.7 and rand["frac_recovered"] == 0.0
    # With the true atoms and exactly as many active as planted, the planted dictionary
    # reconstructs far better than the random one.
    assert planted["fvu"] < rand["fvu"]


@pytest.mark.slow
def test_recovery_trains_each_arch_and_reports(tmp_path, capsys):
    from llm_sae.cli import main

    rc = main(["bench", "recovery", "--archs", "topk,relu_l1", "--d", "16", "--n-true", "32",
               "--n-latents", "64", "--k", "3", "--tokens", "4096", "--batch-size", "256",
               "--eval-tokens", "1024", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "random dictionary" in printed and "relu_l1" in printed
    rep = json.loads((tmp_path / "recovery.json").read_text())
    res = rep["results"]
    assert set(res) == {"random dictionary", "topk", "relu_l1"}
    assert res["topk"]["l0"] <= 3 + 1e-9  # TopK never exceeds k
    for r in res.values():
        assert 0 <= r["mean_max_cos"] <= 1 and 0 <= r["frac_recovered"] <= 1 and r["fvu"] > 0


@pytest.mark.slow
def test_training_improves_on_random_floor():
    cfg = _cfg(tokens=40_960, lr=3e-3)
    rep = recovery(_dataclass_replace(cfg, archs=["topk"]))
    res = rep["results"]
    assert res["topk"]["fvu"] < 0.5 * res["random dictionary"]["fvu"]
    assert res["topk"]["mean_max_cos"] > res["random dictionary"]["mean_max_cos"]


def test_unknown_arch_is_a_clear_error():
    from llm_sae.config import ConfigError

    with pytest.raises(ConfigError, match="unknown architecture"):
        recovery(_cfg(archs=["nope"]))


def _dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
