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
    from llm_sae.bench.steps import add_step_args, keep_dead, started_trainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, archs_help="comma-separated; the first is the baseline")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)

    import torch

    from llm_sae.common.process import return_large_blocks_to_os

    torch.set_num_threads(1)  # CPU time of one thread: no spinning workers to count
    return_large_blocks_to_os()  # as `llm-sae train` does on a CPU
    D, N, B = a.d_in, a.n_latents, a.batch
    archs = a.archs.split(",")
    states = [float(s) for s in a.states.split(",")]
    x_BD = torch.randn(B, D, generator=torch.Generator().manual_seed(a.seed))
    trainers = {}
    for arch in archs:
        for st in states:
            torch.manual_seed(a.seed)  # the same initial weights for every state
            tr = started_trainer(arch, x_BD, n_latents=N, k=a.k)
            keep_dead(tr, st, a.seed)
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
