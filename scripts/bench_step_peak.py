#!/usr/bin/env python
"""Peak memory of one steady-state training step, and the op where it happens.

``bench_train.py`` reports a process's peak RSS, which includes building the trainer and
its initialisation (BatchTopK's least-squares start was once the whole run's peak). This
measures a step alone: for each (architecture, dead share), a ``Trainer`` takes two steps,
then a third runs under a dispatch mode that reads the process's RSS after every aten op.
With the trainer's allocator setting (blocks of 4 MB and more are mmapped and given back
on free) RSS follows the step's live tensors. Reported against the floor (weights + Adam
state + one batch), from the RSS before the SAE was built, as ``bench_train.py`` does.
One process per row, so rows do not share a heap.

    python scripts/bench_step_peak.py --archs topk,matryoshka --states 0,0.01,0.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker(arch: str, dead: float, a: argparse.Namespace) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from llm_sae.bench.steps import keep_dead, started_trainer
    from llm_sae.common.process import return_large_blocks_to_os

    torch.set_num_threads(1)
    return_large_blocks_to_os()
    page, fd = os.sysconf("SC_PAGE_SIZE"), os.open("/proc/self/statm", os.O_RDONLY)

    def rss_mb() -> float:
        return int(os.pread(fd, 100, 0).split()[1]) * page / 2**20

    class Track(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.peak, self.op = 0.0, ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (r := rss_mb()) > self.peak:
                self.peak, self.op = r, str(func)
            return out

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # the compiler stack, as bench_train
    rss0 = rss_mb()
    D, N, B = a.d_in, a.n_latents, a.batch
    x_BD = torch.randn(B, D, generator=torch.Generator().manual_seed(a.seed))
    torch.manual_seed(a.seed)
    trainer = started_trainer(arch, x_BD, n_latents=N, k=a.k)
    keep_dead(trainer, dead, a.seed)
    for _ in range(2):
        trainer.step(x_BD)
    held = rss_mb()
    with Track() as t:
        trainer.step(x_BD)
    floor = (2 * N * D * 3 + B * D) * 4 / 2**20
    return {"arch": arch, "dead": dead, "floor_mb": floor, "held_mb": held - rss0, "peak_mb": t.peak - rss0,
            "peak_over_floor": (t.peak - rss0) / floor, "peak_op": t.op}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from llm_sae.bench.steps import add_step_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", nargs=2, metavar=("ARCH", "DEAD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], float(a.worker[1]), a)))
        return 0
    print(f"one training step's peak RSS, d={a.d_in} n={a.n_latents} k={a.k} B={a.batch}, 1 thread\n")
    head = f"{'arch':11s} {'dead':>5s} {'held MB':>8s} {'peak MB':>8s} {'/ floor':>8s}  op at the peak"
    print(head + "\n" + "-" * len(head))
    args = [f"--d-in={a.d_in}", f"--n-latents={a.n_latents}", f"--k={a.k}", f"--batch={a.batch}", f"--seed={a.seed}"]
    for arch in a.archs.split(","):
        for st in a.states.split(","):
            out = subprocess.run([sys.executable, __file__, *args, "--worker", arch, st], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{arch:11s} {float(st):5.2f}  failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{arch:11s} {r['dead']:5.2f} {r['held_mb']:8.0f} {r['peak_mb']:8.0f} {r['peak_over_floor']:7.3f}x  {r['peak_op']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
