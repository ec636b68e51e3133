"""BatchTopK (Bussmann et al. 2024): the top k·B pre-activations of a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.sae.base import SAE
from llm_sae.sae.ops import update_ema
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@dataclass(kw_only=True)
class BatchTopKParams:
    stat_momentum: float = 0.99
    """Momentum of running statistics: kl_sigmoid's ρ̂ and wta's inference thresholds."""
    threshold_momentum: float = 0.9
    """batchtopk and matryoshka: momentum of the inference threshold, a running average
    of each batch's cut-off. One batch's cut-off is already precise (a quantile of B·N
    values), so a short window that follows the end of training beats a long one that
    still remembers its start."""


@register
class BatchTopKSAE(SAE):
    """BatchTopK (Bussmann et al. 2024): the B·k largest activations over the whole batch.

    Tokens get a variable number of latents (k on average). Inference cannot depend on
    the batch, so it is a JumpReLU with one global threshold: a running average of each
    training batch's cut-off (its smallest kept activation), exported to SAELens as
    ``jumprelu``.
    """

    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    def activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        if self.training:
            flat = z_BN.flatten()
            vals, idx = flat.topk(min(flat.numel(), self.cfg.k * z_BN.shape[0]), sorted=False)
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(z_BN)
        return z_BN * (z_BN > self.threshold.clamp_min(0))

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = self.activate(pre_BN)
        with torch.no_grad():
            kept = z_BN[z_BN > 0]
            if kept.numel():
                update_ema(self.threshold, kept.min(), self.cfg.threshold_momentum)
        return z_BN

    def _scale_latents(self, factor: float) -> None:
        if self.threshold > 0:
            self.threshold *= factor
