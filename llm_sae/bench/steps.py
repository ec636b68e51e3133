"""What the training-step benchmarks share (``scripts/bench_train.py``,
``bench_arch_steps.py``, ``bench_step_peak.py``): their shape flags, and a ``Trainer``
started as ``llm-sae train`` starts a run, with a share of its latents kept dead."""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from llm_sae.sae.registry import REGISTRY
from llm_sae.train.config import TrainConfig
from llm_sae.train.trainer import Trainer


def add_step_args(p: argparse.ArgumentParser, archs_help: str | None = None) -> None:
    """--d-in, --n-latents, --k, --batch, --archs and --states, at the issue-24 shape."""
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--archs", default="topk,batchtopk,matryoshka", help=archs_help)
    p.add_argument("--states", default="0,0.01,0.1", help="comma-separated shares of latents kept dead")


def started_trainer(arch: str, x_BD: Tensor, *, n_latents: int, k: int) -> Trainer:
    """A Trainer of ``arch`` on batches like ``x_BD``, started from it as ``llm-sae train``
    starts a run (b_dec, BatchTopK's encoder scale, JumpReLU's thresholds at the target
    L0), so every architecture steps at its mean L0 of k. The caller seeds torch."""
    B, D = x_BD.shape
    cfg = TrainConfig(store="-", out="-", arch=arch, d_in=D, n_latents=n_latents, k=k, batch_size=B)
    trainer = Trainer(REGISTRY[arch](cfg.resolved()), cfg, total_steps=10**6)
    trainer.init_from_sample(x_BD)
    return trainer


def keep_dead(trainer: Trainer, share: float, seed: int) -> None:
    """Mark the same ``share`` of the latents (at least one) dead at every step, chosen by
    ``seed`` (the same latents for every implementation and architecture), so AuxK and the
    other dead-latent terms act at every step; nothing for a share of 0."""
    if share <= 0:
        return
    N = trainer.sae.n_latents
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[: max(1, round(share * N))]] = True
    trainer.dead.mask = lambda: dead_N
