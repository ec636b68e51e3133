"""ReLU with an L1 penalty weighted by decoder norms (Anthropic, April 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from llm_sae.sae.base import SAE
from llm_sae.sae.ops import warmup
from llm_sae.sae.registry import register


@dataclass(kw_only=True)
class ReLUL1Params:
    l1_coef: float = 5.0
    """relu_l1: coefficient λ of the L1 penalty Σ f_i·‖W_dec_i‖ (Anthropic, April 2024)."""
    sparsity_warmup: float = 0.05
    """relu_l1 and jumprelu: fraction of training over which the sparsity coefficient
    rises linearly from 0."""


@register
class ReLUL1SAE(SAE):
    """ReLU + L1 in Anthropic's April 2024 form.

    The decoder is not constrained; the penalty λ·Σ_i f_i·‖W_dec_i‖ weights each
    activation by its atom's norm so shrinking atoms cannot dodge it. λ warms up
    linearly over the first ``sparsity_warmup`` of training.
    """

    arch = "relu_l1"
    unit_norm_decoder = False
    default_dead_latents = "resample"
    decoder_init_norm = 0.1

    def activate(self, pre_BN: Tensor) -> Tensor:
        return F.relu(pre_BN)

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        coef = self.cfg.l1_coef * warmup(self.progress, self.cfg.sparsity_warmup)
        l1 = (z_BN * self.W_dec.norm(dim=1)).sum(-1).mean()
        return coef * l1, {"l1": l1.detach()}
