#!/usr/bin/env python
"""Training steps of several architectures and dead-latent states, interleaved in one process.

Issue 24's targets are ratios within llm_sae: BatchTopK's and Matryoshka's step against
TopK's at the same mean L0 (k), and a step with AuxK acting on 1% or 10% dead latents
against the clean step. Measured in separate processes (``bench_train.py``) on a shared
machine, such ratios move with whatever else runs; here one process builds a
``Trainer`` per (arch, state) and steps them in turn, round after round, timing each
step as this process's CPU time with one thread, so every ratio compares steps taken
moments apart under the same load.

    python scripts/bench_arch_steps.py                                   # B=2048, 5 rounds
    python scripts/bench_arch_steps.py --archs topk,batchtopk --states 0,0.1 --json-out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--archs", default="topk,batchtopk,matryoshka", help="comma-separated; the first is the baseline")
    p.add_argument("--states", default="0,0.01,0.1", help="comma-separated shares of latents kept dead")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)

    import torch

    from llm_sae.common.process import return_large_blocks_to_os
    from llm_sae.sae.registry import REGISTRY
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.trainer import Trainer

    torch.set_num_threads(1)  # CPU time of one thread: no spinning workers to count
    return_large_blocks_to_os()  # as `llm-sae train` does on a CPU
    D, N, B = a.d_in, a.n_latents, a.batch
    archs = a.archs.split(",")
    states = [float(s) for s in a.states.split(",")]
    x_BD = torch.randn(B, D, generator=torch.Generator().manual_seed(a.seed))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(a.seed))
    trainers = {}
    for arch in archs:
        for st in states:
            torch.manual_seed(a.seed)  # the same initial weights for every state
            cfg = TrainConfig(store="-", out="-", arch=arch, d_in=D, n_latents=N, k=a.k, batch_size=B)
            tr = Trainer(REGISTRY[arch](cfg.resolved()), cfg, total_steps=10**6)
            # As `llm-sae train` starts a run (b_dec, BatchTopK's encoder scale, JumpReLU's
            # thresholds at the target L0), so every architecture steps at its mean L0 of k.
            tr.init_from_sample(x_BD)
            if st > 0:  # these latents stay dead, so AuxK acts at every step
                dead_N = torch.zeros(N, dtype=torch.bool)
                dead_N[order[: max(1, round(st * N))]] = True
                tr.dead.mask = lambda m=dead_N: m
            tr.step(x_BD)  # warm-up
            trainers[arch, st] = tr
    times: dict[tuple[str, float], list[float]] = {key: [] for key in trainers}
    l0: dict[tuple[str, float], float] = {}
    for _ in range(a.rounds):
        for key, tr in trainers.items():
            t0 = time.process_time()
            out = tr.step(x_BD)
            times[key].append(time.process_time() - t0)
            if out is not None:  # the mean L0 the step ran at (equal L0 is the comparison)
                l0[key] = float(out.metrics["l0"])
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}

    print(f"training step, d={D} n={N} k={a.k} B={B}, 1 thread, CPU time, median of {a.rounds} "
          f"interleaved rounds (load {os.getloadavg()[0]:.1f})\n")  # fmt: skip
    head = f"{'arch':11s} {'dead':>5s} {'L0':>6s} {'step ms':>8s} {'/ ' + archs[0]:>9s} {'/ clean':>8s}  all ms"
    print(head)
    print("-" * len(head))
    rows = []
    for (arch, st), s in med.items():
        row = {"arch": arch, "dead": st, "l0": l0.get((arch, st)), "step_s": s, "all_s": times[arch, st],
               "over_base": s / med[archs[0], st], "over_clean": s / med[arch, states[0]]}  # fmt: skip
        rows.append(row)
        print(f"{arch:11s} {st:5.2f} {l0.get((arch, st), float('nan')):6.1f} {s * 1e3:8.0f} {row['over_base']:8.2f}x {row['over_clean']:7.2f}x  "
              + " ".join(f"{t * 1e3:.0f}" for t in times[arch, st]))  # fmt: skip
    if a.json_out:
        out = {"shape": {"d_in": D, "n_latents": N, "k": a.k, "batch": B}, "rounds": a.rounds,
               "baseline": archs[0], "loadavg": os.getloadavg(), "rows": rows}  # fmt: skip
        a.json_out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
