"""JumpReLU's gate: its settings, its straight-through autograd functions, and where its
thresholds start and where a dead latent's comes back to (pure tensor functions, tested
on their own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(kw_only=True)
class JumpReLUParams:
    jumprelu_sparsity: str = "quadratic"
    """jumprelu: the sparsity loss. 'quadratic': l0_coef·(2/T)·(L0 − T)² on the batch L0,
    towards T = --target-l0 or k (Gemma Scope 2); 'step': l0_coef·L0 (Rajamanoharan et
    al. 2024); 'tanh': l0_coef·Σ tanh(tanh_scale·f·‖W_dec‖) (Anthropic, January 2025).
    A controller (``ops.control_l0``) lands the trained L0 on T: quadratic's aim is
    lowered until it does, and with --target-l0 step and tanh tune l0_coef (without it
    they keep l0_coef, warmed up over --sparsity-warmup, as in their papers)."""
    l0_coef: float = 1.0
    """jumprelu: coefficient of the sparsity loss (the starting value when tuned)."""
    bandwidth: float = 0.3
    """jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient."""
    init_threshold: float = 1.0
    """jumprelu: threshold of every latent at construction (inputs are scaled to E‖x‖ =
    √d_in); the trainer then starts θ on target from its initialisation sample."""
    tanh_scale: float = 4.0
    """jumprelu with the tanh loss: the scale c in tanh(c·f·‖W_dec‖)."""
    pre_act_coef: float = 3e-6
    """jumprelu: weight of Anthropic's pre-activation loss Σ_dead relu(θ − pre)·‖W_dec‖,
    which pulls dead latents up to their thresholds (0 turns it off)."""


def relative(t: Tensor, s_B1: Tensor | None) -> Tensor:
    """Pre-activations relative to their row's scale (``JumpReLUSAE.row_scale``), if any."""
    return t if s_B1 is None else t / s_B1


class JumpReLUFn(torch.autograd.Function):
    """pre·H(pre − θ); θ's gradient through a rectangle kernel of width ε (straight-through),
    pre's through the gate only (DeepMind's estimator)."""

    @staticmethod
    def forward(ctx: Any, pre_BN: Tensor, theta_N: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return pre_BN * (pre_BN > theta_N)

    @staticmethod
    def backward(ctx: Any, g_BN: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BN, theta_N = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g_BN * (pre_BN > theta_N)
        near_BN = ((pre_BN - theta_N).abs() < eps / 2).to(g_BN.dtype)
        g_theta_N = (g_BN * near_BN).sum(0, dtype=torch.float32) * (-theta_N / eps)
        return g_pre, g_theta_N, None


class StepFn(torch.autograd.Function):
    """H(pre − θ) with a straight-through θ gradient; none to pre (as in the paper)."""

    @staticmethod
    def forward(ctx: Any, pre_BN: Tensor, theta_N: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return (pre_BN > theta_N).to(pre_BN.dtype)

    @staticmethod
    def backward(ctx: Any, g_BN: Tensor) -> tuple[None, Tensor, None]:
        pre_BN, theta_N = ctx.saved_tensors
        eps = ctx.eps
        near_BN = ((pre_BN - theta_N).abs() < eps / 2).to(g_BN.dtype)
        return None, (g_BN * near_BN).sum(0, dtype=torch.float32) * (-1.0 / eps), None


def start_thresholds(pre_BN: Tensor, target: float) -> Tensor:
    """[N]: θ_i = c·rms_i, with one c for all latents such that the rows of ``pre_BN`` fire
    ``target`` latents on average (pre > θ). In units of each latent's own spread, so every
    latent starts on about the same share of rows and none starts dead where the data is
    anisotropic (a residual stream's few large directions)."""
    B, N = pre_BN.shape
    rms_N = (torch.linalg.vector_norm(pre_BN, dim=0, dtype=torch.float32) / max(1, B) ** 0.5).clamp_min(1e-6)
    n_fire = max(1, min(B * N - 1, round(target * B)))
    # c halfway between the n_fire-th and the next largest standardised value: the top
    # n_fire + 1 kept as rows stream through (a top-k of all B·N values at once holds
    # several copies of them; at B=1024, N=24576 it was a training run's peak memory).
    top = pre_BN.new_empty(0, dtype=torch.float32)
    step = max(1, 2**20 // max(1, N))
    for s in range(0, B, step):
        std = (pre_BN[s : s + step].float() / rms_N).flatten()
        top = torch.cat([top, std]).topk(min(n_fire + 1, top.numel() + std.numel()), sorted=False).values
    return top.topk(min(2, top.numel()), largest=False).values.mean().clamp_min(0) * rms_N


def revival_thresholds(pre_BM: Tensor, n: int) -> Tensor:
    """[M]: for each column, a threshold (≥ 0) halfway between its n-th and (n+1)-th largest
    values, so that the latent fires on n of these rows (all of them when n ≥ the rows)."""
    B = pre_BM.shape[0]
    n = max(1, n)
    if n >= B:
        return pre_BM.float().min(0).values.clamp_min(0) * (1 - 1e-3)
    top_KM = pre_BM.float().topk(n + 1, dim=0).values
    return top_KM[-2:].mean(0).clamp_min(0)
