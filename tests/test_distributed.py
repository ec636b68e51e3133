"""torchrun support: data-parallel and latent-sharded training, resume across world sizes,
rank failures, and analysis split over ranks; 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from llm_sae.sae import REGISTRY, SAEConfig
from llm_sae.train import TrainConfig, find_checkpoint, read_checkpoint_meta, train

D, N, K, B = 16, 64, 4, 64
STEPS = 8


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(*args)`` on ``world`` gloo ranks, as torchrun would set them up."""
    mp.spawn(_launch, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def make_store(path: Path, rows: int = 2048, seed: int = 0) -> Path:
    from llm_sae.store import StoreWriter

    g = torch.Generator().manual_seed(seed)
    atoms_MD = torch.randn(48, D, generator=g)
    with StoreWriter(path, meta={"d_in": D, "dtype": "float32", "hook": "synthetic"}) as w:
        for _ in range(rows // 512):
            codes = torch.rand(512, 48, generator=g) * (torch.rand(512, 48, generator=g) < 0.1)
            w.append(3.0 * (codes @ atoms_MD + 0.05 * torch.randn(512, D, generator=g)))
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("dist") / "store")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_for(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        store=str(store),
        out=str(out),
        arch="topk",
        n_latents=N,
        k=K,
        tokens=STEPS * B,
        batch_size=B,
        checkpoint_every=4 * B,
        log_every=2,
        device="cpu",
        seed=3,
        dead_tokens=2 * B,
        init_rows=1024,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "sae.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 2e-4) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-3, msg=f"{k} differs")


# ------------------------------------------------------------------------ data parallel


def _train_worker(cfgs: list[TrainConfig]) -> None:
    for cfg in cfgs:
        train(cfg)


@pytest.mark.slow
def test_data_parallel_equals_one_rank_with_the_same_global_batch(store_dir, tmp_path):
    # topk + AuxK (dead stats must agree) and relu_l1 + resampling (decisions must agree).
    kinds = {
        "topk": dict(arch="topk", dead_latents="auxk"),
        "l1": dict(arch="relu_l1", dead_latents="resample", dead_tokens=3 * B, l1_coef=1.0),
    }
    one = {n: cfg_for(store_dir, tmp_path / f"one-{n}", **kw) for n, kw in kinds.items()}
    two = {n: cfg_for(store_dir, tmp_path / f"two-{n}", **kw) for n, kw in kinds.items()}
    for cfg in one.values():
        train(cfg)
    spawn(_train_worker, list(two.values()))
    for n in kinds:
        assert_same_weights(Path(one[n].out), Path(two[n].out))
        # rank 0 alone logged, with global token counts
        logs = (Path(two[n].out) / "log.jsonl").read_text().splitlines()
        assert len(logs) == STEPS // 2 and '"tokens": 512' in logs[-1]
    # The test can fail: a different global batch gives different weights.
    train(cfg_for(store_dir, tmp_path / "other", batch_size=B // 2, tokens=STEPS * B // 2))
    with pytest.raises(AssertionError):
        assert_same_weights(Path(one["topk"].out), tmp_path / "other")


# ------------------------------------------------------------------ latent-sharded TopK


def _sharded_same_weights_worker(out: str) -> None:
    from llm_sae.distributed import Distributed, ShardedTopKSAE

    par = Distributed(n_shards=2)
    torch.manual_seed(0)
    full = REGISTRY["topk"](SAEConfig(d_in=D, n_latents=N, k=K, aux_k=6))
    with torch.no_grad():
        full.b_dec.normal_()
        full.b_enc.normal_(std=0.1)
    sae = par.shard(full)
    assert isinstance(sae, ShardedTopKSAE) and sae.W_enc.shape == (N // 2, D)
    x_BD = torch.randn(32, D)
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[::5] = True  # AuxK over dead latents of both shards
    lo, hi = par.shard_rank * N // 2, (par.shard_rank + 1) * N // 2

    ref = full(x_BD, dead_mask_N=dead_N)
    ref.loss.backward()
    got = sae(x_BD, dead_mask_N=dead_N[lo:hi])
    got.loss.backward()
    torch.testing.assert_close(got.x_hat_BD, ref.x_hat_BD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for k in ("l0", "aux", "fvu"):
        torch.testing.assert_close(got.metrics[k], ref.metrics[k], atol=1e-5, rtol=1e-5)
    assert float(ref.metrics["aux"]) > 0
    torch.testing.assert_close(got.fired_N, ref.fired_N[lo:hi])
    for name in ("W_enc", "W_dec", "b_enc"):
        g_ref = getattr(full, name).grad[lo:hi]
        torch.testing.assert_close(getattr(sae, name).grad, g_ref, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(sae.b_dec.grad, full.b_dec.grad, atol=1e-5, rtol=1e-4)
    torch.save({"ok": True}, Path(out) / f"rank{par.rank}.pt")


def test_sharded_forward_loss_and_grads_equal_unsharded(tmp_path):
    spawn(_sharded_same_weights_worker, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt"]


@pytest.mark.slow
def test_sharded_training_matches_unsharded(store_dir, tmp_path):
    one = cfg_for(store_dir, tmp_path / "one")
    two = cfg_for(store_dir, tmp_path / "two", shard_latents=2)
    train(one)
    spawn(_train_worker, [two])
    assert_same_weights(Path(one.out), Path(two.out))
    # The checkpoint is the unsharded state: the same layout as a one-rank run's.
    a = torch.load(Path(one.out) / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(Path(two.out) / "checkpoint" / "state.pt", weights_only=False)
    assert a["sae"]["W_enc"].shape == b["sae"]["W_enc"].shape == (N, D)
    assert b["opt"]["state"][0]["exp_avg"].shape == (N, D)
    assert b["tokens_since_fired_N"].shape == (N,)


# ---------------------------------------------------------------- resume, failures


class _Stop(Exception):
    pass


def _train_until(cfg: TrainConfig, stop_at: int) -> None:
    """Run ``train(cfg)`` as if killed when step ``stop_at`` begins."""
    from llm_sae import train as train_mod

    orig = train_mod.Trainer.step

    def step(self, *a, **k):
        if self.step_idx == stop_at:
            raise _Stop
        return orig(self, *a, **k)

    train_mod.Trainer.step = step
    try:
        with pytest.raises(_Stop):
            train(cfg)
    finally:
        train_mod.Trainer.step = orig


@pytest.mark.slow
def test_resume_with_a_different_world_size_continues_the_same_run(store_dir, tmp_path):
    ref = cfg_for(store_dir, tmp_path / "ref")
    train(ref)
    # 1 rank, stopped after the step-4 checkpoint; resumed on 2 ranks, latents sharded.
    run = cfg_for(store_dir, tmp_path / "run", shard_latents=2)
    _train_until(cfg_for(store_dir, tmp_path / "run"), stop_at=6)
    assert read_checkpoint_meta(find_checkpoint(run.out))["step"] == 4
    spawn(_train_worker, [run])
    assert_same_weights(Path(ref.out), Path(run.out))


FAILING = textwrap.dedent(
    """
    import argparse
    import sys

    import torch.distributed as dist
    from llm_sae import train as t

    orig = t.Trainer.step

    def step(self, *a, **k):
        if self.step_idx == 6 and dist.get_rank() == 1:
            raise RuntimeError("injected failure on rank 1")
        return orig(self, *a, **k)

    t.Trainer.step = step
    parser = argparse.ArgumentParser()
    t.add_cli(parser)
    sys.exit(t.run_cli(parser.parse_args(sys.argv[1:])))
    """
)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_and_keeps_the_checkpoint(store_dir, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    out = tmp_path / "job"
    cfg = cfg_for(store_dir, out)
    args = [
        "--store",
        cfg.store,
        "--out",
        str(out),
        "--n-latents",
        str(N),
        "--k",
        str(K),
        "--tokens",
        str(cfg.tokens),
        "--batch-size",
        str(B),
        "--checkpoint-every",
        str(4 * B),
        "--log-every",
        "2",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--dead-tokens",
        str(2 * B),
        "--init-rows",
        "1024",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", LLM_SAE_DIST_TIMEOUT="60")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            str(script),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert (
        "rank 1 of 2 failed during training: RuntimeError: injected failure on rank 1" in p.stderr
    )
    ckpt = find_checkpoint(out)
    assert ckpt is not None and read_checkpoint_meta(ckpt)["step"] == 4
    assert not (out / "sae.safetensors").exists()
    # The checkpoint is intact: one rank resumes it to the same SAE as an unbroken run.
    train(cfg)
    ref = cfg_for(store_dir, tmp_path / "ref")
    train(ref)
    assert_same_weights(Path(ref.out), out)


# ---------------------------------------------------------------------------- analysis


def _analyze_worker(cfg) -> None:
    from llm_sae.analyze import analyze

    summary = analyze(cfg)
    assert (summary != {}) == (dist.get_rank() == 0)  # rank 0 alone writes


def test_analysis_on_two_ranks_equals_one_rank(tmp_path):
    from test_analyze import cfg_for as analyze_cfg
    from test_analyze import make_data, make_sae, write_store

    from llm_sae.analyze import analyze

    toks, x, t, pos = make_data()
    write_store(tmp_path / "store", x, t, pos, toks)
    make_sae(tmp_path / "sae")
    # 431 rows: the ranks' ranges meet in the middle of a sequence.
    kw = dict(tokens=431, exclude_positions=[2], logits=False)
    one = analyze(analyze_cfg(tmp_path, tmp_path / "one", **kw))
    spawn(_analyze_worker, analyze_cfg(tmp_path, tmp_path / "two", **kw))
    files = ["features.jsonl", "features/shard_00000.jsonl"]
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), (
            name
        )
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    one["options"].pop("out"), two["options"].pop("out")
    timing = {"elapsed_s", "pass_s", "pass_cpu_s", "rows_read"}
    assert {k: v for k, v in two.items() if k not in timing} == {
        k: v for k, v in one.items() if k not in timing
    }
    assert one["rows_excluded"] > 0
