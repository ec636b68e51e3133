"""Winner-take-all: each latent fires on its top rows of the batch (Makhzani & Frey 2015)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.sae.base import SAE
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@register
class WTASAE(SAE):
    """Winner-take-all with lifetime sparsity (Makhzani & Frey 2015).

    In training each latent keeps only its top ρ = k/N fraction of activations across the
    batch (so every latent fires, and tokens average k latents). Eval mode uses a
    per-latent threshold, the running average of the smallest kept activation.
    """

    arch = "wta"
    default_dead_latents = "none"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((self.n_latents,), -1.0))

    def _winners(self, B: int) -> int:
        return max(1, min(B, math.ceil(self.cfg.k / self.n_latents * B)))

    def activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        if self.training:
            kth_N = z_BN.topk(self._winners(z_BN.shape[0]), dim=0).values[-1]
            return z_BN * (z_BN >= kth_N.clamp_min(1e-12))
        return z_BN * (z_BN > self.threshold.clamp_min(0))

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        kth_N = z_BN.topk(self._winners(z_BN.shape[0]), dim=0).values[-1]
        with torch.no_grad():
            first = self.threshold < 0
            new_N = torch.where(first, kth_N, self.threshold * self.cfg.stat_momentum + kth_N * (1 - self.cfg.stat_momentum))
            self.threshold.copy_(new_N)
        return z_BN * (z_BN >= kth_N.clamp_min(1e-12))

    def _scale_latents(self, factor: float) -> None:
        self.threshold.copy_(torch.where(self.threshold > 0, self.threshold * factor, self.threshold))
