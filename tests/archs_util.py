"""Shared by tests/test_train.py and the tests/test_archs_*.py files: a small SAE trained
on planted features."""

from __future__ import annotations

import torch

from llm_sae.sources.synthetic import SyntheticActivations, SyntheticConfig
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import build_sae
from llm_sae.train.trainer import Trainer

D, N, K, B = 16, 64, 4, 256
DATA = SyntheticConfig(d_in=D, n_features=32, mean_active=3, seed=0)


def fit(arch: str, steps: int = 300, held_out: int = 4096, **kw) -> tuple:
    """Train on synthetic data; return (sae, trainer, held-out x scaled, its eval codes)."""
    torch.manual_seed(0)
    data = SyntheticActivations(DATA)
    cfg = TrainConfig(store="", out="", arch=arch, n_latents=N, k=K, tokens=steps * B,
                      batch_size=B, dead_tokens=20 * B, **kw)
    sae = build_sae(cfg, D)
    trainer = Trainer(sae, cfg, total_steps=steps)
    trainer.init_from_sample(data.batch(10**6, 4096))
    for x_BD in data.batches(B, steps):
        trainer.step(x_BD)
    sae.eval()
    x_BD = data.batch(10**6 + 1, held_out) * trainer.input_scale
    with torch.no_grad():
        z_BN = sae.encode(x_BD)
    return sae, trainer, x_BD, z_BN


def l0(z_BN: torch.Tensor) -> float:
    return float((z_BN != 0).sum(-1).float().mean())
