"""Sweeps: many SAEs from one stream equal the same SAEs trained alone, resume exactly
after SIGKILL, name their folders from their specs, and refuse what cannot be one stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_sae.config import ConfigError
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train
from llm_sae.train.sweep import sweep_configs, sweep_names, train_sweep
from tests.test_train import B, make_store, run_cli, sigkill_after
from tests.test_transcoder import pair_dirs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
D, N = 16, 64


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", rows=4096)


def base(store: Path, out: Path, **kw) -> TrainConfig:
    args = dict(store=str(store), out=str(out), arch="topk", n_latents=N, k=4, tokens=40 * B,
                batch_size=B, checkpoint_every=10 * B, log_every=10, device="cpu", seed=3)
    return TrainConfig(**{**args, **kw})


def test_sweep_equals_separate_runs_and_writes_manifest(store_dir, tmp_path):
    cfgs = sweep_configs(base(store_dir, tmp_path / "sweep"), {"k": ["2", "8"], "arch": ["topk", "batchtopk"]})
    names = sweep_names(cfgs)
    assert names == ["topk-k2", "batchtopk-k2", "topk-k8", "batchtopk-k8"]  # the last axis fastest
    out = train_sweep(cfgs)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["complete"] and [s["name"] for s in manifest["saes"]] == names
    assert manifest["saes"][2]["spec"] == {"arch": "topk", "k": 8}
    for name, arch, k in (("topk-k8", "topk", 8), ("batchtopk-k2", "batchtopk", 2)):
        alone = train(base(store_dir, tmp_path / name, arch=arch, k=k))
        # Same seed, same batches, own optimiser: bit for bit the SAE trained by itself.
        assert (out / name / "sae.safetensors").read_bytes() == (alone / "sae.safetensors").read_bytes()
        logs = (out / name / "log.jsonl").read_text().splitlines()
        assert len(logs) == 4 and json.loads(logs[-1])["step"] == 40


def test_sweep_flags_and_yaml_specs(store_dir, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("- {arch: topk, k: 2}\n- {arch: relu_l1, l1_coef: 1.0, k: 2}\n")
    from llm_sae.cli import main

    assert main(["train", "--store", str(store_dir), "--out", str(tmp_path / "s"), "--sweep", str(spec),
                 "--expansion", "2,4", "--tokens", str(12 * B), "--batch-size", str(B), "--device", "cpu"]) == 0
    names = [s["name"] for s in json.loads((tmp_path / "s" / "sweep.json").read_text())["saes"]]
    assert len(names) == 4 and names[0].startswith("topk-") and "x2" in names[0] and "x4" in names[1]
    assert all((tmp_path / "s" / n / "sae.safetensors").exists() for n in names)
    assert json.loads((tmp_path / "s" / names[1] / "cfg.json").read_text())["n_latents"] == 4 * D


def test_sweep_names_leave_out_fields_a_spec_does_not_set(store_dir, tmp_path):
    """A field only some specs set is not named 'None' in the others' folders."""
    specs = [{"arch": "matryoshka"}, {"arch": "matryoshka", "matryoshka_inner_weight": 1.0}, {"arch": "topk"}]
    assert sweep_names(sweep_configs(base(store_dir, tmp_path / "o"), specs=specs)) == [
        "matryoshka", "matryoshka-matryoshka_inner_weight1.0", "topk"]


def test_sweep_refuses_shared_field_and_duplicates(store_dir, tmp_path):
    b = base(store_dir, tmp_path / "o")
    with pytest.raises(ConfigError, match="one for the whole sweep"):
        sweep_configs(b, {"batch_size": ["64", "128"]})
    with pytest.raises(ConfigError, match="unknown sweep field"):
        sweep_configs(b, {"kk": ["1", "2"]})
    with pytest.raises(ConfigError, match="more than once"):
        sweep_names(sweep_configs(b, specs=[{"k": 2}, {"k": 2}]))
    train_sweep(sweep_configs(b, {"k": ["2", "3"]}))
    with pytest.raises(ConfigError, match="holds another sweep"):
        train_sweep(sweep_configs(b, {"k": ["2", "5"]}))


