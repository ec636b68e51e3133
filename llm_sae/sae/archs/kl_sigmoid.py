"""Sigmoid units with a KL target sparsity (Ng's sparse autoencoder notes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llm_sae.sae.base import SAE
from llm_sae.sae.ops import update_ema
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@dataclass(kw_only=True)
class KLSigmoidParams:
    rho: float | None = None
    """kl_sigmoid: target mean activation ρ (default k / n_latents)."""
    kl_coef: float = 1.0
    """kl_sigmoid: weight β of the KL(ρ‖ρ̂) sparsity penalty."""


@register
class KLSigmoidSAE(SAE):
    """Classic sparse autoencoder: sigmoid units with a KL(ρ‖ρ̂) target-sparsity penalty.

    ρ̂ is a running average of each unit's mean activation (a buffer, saved with
    checkpoints). The penalty's value is taken at the running estimate, its gradient
    flows through the current batch mean undamped by the momentum.
    """

    arch = "kl_sigmoid"
    unit_norm_decoder = False  # sigmoid units saturate at 1: atoms must carry the magnitude
    default_dead_latents = "none"
    homogeneous = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("rho_hat", torch.full((self.n_latents,), self.rho))

    @property
    def rho(self) -> float:
        return self.cfg.rho if self.cfg.rho is not None else self.cfg.k / self.n_latents

    def activate(self, pre_BN: Tensor) -> Tensor:
        return torch.sigmoid(pre_BN)

    def fired(self, z_BN: Tensor) -> Tensor:
        return z_BN > 0.5

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mean_N = z_BN.mean(0)
        with torch.no_grad():
            update_ema(self.rho_hat, mean_N, self.cfg.stat_momentum)
        rho_hat_N = (self.rho_hat + (mean_N - mean_N.detach())).clamp(1e-6, 1 - 1e-6)
        rho = self.rho
        kl = (
            rho * torch.log(rho / rho_hat_N) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat_N))
        ).sum()
        return self.cfg.kl_coef * kl, {"kl": kl.detach(), "mean_act": mean_N.mean().detach()}
