"""torchrun support: data-parallel and latent-sharded training, resume across world sizes,
rank failures, and analysis split over ranks; gloo processes on CPU.

Starting processes costs far more than the tiny jobs they run, so one 2-rank session
(the ``two_ranks`` fixture) runs every 2-rank job once and the tests check its results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from llm_sae.config import ConfigError
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY
from llm_sae.train.checkpoint import find_checkpoint, read_checkpoint_meta
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train

D, N, K, B = 16, 64, 4, 64
STEPS = 8
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rank: int, world: int, port: int, jobs: list) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        for fn, *args in jobs:
            fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(jobs: list, world: int = 2) -> None:
    """Run each ``(fn, *args)`` of ``jobs`` in turn on ``world`` gloo ranks, set up as
    torchrun would; an exception on any rank fails the call with that rank's traceback."""
    mp.spawn(_launch, args=(world, _free_port(), jobs), nprocs=world, join=True)


def make_store(path: Path, rows: int = 2048, seed: int = 0) -> Path:
    from llm_sae.store.writer import StoreWriter

    g = torch.Generator().manual_seed(seed)
    atoms_MD = torch.randn(48, D, generator=g)
    with StoreWriter(path, meta={"d_in": D, "dtype": "float32", "hook": "synthetic"}) as w:
        for _ in range(rows // 512):
            codes = torch.rand(512, 48, generator=g) * (torch.rand(512, 48, generator=g) < 0.1)
            w.append(3.0 * (codes @ atoms_MD + 0.05 * torch.randn(512, D, generator=g)))
    return path


def cfg_for(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        store=str(store), out=str(out), arch="topk", n_latents=N, k=K, tokens=STEPS * B,
        batch_size=B, checkpoint_every=4 * B, log_every=2, device="cpu", seed=3,
        dead_tokens=2 * B, init_rows=1024,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "sae.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 2e-4) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-3, msg=f"{k} differs")


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


# ------------------------------------------------------------------ jobs run on each rank


def _train_job(cfg: TrainConfig) -> None:
    train(cfg)


def _sharded_same_weights_job(out: str) -> None:
    """Latent-sharded forward, loss, metrics and every gradient equal the unsharded SAE's."""
    from llm_sae.distributed.comm import gather_rows_to_cpu
    from llm_sae.distributed.parallel import Distributed
    from llm_sae.distributed.sharded_topk import ShardedTopKSAE

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
    # Checkpoints gather shards a slab of rows at a time (here 2 rows of 3 int64).
    t = torch.arange(15).view(5, 3) + 100 * par.rank
    both = gather_rows_to_cpu(t, par.shard_group, chunk_bytes=48)
    assert torch.equal(
        both, torch.cat([torch.arange(15).view(5, 3), torch.arange(15).view(5, 3) + 100])
    )
    (Path(out) / f"sharded-ok-rank{par.rank}").touch()


def _statistics_job(out: str) -> None:
    """Running statistics and weights agree across ranks that see different rows."""
    from llm_sae.distributed.comm import all_gather_cat
    from llm_sae.distributed.parallel import Distributed
    from llm_sae.train.run import build_sae
    from llm_sae.train.trainer import Trainer

    par = Distributed()
    for arch in ("batchtopk", "kl_sigmoid"):
        torch.manual_seed(0)
        cfg = TrainConfig(store="", out="", arch=arch, n_latents=N, k=K, batch_size=B, tokens=3 * B)
        trainer = Trainer(build_sae(cfg, D), cfg, total_steps=3, input_scale=1.0, parallel=par)
        g = torch.Generator().manual_seed(100 + par.rank)  # each rank its own data
        for _ in range(3):
            trainer.step(torch.randn(B // 2, D, generator=g) * (1 + par.rank))
        for name, buf in trainer.sae.named_buffers():
            both = all_gather_cat(buf.reshape(1, -1), dist.group.WORLD)
            torch.testing.assert_close(both[0], both[1], msg=f"{arch}.{name} differs across ranks")
        params = torch.cat([p.detach().reshape(-1) for p in trainer.sae.parameters()])[None]
        both = all_gather_cat(params, dist.group.WORLD)
        torch.testing.assert_close(both[0], both[1], msg=f"{arch} weights differ across ranks")
        assert trainer.tokens == 3 * B  # global tokens: both ranks' rows
        # A NaN in one rank's rows: every rank skips the step, so the weights stay equal.
        x_BD = torch.randn(B // 2, D, generator=g)
        x_BD[3, 1] = float("nan") if par.rank == 1 else 0.0
        assert trainer.step(x_BD) is None and trainer.skipped_batches == 1
        assert trainer.step_idx == 3
    (Path(out) / f"stats-ok-rank{par.rank}").touch()


def _analyze_job(cfg) -> None:
    from llm_sae.analyze.run import analyze

    summary = analyze(cfg)
    assert (summary != {}) == (dist.get_rank() == 0)  # rank 0 alone writes


def _config_errors_job(store: str, out: str) -> None:
    """Settings that cannot work on 2 ranks fail on every rank with the fix named."""
    from llm_sae.distributed.parallel import Distributed
    from llm_sae.train.run import train_with

    # train_with, not train: train() would tear the process group down on the error.
    with pytest.raises(ConfigError, match="does not split over 2 data-parallel ranks"):
        train_with(cfg_for(Path(store), Path(out) / "bad", batch_size=B - 1), Distributed())
    with pytest.raises(ConfigError, match="resample does not work with --shard-latents"):
        bad = cfg_for(Path(store), Path(out) / "bad", shard_latents=2, dead_latents="resample")
        train_with(bad, Distributed(n_shards=2))
    with pytest.raises(ConfigError, match="must divide the world size 2"):
        Distributed(n_shards=3)
    (Path(out) / f"errors-ok-rank{dist.get_rank()}").touch()


# ---------------------------------------------------------------- the shared 2-rank session

KINDS = {
    "topk": dict(arch="topk", dead_latents="auxk"),  # dead statistics must agree
    "l1": dict(arch="relu_l1", dead_latents="resample", dead_tokens=3 * B, l1_coef=1.0),
}
ANALYZE = dict(tokens=431, exclude_positions=[2], logits=False)  # 431: ranks meet mid-sequence


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Iterator[Path]:
    """One-rank references, then every 2-rank job in one session; yields the root."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the tests' one_thread
    try:
        with pytest.MonkeyPatch.context() as mp:
            # AuxK's products in float32 (the spawned ranks inherit it): these runs split
            # the batch or the latents differently and must agree to float32 tolerances,
            # and the latent-sharded AuxK decodes in float32.
            mp.setenv("LLM_SAE_AUXK_BF16", "0")
            yield _two_rank_session(tmp_path_factory.mktemp("dist"))
    finally:
        torch.set_num_threads(threads)


def _two_rank_session(root: Path) -> Path:
    from test_analyze import cfg_for as analyze_cfg
    from test_analyze import make_data, make_sae, write_store

    from llm_sae.analyze.run import analyze

    store = make_store(root / "store")
    for name, kw in KINDS.items():
        train(cfg_for(store, root / f"one-{name}", **kw))
    # Stopped after the step-4 checkpoint on one rank, resumed below on two, sharded.
    _train_until(cfg_for(store, root / "resumed"), stop_at=6)
    assert read_checkpoint_meta(find_checkpoint(root / "resumed"))["step"] == 4

    toks, x, t, pos = make_data()
    write_store(root / "an" / "store", x, t, pos, toks)
    make_sae(root / "an" / "sae")
    analyze(analyze_cfg(root / "an", root / "an" / "one", **ANALYZE))

    jobs: list = [(_train_job, cfg_for(store, root / f"dp-{n}", **kw)) for n, kw in KINDS.items()]
    jobs += [
        (_train_job, cfg_for(store, root / "sharded", shard_latents=2)),
        (_train_job, cfg_for(store, root / "resumed", shard_latents=2)),
        (_sharded_same_weights_job, str(root)),
        (_statistics_job, str(root)),
        (_analyze_job, analyze_cfg(root / "an", root / "an" / "two", **ANALYZE)),
        (_config_errors_job, str(store), str(root)),
    ]
    spawn(jobs)
    return root


# ------------------------------------------------------------------------------- tests


def test_data_parallel_equals_one_rank_with_the_same_global_batch(two_ranks):
    for name in KINDS:
        assert_same_weights(two_ranks / f"one-{name}", two_ranks / f"dp-{name}")
        # rank 0 alone logged, with global token counts
        logs = (two_ranks / f"dp-{name}" / "log.jsonl").read_text().splitlines()
        assert len(logs) == STEPS // 2 and f'"tokens": {STEPS * B}' in logs[-1]
    # The comparison can fail: another global batch gives other weights.
    train(
        cfg_for(two_ranks / "store", two_ranks / "other", batch_size=B // 2, tokens=STEPS * B // 2)
    )
    with pytest.raises(AssertionError):
        assert_same_weights(two_ranks / "one-topk", two_ranks / "other")


def logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_sharded_forward_loss_and_grads_equal_unsharded(two_ranks):
    assert (two_ranks / "sharded-ok-rank0").exists() and (two_ranks / "sharded-ok-rank1").exists()


def test_sharded_training_matches_unsharded(two_ranks):
    assert_same_weights(two_ranks / "one-topk", two_ranks / "sharded")
    # Logged metrics are the whole SAE's, not one shard's.
    for a, b in zip(logs(two_ranks / "one-topk"), logs(two_ranks / "sharded"), strict=True):
        assert a["dead_frac"] == b["dead_frac"] and a["l0"] == b["l0"]
        assert a["dense_frac"] == b["dense_frac"]
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-3)
    assert 0 < logs(two_ranks / "sharded")[-1]["dense_frac"] < 0.5  # not one shard's share
    # The checkpoint is the unsharded state: the same layout as a one-rank run's.
    from safetensors.torch import load_file

    a = load_file(two_ranks / "one-topk" / "checkpoint" / "state.safetensors")
    b = load_file(two_ranks / "sharded" / "checkpoint" / "state.safetensors")
    assert a["sae.W_enc"].shape == b["sae.W_enc"].shape == (N, D)
    assert b["opt.0.exp_avg"].shape == (N, D)
    assert b["tokens_since_fired_N"].shape == (N,)


def test_running_statistics_and_weights_agree_across_ranks(two_ranks):
    # BatchTopK's threshold and kl_sigmoid's ρ̂ are running averages of per-batch values:
    # each rank sees its own rows, so without the all-reduce they would drift apart.
    assert (two_ranks / "stats-ok-rank0").exists() and (two_ranks / "stats-ok-rank1").exists()


def test_resume_with_a_different_world_size_continues_the_same_run(two_ranks):
    # 1 rank for 4 steps, then 2 ranks with the latents sharded: the same run as 1 rank.
    assert_same_weights(two_ranks / "one-topk", two_ranks / "resumed")


def test_analysis_on_two_ranks_equals_one_rank(two_ranks):
    one_dir, two_dir = two_ranks / "an" / "one", two_ranks / "an" / "two"
    for name in ["features.jsonl", "features/shard_00000.jsonl"]:
        assert (two_dir / name).read_bytes() == (one_dir / name).read_bytes(), name
    one = json.loads((one_dir / "summary.json").read_text())
    two = json.loads((two_dir / "summary.json").read_text())
    one["options"].pop("out"), two["options"].pop("out")
    timing = {"elapsed_s", "pass_s", "pass_cpu_s", "rows_read"}
    assert {k: v for k, v in two.items() if k not in timing} == {
        k: v for k, v in one.items() if k not in timing
    }
    assert one["rows_excluded"] > 0


def test_settings_that_cannot_work_distributed_are_refused(two_ranks):
    assert (two_ranks / "errors-ok-rank0").exists() and (two_ranks / "errors-ok-rank1").exists()
    with pytest.raises(ConfigError, match="needs 2 or a multiple of it ranks"):
        train(cfg_for(two_ranks / "store", two_ranks / "bad", shard_latents=2))  # no torchrun


@pytest.mark.slow
def test_data_parallel_times_sharded_on_a_2d_mesh(two_ranks, tmp_path):
    mesh = cfg_for(two_ranks / "store", tmp_path / "mesh", shard_latents=2)
    spawn([(_train_job, mesh)], world=4)  # 2 data-parallel × 2 latent shards
    assert_same_weights(two_ranks / "one-topk", Path(mesh.out))


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
    from llm_sae.train.cli import add_cli, run_cli

    add_cli(parser)
    sys.exit(run_cli(parser.parse_args(sys.argv[1:])))
    """
)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_and_keeps_the_checkpoint(two_ranks, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    out = tmp_path / "job"
    cfg = cfg_for(two_ranks / "store", out)
    args = [
        "--store", cfg.store, "--out", str(out), "--n-latents", str(N), "--k", str(K),
        "--tokens", str(cfg.tokens), "--batch-size", str(B), "--checkpoint-every", str(4 * B),
        "--log-every", "2", "--device", "cpu", "--seed", "3", "--dead-tokens", str(2 * B),
        "--init-rows", "1024",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", LLM_SAE_DIST_TIMEOUT="60")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    p = subprocess.run(
        [*launch, "--master-port", str(_free_port()), str(script), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode != 0
    assert (
        "rank 1 of 2 failed during training: RuntimeError: injected failure on rank 1" in p.stderr
    )
    assert "rank 0 of 2 stopped during training because another rank failed" in p.stderr
    ckpt = find_checkpoint(out)
    assert ckpt is not None and read_checkpoint_meta(ckpt)["step"] == 4
    assert not (out / "sae.safetensors").exists()
    # The checkpoint is intact: one rank resumes it to the same SAE as an unbroken run.
    train(cfg)
    assert_same_weights(two_ranks / "one-topk", out)
