"""The trainer: each architecture learns synthetic sparse data, dead latents come back,
checkpoints resume exactly after SIGKILL, and bad input fails with a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import archs_util
import pytest
import torch
from archs_util import DATA, B, D, K, N

from llm_sae.config import ConfigError
from llm_sae.errors import CheckpointError, DataError, StoreError
from llm_sae.sae.formats.native import load_sae
from llm_sae.sources.synthetic import SyntheticActivations
from llm_sae.train.config import TrainConfig, lr_factor
from llm_sae.train.run import build_sae, train
from llm_sae.train.trainer import Trainer

# Tiny matmuls: extra threads only spin against the other processes on the machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def fit(arch: str, steps: int = 300, **kw) -> tuple:
    return archs_util.fit(arch, steps, held_out=2048, **kw)


def fvu(sae, x_BD, z_BN) -> float:
    with torch.no_grad():
        x_hat_BD = sae.decode(z_BN)
    return float((x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum())


def test_topk_learns_with_exactly_k_active():
    sae, trainer, x_BD, z_BN = fit("topk")
    l0_B = (z_BN > 0).sum(-1)
    assert int(l0_B.max()) == K and float(l0_B.float().mean()) > K - 0.05
    assert fvu(sae, x_BD, z_BN) < 0.2
    assert float(trainer.dead_mask().float().mean()) < 0.1


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "wta"])
def test_variable_sparsity_archs_learn_near_k(arch):
    # JumpReLU starts on target and its thresholds, moved ~lr a step, lag this toy's fast
    # encoder growth for a while: at 300 steps it is at L0 2.6 and FVU 0.25 (3.9 and 0.08
    # at 600; BENCHMARKS.md, issue 17 fourth pass).
    sae, trainer, x_BD, z_BN = fit(arch, steps=600 if arch == "jumprelu" else 300)
    l0 = float((z_BN > 0).sum(-1).float().mean())
    assert 0.5 * K < l0 < 2 * K, l0  # at inference, with learned thresholds
    assert fvu(sae, x_BD, z_BN) < (0.35 if arch == "wta" else 0.2)


def test_kl_sigmoid_mean_activation_near_rho():
    sae, trainer, x_BD, z_BN = fit("kl_sigmoid")
    rho = K / N
    assert abs(float(z_BN.mean()) - rho) < 0.5 * rho
    assert fvu(sae, x_BD, z_BN) < 0.25


def test_relu_l1_sparsity_rises_with_coefficient():
    low = fit("relu_l1", l1_coef=0.3, steps=200)
    high = fit("relu_l1", l1_coef=3.0, steps=200)
    l0_low = float((low[3] > 0).sum(-1).float().mean())
    l0_high = float((high[3] > 0).sum(-1).float().mean())
    assert l0_high < 0.6 * l0_low
    assert fvu(low[0], low[2], low[3]) < 0.1


def _kill_latents(sae, dead: slice, how: str) -> None:
    with torch.no_grad():
        if how == "weak":  # small positive pre-acts: never in the top k, no gradient
            sae.W_enc[dead] *= 0.02
            sae.b_enc[dead] = 0
        else:  # never positive at all
            sae.b_enc[dead] = -100.0


@pytest.mark.parametrize("method", ["auxk", "none"])
def test_auxk_revives_dead_latents(method):
    torch.manual_seed(0)
    data = SyntheticActivations(DATA)
    cfg = TrainConfig(store="", out="", arch="topk", n_latents=N, k=K, tokens=300 * B, batch_size=B,
                      dead_tokens=10 * B, dead_latents=method, lr_warmup=0.0)
    sae = build_sae(cfg, D)
    trainer = Trainer(sae, cfg, total_steps=300)
    trainer.init_from_sample(data.batch(10**6, 4096))
    dead = slice(0, 16)
    _kill_latents(sae, dead, "weak")
    for x_BD in data.batches(B, 300):
        trainer.step(x_BD)
    revived = float((trainer.dead.tokens_since_fired_N[dead] < 10 * B).float().mean())
    if method == "auxk":
        assert revived >= 0.5
    else:  # without AuxK they get no gradient; at most a stray one drifts back in
        assert revived <= 0.125


@pytest.mark.parametrize("method", ["resample", "none"])
def test_resampling_revives_dead_latents(method):
    torch.manual_seed(0)
    data = SyntheticActivations(DATA)
    cfg = TrainConfig(store="", out="", arch="relu_l1", l1_coef=0.3, n_latents=N, k=K,
                      tokens=200 * B, batch_size=B, dead_tokens=20 * B, dead_latents=method)
    sae = build_sae(cfg, D)
    trainer = Trainer(sae, cfg, total_steps=200)
    trainer.init_from_sample(data.batch(10**6, 4096))
    dead = slice(0, 16)
    _kill_latents(sae, dead, "negative")
    for x_BD in data.batches(B, 200):
        trainer.step(x_BD)
    revived = float((trainer.dead.tokens_since_fired_N[dead] < 20 * B).float().mean())
    if method == "resample":
        assert trainer.dead.n_resampled >= 16 and revived >= 0.5
        assert float(sae.W_enc[dead].detach().norm(dim=1).mean()) < float(sae.W_enc[16:].detach().norm(dim=1).mean())
    else:
        assert revived == 0.0 and trainer.dead.n_resampled == 0


def test_nonfinite_batches_skip_or_stop():
    cfg = TrainConfig(store="", out="", arch="topk", n_latents=N, k=K, tokens=10 * B, batch_size=B)
    torch.manual_seed(0)
    trainer = Trainer(build_sae(cfg, D), cfg, total_steps=10)
    x_BD = torch.randn(B, D)
    trainer.init_from_sample(x_BD)
    bad_BD = x_BD.clone()
    bad_BD[7, 3] = float("nan")
    # 'skip' leaves out the bad row, not the batch: one NaN among B rows costs one row.
    assert trainer.step(bad_BD) is not None and trainer.step_idx == 1
    assert trainer.skipped_rows == 1 and trainer.skipped_batches == 0 and trainer.tokens == B - 1
    all_bad_BD = torch.full_like(x_BD, float("nan"))
    assert trainer.step(all_bad_BD) is None and trainer.skipped_batches == 1 and trainer.step_idx == 1
    assert trainer.step(x_BD) is not None and trainer.step_idx == 2
    stop_cfg = TrainConfig(store="", out="", arch="topk", n_latents=N, k=K, batch_size=B, on_nonfinite="stop")
    stopper = Trainer(build_sae(stop_cfg, D), stop_cfg, total_steps=10)
    stopper.init_from_sample(x_BD)
    with pytest.raises(DataError, match=r"store rows \[1007\]"):
        stopper.step(bad_BD, rows_B=torch.arange(B) + 1000)


def test_lr_schedules():
    cfg = TrainConfig(store="", out="", lr_warmup=0.1, lr_decay=0.2)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[79] == 1.0
    assert f[90] == pytest.approx(0.5) and 0 < f[99] <= 0.05
    cos = TrainConfig(store="", out="", lr_warmup=0.1, lr_schedule="cosine")
    g = [lr_factor(s, 100, cos) for s in range(100)]
    assert g[10] == 1.0 and g[55] == pytest.approx(0.5) and g[99] < 0.01
    assert all(a >= b for a, b in zip(g[10:-1], g[11:], strict=True))


# ------------------------------------------------------------------ end to end with a store


def make_store(path: Path, rows: int = 8192, scale: float = 7.0) -> Path:
    from llm_sae.store.writer import StoreWriter

    data = SyntheticActivations(DATA)
    with StoreWriter(path, meta={"d_in": D, "dtype": "float32", "hook": "synthetic"}) as w:
        for i in range(rows // 1024):
            # Raw activations at a scale far from √D, so the folded scaling matters.
            w.append(data.batch(i, 1024) * scale)
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s")


def train_args(store: Path, out: Path, **extra) -> list[str]:
    args = {"store": store, "out": out, "arch": "topk", "n-latents": N, "k": K, "tokens": 120 * B,
            "batch-size": B, "checkpoint-every": 20 * B, "log-every": 10, "device": "cpu", "seed": 3}
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run_cli(argv: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "llm_sae.cli", "train", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sigkill_after(p: subprocess.Popen, marker: Path, settle: float) -> None:
    """SIGKILL ``p`` ``settle`` seconds after ``marker`` appears (it must, within 120 s,
    and ``p`` must still be running then)."""
    deadline = time.time() + 120
    while not marker.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(settle)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def test_train_from_store_saves_folded_sae(store_dir, tmp_path):
    cfg = TrainConfig(store=str(store_dir), out=str(tmp_path / "o"), arch="topk", n_latents=N, k=K,
                      tokens=200 * B, batch_size=B, log_every=50, device="cpu")
    out = train(cfg)
    assert {"cfg.json", "sae.safetensors", "train_cfg.json", "log.jsonl", "checkpoint"} <= {
        p.name for p in out.iterdir()}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and {"fvu", "l0", "dead_frac", "dense_frac", "aux", "tokens_per_s"} <= set(logs[-1])
    assert logs[-1]["fvu"] < logs[0]["fvu"]
    sae = load_sae(out)
    x_raw_BD = SyntheticActivations(DATA).batch(999, 1024) * 7.0  # raw units, no scaling
    with torch.no_grad():
        x_hat_BD = sae.decode(sae.encode(x_raw_BD))
    assert fvu(sae, x_raw_BD, sae.encode(x_raw_BD)) == pytest.approx(
        float((x_raw_BD - x_hat_BD).pow(2).sum() / (x_raw_BD - x_raw_BD.mean(0)).pow(2).sum()))
    assert fvu(sae, x_raw_BD, sae.encode(x_raw_BD)) < 0.3
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))


@pytest.mark.slow
def test_exact_resume_after_sigkill(store_dir, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p = run_cli(train_args(store_dir, ref))
    assert p.wait(timeout=120) == 0, p.stderr.read()

    # Slow the second run down so it is certainly mid-way when the kill lands.
    p = run_cli(train_args(store_dir, killed), {"LLM_SAE_TEST_STEP_SLEEP": "0.03"})
    sigkill_after(p, killed / "checkpoint" / "meta.json", 0.3)  # after the checkpoint, maybe inside the next
    assert not (killed / "sae.safetensors").exists()
    from llm_sae.train.checkpoint import find_checkpoint, read_checkpoint_meta

    ckpt = find_checkpoint(killed)
    assert ckpt is not None and 0 < read_checkpoint_meta(ckpt)["step"] < 120

    p = run_cli(train_args(store_dir, killed))  # the same command resumes
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert (killed / "sae.safetensors").read_bytes() == (ref / "sae.safetensors").read_bytes()
    assert (killed / "cfg.json").read_text() == (ref / "cfg.json").read_text()


def test_resume_refuses_other_width_and_corrupt_checkpoint(store_dir, tmp_path):
    out = tmp_path / "o"
    base = dict(store=str(store_dir), out=str(out), arch="topk", k=K, tokens=20 * B, batch_size=B,
                device="cpu", n_latents=N)
    train(TrainConfig(**base))
    with pytest.raises(CheckpointError, match="n_latents=64 but this run has n_latents=128"):
        train(TrainConfig(**{**base, "n_latents": 2 * N}))
    state = out / "checkpoint" / "state.safetensors"
    blob = bytearray(state.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    state.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        train(TrainConfig(**{**base, "tokens": 40 * B}))
    assert state.exists()  # the damaged checkpoint is left for the user to inspect
    train(TrainConfig(**{**base, "resume": False}))  # --no-resume starts over
    assert (out / "sae.safetensors").exists()


def test_bad_store_and_config_errors(tmp_path, store_dir):
    from llm_sae.store.writer import StoreWriter

    with pytest.raises(StoreError, match="harvest"):
        train(TrainConfig(store=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    w = StoreWriter(tmp_path / "partial", meta={"d_in": D, "dtype": "float32"})
    w.append(torch.randn(64, D))
    w.close(complete=False)
    with pytest.raises(StoreError):
        train(TrainConfig(store=str(tmp_path / "partial"), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="below n_latents"):
        train(TrainConfig(store=str(store_dir), out=str(tmp_path / "o"), n_latents=8, k=8))


def test_cli_help_and_error_exit(store_dir, tmp_path):
    from llm_sae.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert main(["train", "--store", str(store_dir), "--out", str(tmp_path / "o"),
                 "--n-latents", "8", "--k", "8"]) == 2


def test_checkpoint_holds_no_pickle_and_a_pickled_one_cannot_run_code(store_dir, tmp_path):
    """A run folder handed over by someone else must not run their code on resume: the
    checkpoint is safetensors + JSON, and a release-0.1 ``state.pt`` is read by torch's
    weights-only unpickler, which refuses anything but tensors and plain containers."""
    import hashlib
    import pickle

    out = tmp_path / "o"
    base = dict(store=str(store_dir), out=str(out), arch="topk", k=K, tokens=20 * B, batch_size=B,
                device="cpu", n_latents=N)
    train(TrainConfig(**base))
    ckpt = out / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "state.safetensors"]
    assert b"\x80" not in (ckpt / "meta.json").read_bytes()[:2]  # JSON, not a pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    blob = pickle.dumps({"sae": Evil()})
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(format=1, sha256=hashlib.sha256(blob).hexdigest())
    (ckpt / "state.safetensors").unlink()
    (ckpt / "state.pt").write_bytes(blob)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot restore"):
        train(TrainConfig(**{**base, "tokens": 40 * B}))
    assert not marker.exists()


@pytest.mark.parametrize(("arch", "key", "default"), [("matryoshka", "matryoshka_inner_weight", 0.5),
                                                      ("batchtopk", "relative_fade", 0.2)])
def test_checkpoint_from_before_a_setting_existed_resumes_only_at_its_old_value(tmp_path, arch, key, default):
    """A checkpoint written before a training setting existed trained at the value the
    setting names as legacy (LEGACY_DEFAULTS): resuming it under the new default would
    change its training mid-run, so it is refused, naming both values."""
    from llm_sae.train.checkpoint import LEGACY_DEFAULTS

    def trainer(**kw):
        cfg = TrainConfig(store="", out="", arch=arch, n_latents=64, k=4, tokens=64 * 4, batch_size=64, **kw)
        torch.manual_seed(0)
        return Trainer(build_sae(cfg, 16), cfg, total_steps=4)

    old_value = LEGACY_DEFAULTS[key]
    old = trainer(**{key: old_value})
    old.step(torch.randn(64, 16))
    old.save_checkpoint(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["sae"][key]  # as a release before the setting wrote it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{key}={old_value} but this run has {key}={default}"):
        trainer().load_checkpoint(tmp_path / "ckpt")
    resumed = trainer(**{key: old_value})
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step_idx == 1


def test_checkpoint_without_a_setting_its_architecture_does_not_use_resumes(tmp_path):
    """TopK has no relative ranking (relative_fade None): its checkpoints from before the
    setting existed resume as they are."""
    cfg = TrainConfig(store="", out="", arch="topk", n_latents=64, k=4, tokens=64 * 4, batch_size=64)
    torch.manual_seed(0)
    old = Trainer(build_sae(cfg, 16), cfg, total_steps=4)
    old.step(torch.randn(64, 16))
    old.save_checkpoint(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["sae"].pop("relative_fade") is None
    meta_path.write_text(json.dumps(meta))
    resumed = Trainer(build_sae(cfg, 16), cfg, total_steps=4)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step_idx == 1