@pytest.mark.slow
def test_sweep_exact_resume_after_sigkill(store_dir, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    argv = lambda out: ["--store", str(store_dir), "--out", str(out), "--n-latents", str(N),  # noqa: E731
                        "--k", "2,4,8", "--tokens", str(40 * B), "--batch-size", str(B),
                        "--checkpoint-every", str(10 * B), "--device", "cpu", "--seed", "3"]
    p = run_cli(argv(ref))
    assert p.wait(timeout=120) == 0, p.stderr.read()
    p = run_cli(argv(killed), {"LLM_SAE_TEST_STEP_SLEEP": "0.01"})
    # Somewhere after the first checkpoints, maybe inside the next ones.
    sigkill_after(p, killed / "topk-k8" / "checkpoint" / "meta.json", 0.25)
    assert not json.loads((killed / "sweep.json").read_text())["complete"]
    assert not (killed / "topk-k2" / "sae.safetensors").exists()
    p = run_cli(argv(killed))  # the same command resumes every SAE
    assert p.wait(timeout=120) == 0, p.stderr.read()
    for name in ("topk-k2", "topk-k4", "topk-k8"):
        assert (killed / name / "sae.safetensors").read_bytes() == (ref / name / "sae.safetensors").read_bytes()
    assert json.loads((killed / "sweep.json").read_text())["complete"]


def test_eval_over_a_sweep_folder_gives_frontiers_per_arch(tiny_store, tmp_path, capsys):
    from llm_sae.cli import main
    from llm_sae.evaluate.plot import frontier_groups

    sweep = tmp_path / "sweep"
    assert main(["train", "--store", str(tiny_store), "--out", str(sweep), "--k", "2,6", "--arch",
                 "topk,batchtopk", "--expansion", "2,4", "--tokens", str(8 * B), "--batch-size", str(B),
                 "--device", "cpu", "--log-every", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(sweep), "--store", str(tiny_store), "--eval-rows", "300",
                 "--no-downstream", "--no-amortization", "--no-progress"]) == 0
    rep = json.loads((sweep / "eval" / "eval.json").read_text())
    # One table, each architecture's SAEs of one width together in order of k: its frontier.
    assert list(rep["saes"]) == [f"{a}-x{x}-k{k}" for a in ("batchtopk", "topk") for x in (2, 4) for k in (2, 6)]
    d = rep["saes"]["topk-x2-k2"]["n_latents"]
    assert frontier_groups(rep) == [f"{a} n={n}" for a in ("batchtopk", "topk") for n in (d, 2 * d) for _ in "kk"]
    assert rep["saes"]["topk-x2-k6"]["sparsity"]["l0"]["max"] <= 6
    assert (sweep / "eval" / "frontier.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "topk-x2-k6" in printed
    assert f"wrote {sweep / 'eval' / 'eval.json'} and {sweep / 'eval' / 'frontier.png'}" in printed
    (sweep / "topk-x2-k6" / "sae.safetensors").unlink()
    assert main(["eval", "--sae", str(sweep), "--store", str(tiny_store), "--no-downstream"]) == 2
    assert "not finished" in capsys.readouterr().err


def _sweep_job(cfgs: list[TrainConfig]) -> None:
    train_sweep(cfgs)


@pytest.mark.slow
def test_sweep_on_two_gloo_ranks_equals_one_process(store_dir, tmp_path):
    from tests.test_distributed import assert_same_weights, spawn

    def cfgs(out, **kw):
        return sweep_configs(base(store_dir, out, tokens=12 * B, checkpoint_every=4 * B, **kw), {"k": ["2", "4", "8"]})

    one = train_sweep(cfgs(tmp_path / "one"))
    spawn([(_sweep_job, cfgs(tmp_path / "spread", distribute_saes=True)),
           (_sweep_job, cfgs(tmp_path / "dp"))])
    for name in ("topk-k2", "topk-k4", "topk-k8"):
        # Whole gathered batches, one process per SAE: bit for bit the one-process sweep.
        assert (tmp_path / "spread" / name / "sae.safetensors").read_bytes() == (one / name / "sae.safetensors").read_bytes()
        assert_same_weights(one / name, tmp_path / "dp" / name)  # data parallel: all-reduce rounding
    assert json.loads((tmp_path / "spread" / "sweep.json").read_text())["complete"]


def test_transcoder_sweep_equals_separate_runs(pair_dirs, tmp_path):  # noqa: F811
    d_in, d_out = pair_dirs
    kw = dict(store=str(d_in), target_store=str(d_out), arch="topk", expansion=4, skip=True,
              batch_size=64, tokens=64 * 10, log_every=5, device="cpu")
    out = train_sweep(sweep_configs(TrainConfig(out=str(tmp_path / "s"), **kw), {"k": ["2", "4"]}))
    alone = train(TrainConfig(out=str(tmp_path / "alone"), k=4, **kw))
    assert (out / "topk-k4" / "sae.safetensors").read_bytes() == (alone / "sae.safetensors").read_bytes()


def test_sweep_draws_the_b_dec_sample_once(store_dir, tmp_path, monkeypatch):
    """Every SAE of a sweep starts b_dec from the same sample at the same scale: it is read
    and its median computed once, not once per SAE (the bit-for-bit test above checks each
    SAE still starts where it would alone)."""
    from llm_sae.sae import ops
    from llm_sae.sources.store import StoreSource
    from llm_sae.train import trainer

    calls = {"sample": 0, "median": 0}
    sample, median = StoreSource.sample, ops.geometric_median

    def counted_sample(self, n, seed):
        calls["sample"] += 1
        return sample(self, n, seed)

    def counted_median(x_BD):
        calls["median"] += 1
        return median(x_BD)

    monkeypatch.setattr(StoreSource, "sample", counted_sample)
    monkeypatch.setattr(trainer, "geometric_median", counted_median)
    train_sweep(sweep_configs(base(store_dir, tmp_path / "s", tokens=4 * B), {"k": ["2", "4", "8"]}))
    assert calls == {"sample": 1, "median": 1}
