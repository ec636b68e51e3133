"""ReLU with an L1 penalty weighted by decoder norms (Anthropic, April 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.sae.base import SAE
from llm_sae.sae.ops import tune_log_coef, warmup
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@dataclass(kw_only=True)
class ReLUL1Params:
    l1_coef: float = 5.0
    """relu_l1: coefficient λ of the L1 penalty Σ f_i·‖W_dec_i‖ (Anthropic, April 2024)."""
    sparsity_warmup: float = 0.05
    """relu_l1 and jumprelu: fraction of training over which the sparsity coefficient
    rises linearly from 0 (unless --target-l0 tunes it)."""
    target_l0: float | None = None
    """relu_l1, and jumprelu with the step or tanh loss: tune the sparsity coefficient
    during training (starting from l1_coef / l0_coef) until the batch L0 is this, so every
    architecture can be compared at one L0. jumprelu's quadratic loss aims at it directly,
    its aim tuned likewise (default there: k)."""


@register
class ReLUL1SAE(SAE):
    """ReLU + L1 in Anthropic's April 2024 form.

    The decoder is not constrained; the penalty λ·Σ_i f_i·‖W_dec_i‖ weights each
    activation by its atom's norm so shrinking atoms cannot dodge it. λ warms up
    linearly over the first ``sparsity_warmup`` of training, or, with ``target_l0``, is
    tuned every step by a multiplicative controller (``ops.tune_log_coef``) until the
    batch L0 matches the target; its log is a buffer, so it is saved and resumed.
    """

    arch = "relu_l1"
    unit_norm_decoder = False
    default_dead_latents = "resample"
    decoder_init_norm = 0.1

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if self.cfg.target_l0 is not None:
            self.register_buffer("log_l1_coef", torch.tensor(float(self.cfg.l1_coef)).log())

    def activate(self, pre_BN: Tensor) -> Tensor:
        return F.relu(pre_BN)

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = (z_BN * self.W_dec.norm(dim=1)).sum(-1).mean()
        if self.cfg.target_l0 is None:
            coef: Tensor | float = self.cfg.l1_coef * warmup(self.progress, self.cfg.sparsity_warmup)
            return coef * l1, {"l1": l1.detach()}
        l0 = (z_BN > 0).sum(-1).float().mean()
        with torch.no_grad():
            tune_log_coef(self.log_l1_coef, l0, self.cfg.target_l0)
        coef = self.log_l1_coef.exp()
        return coef * l1, {"l1": l1.detach(), "l1_coef": coef.detach(), "l0": l0.detach()}
