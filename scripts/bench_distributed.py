#!/usr/bin/env python
"""Per-step time and communication volume of distributed TopK SAE training.

Runs ``llm_sae.train.Trainer.step`` on random batches of one global size in three modes:
one process, data parallel over R ranks, and latents sharded over R ranks (gloo on CPU,
processes started like torchrun's), then reports the median step time and the bytes each
rank puts into collectives per step, counted at the collectives llm_sae issues
(``llm_sae.distributed.COMM``: the payload each rank contributes; a ring all-reduce moves
about 2·(R−1)/R times that over the wire) next to the formula in docs/distributed.md.

    python scripts/bench_distributed.py                         # d=256, n=8192, k=32, B=2048
    python scripts/bench_distributed.py --json-out bench_distributed.json
    python scripts/bench_distributed.py --threads 2 --world 2   # ranks get threads/world each
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(args: argparse.Namespace, n_shards: int, world: int) -> dict:
    """Time ``args.steps`` Trainer steps after ``args.warmup``; this process's view."""
    from llm_sae.distributed.comm import COMM
    from llm_sae.distributed.parallel import Parallel, make_parallel
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import build_sae
    from llm_sae.train.trainer import Trainer

    par = make_parallel(n_shards) if world > 1 else Parallel()
    cfg = TrainConfig(
        store="", out="", arch="topk", n_latents=args.n_latents, k=args.k,
        batch_size=args.batch, tokens=args.batch * (args.steps + args.warmup),
        dead_tokens=10**12, shard_latents=n_shards, device="cpu",
    )  # fmt: skip
    torch.manual_seed(0)
    sae = par.shard(build_sae(cfg, args.d_in))
    trainer = Trainer(sae, cfg, total_steps=args.steps + args.warmup, input_scale=1.0, parallel=par)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, args.d_in, generator=g) for _ in range(4)]
    times = []
    for i in range(args.warmup + args.steps):
        (x_BD,) = list(par.data([batches[i % len(batches)]]))
        if i == args.warmup:
            COMM.reset()
        t0 = time.perf_counter()
        trainer.step(x_BD)
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    return {
        "step_ms": 1000 * statistics.median(timed),
        "bytes_per_step": COMM.bytes / args.steps,
        "collectives_per_step": COMM.calls / args.steps,
    }


def _rank_main(
    rank: int, world: int, port: int, args: argparse.Namespace, n_shards: int, out: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(max(1, args.threads // world)),
    )  # fmt: skip
    torch.set_num_threads(max(1, args.threads // world))
    import torch.distributed as dist

    try:
        res = _steps(args, n_shards, world)
        # The step ends when the slowest rank's does: report the max of the medians.
        t = torch.tensor([res["step_ms"]])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        res["step_ms"] = float(t)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def formula(args: argparse.Namespace, mode: str, R: int) -> float:
    """Payload bytes per rank per step from docs/distributed.md (float32, int64 counts)."""
    D, N, K, B = args.d_in, args.n_latents, args.k, args.batch
    if mode == "1 rank":
        return 0.0
    flag = 8  # the all-ranks NaN check (one int64)
    if mode == "data parallel":
        return flag + 4 * (2 * N * D + N + D) + 4 * N  # gradients, fired counts
    # latent-sharded: candidates, partial x_hat, encoder-input grad, dead count, grad norm
    return flag + 4 * B * K + 4 * B * D + 4 * B * D + 8 + 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--n-latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048, help="global batch (rows per optimiser step)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--world", type=int, default=2, help="ranks for the distributed modes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)

    rows = []
    torch.set_num_threads(args.threads)
    one = _steps(args, 1, 1)
    rows.append({"mode": "1 rank", "ranks": 1, "threads_per_rank": args.threads, **one})
    for mode, n_shards in (("data parallel", 1), ("latent-sharded", args.world)):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "res.json")
            mp.spawn(
                _rank_main,
                args=(args.world, _free_port(), args, n_shards, out),
                nprocs=args.world,
                join=True,
            )
            res = json.loads(Path(out).read_text())
        rows.append(
            {
                "mode": mode,
                "ranks": args.world,
                "threads_per_rank": max(1, args.threads // args.world),
                **res,
            }
        )
    for r in rows:
        r["tokens_per_s"] = args.batch / (r["step_ms"] / 1000)
        r["formula_bytes"] = formula(args, r["mode"], r["ranks"])

    shape = f"d={args.d_in}, n={args.n_latents}, k={args.k}, global batch {args.batch}"
    print(f"TopK SAE training step, {shape}; {args.steps} timed steps after {args.warmup} warm-up")
    print(
        f"{'mode':<16} {'ranks×thr':>9} {'ms/step':>9} {'tok/s':>9} {'MB/step/rank':>13} {'formula MB':>11} {'colls':>6}"
    )
    for r in rows:
        print(
            f"{r['mode']:<16} {str(r['ranks']) + '×' + str(r['threads_per_rank']):>9} {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s']:>9.0f} {r['bytes_per_step'] / 1e6:>13.3f} {r['formula_bytes'] / 1e6:>11.3f} "
            f"{r['collectives_per_step']:>6.0f}"
        )
    if args.json_out:
        meta = {
            "shape": vars(args) | {"json_out": None},
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        }
        args.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
