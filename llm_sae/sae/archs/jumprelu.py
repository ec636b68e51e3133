"""JumpReLU (Rajamanoharan et al. 2024): a learned threshold per latent."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llm_sae.config import ConfigError
from llm_sae.sae.base import SAE
from llm_sae.sae.ops import warmup
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@dataclass(kw_only=True)
class JumpReLUParams:
    jumprelu_sparsity: str = "target"
    """jumprelu: 'target' penalises l0_coef·d_in·(L0/k − 1)²; 'l0' penalises l0_coef·L0."""
    l0_coef: float = 1.0
    """jumprelu: coefficient of the L0 penalty (see jumprelu_sparsity)."""
    bandwidth: float = 0.1
    """jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient."""
    init_threshold: float = 1.0
    """jumprelu: initial threshold of every latent."""


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ); the θ gradient uses a rectangle kernel of width ε (straight-through)."""

    @staticmethod
    def forward(ctx: Any, pre_BN: Tensor, log_theta_N: Tensor, eps: float) -> Tensor:
        theta_N = log_theta_N.exp()
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return pre_BN * (pre_BN > theta_N)

    @staticmethod
    def backward(ctx: Any, g_BN: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BN, theta_N = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g_BN * (pre_BN > theta_N)
        near_BN = ((pre_BN - theta_N).abs() < eps / 2).to(g_BN.dtype)
        # d/dθ via the kernel, times θ for the log parameterisation.
        g_theta_N = (g_BN * near_BN * (-theta_N / eps)).sum(0)
        return g_pre, g_theta_N * theta_N, None


class _Step(torch.autograd.Function):
    """H(z − θ) with a straight-through θ gradient; no gradient to z (as in the paper)."""

    @staticmethod
    def forward(ctx: Any, pre_BN: Tensor, log_theta_N: Tensor, eps: float) -> Tensor:
        theta_N = log_theta_N.exp()
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return (pre_BN > theta_N).to(pre_BN.dtype)

    @staticmethod
    def backward(ctx: Any, g_BN: Tensor) -> tuple[None, Tensor, None]:
        pre_BN, theta_N = ctx.saved_tensors
        eps = ctx.eps
        near_BN = ((pre_BN - theta_N).abs() < eps / 2).to(g_BN.dtype)
        g_theta_N = (g_BN * near_BN * (-1.0 / eps)).sum(0)
        return None, g_theta_N * theta_N, None


@register
class JumpReLUSAE(SAE):
    """JumpReLU (Rajamanoharan et al. 2024): z·H(z − θ) with a learned per-latent θ.

    θ = exp(log_threshold); its gradient comes from a straight-through estimator with a
    rectangle kernel of width ``bandwidth``. Sparsity is an L0 penalty, or by default an
    L0 target: l0_coef·d_in·(L0/k − 1)² (d_in makes it comparable with the summed error).
    """

    arch = "jumprelu"
    default_dead_latents = "none"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.jumprelu_sparsity not in ("target", "l0"):
            raise ConfigError(f"jumprelu_sparsity must be 'target' or 'l0', got {cfg.jumprelu_sparsity!r}")

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((self.n_latents,), math.log(self.cfg.init_threshold)))

    def activate(self, pre_BN: Tensor) -> Tensor:
        return pre_BN * (pre_BN > self.log_threshold.exp())

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_BN, self.log_threshold, self.cfg.bandwidth)

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        l0 = _Step.apply(pre_BN, self.log_threshold, self.cfg.bandwidth).sum(-1).mean()
        coef = self.cfg.l0_coef * warmup(self.progress, self.cfg.sparsity_warmup)
        if self.cfg.jumprelu_sparsity == "target":
            penalty = coef * self.d_in * (l0 / self.cfg.k - 1.0).pow(2)
        else:
            penalty = coef * l0
        return penalty, {"l0": l0.detach()}

    def _scale_latents(self, factor: float) -> None:
        self.log_threshold += math.log(factor)
