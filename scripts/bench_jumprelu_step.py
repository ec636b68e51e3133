"""JumpReLU training step, sparse path against the dense one (issue 17).

One Trainer step (forward, backward, Adam) on random activations scaled to E‖x‖ = √d with
thresholds set so that about ``--l0`` latents fire per row; the two paths alternate, and
the median of ``--steps`` steps each is reported. Usage:

    PYTHONPATH=. python scripts/bench_jumprelu_step.py --d 256 --n 8192 --batch 1024 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_sae.sae.archs import jumprelu
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import build_sae
from llm_sae.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--l0", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TrainConfig(store="", out="", arch="jumprelu", n_latents=a.n, k=int(a.l0), tokens=10**9,
                      batch_size=a.batch, target_l0=a.l0)
    sae = build_sae(cfg, a.d)
    trainer = Trainer(sae, cfg, total_steps=10**6, input_scale=1.0)
    x_BD = torch.randn(a.batch, a.d)
    with torch.no_grad():  # each latent fires on about l0 / n of the rows
        pre_BN = sae.pre_acts(x_BD)
        sae.threshold.copy_(pre_BN.quantile(1 - a.l0 / a.n, dim=0).clamp_min(0))
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    l0s: dict[str, float] = {}
    for i in range(2 * a.steps + 2):
        name = "dense" if i % 2 == 0 else "sparse"
        jumprelu.SPARSE_FRACTION = 10**9 if name == "dense" else 8
        t0 = time.perf_counter()
        out = trainer.step(x_BD)
        dt = time.perf_counter() - t0
        assert out is not None
        l0s[name] = float(out.metrics["l0"])
        if i >= 2:  # the first step of each warms up
            times[name].append(dt)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    print(f"d={a.d} n={a.n} batch={a.batch} threads={a.threads} L0 {l0s['sparse']:.1f}: "
          f"dense {d * 1e3:.0f} ms, sparse {s * 1e3:.0f} ms a step ({d / s:.2f}x)")


if __name__ == "__main__":
    main()
