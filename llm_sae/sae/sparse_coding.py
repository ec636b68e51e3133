"""L1 sparse coding with a fixed dictionary (FISTA): the optimum an SAE's encoder amortizes.

An SAE's encoder is one cheap guess at the sparse code of x; solving the sparse-coding
problem for the same dictionary shows how much reconstruction that guess leaves on the
table at the same L0 (the "amortization gap"). The problem, per row of ``x_BD``::

    min_z  ½‖x − b − z·D‖² + λ‖z‖₁      (optionally z ≥ 0)

with dictionary rows ``D_ND`` (one atom per latent, as ``W_dec``). FISTA (Beck &
Teboulle 2009) is ISTA — a gradient step then soft-thresholding — with Nesterov
momentum; the step is 1/L with L the largest eigenvalue of D·Dᵀ (estimated by power
iteration on the smaller D×D Gram matrix Dᵀ·D, which has the same top eigenvalue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def lipschitz_constant(D_ND: Tensor, iters: int = 100, tol: float = 1e-7) -> float:
    """Largest eigenvalue of D·Dᵀ (the gradient's Lipschitz constant), by power iteration."""
    G_DD = D_ND.T.double() @ D_ND.double()
    gen = torch.Generator(device="cpu").manual_seed(0)
    v_D = torch.randn(G_DD.shape[0], generator=gen, dtype=torch.float64).to(G_DD.device)
    v_D /= v_D.norm()
    lam = 0.0
    for _ in range(iters):
        w_D = G_DD @ v_D
        new = float(v_D @ w_D)
        norm = w_D.norm()
        if norm == 0:
            return 0.0
        v_D = w_D / norm
        if abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam = new
            break
        lam = new
    # Rayleigh quotient approaches from below; a slightly larger L only shortens the step.
    return lam * (1 + 1e-6)


def soft_threshold(v: Tensor, thresh: float, nonnegative: bool = False) -> Tensor:
    """The proximal operator of thresh·‖·‖₁ (restricted to z ≥ 0 when ``nonnegative``)."""
    if nonnegative:
        return (v - thresh).clamp_min(0)
    return v.sign() * (v.abs() - thresh).clamp_min(0)


def fista(
    x_BD: Tensor,
    D_ND: Tensor,
    lam: float,
    *,
    bias_D: Tensor | None = None,
    nonnegative: bool = True,
    iters: int = 300,
    L: float | None = None,
    z0_BN: Tensor | None = None,
    mask_BN: Tensor | None = None,
    tol: float = 1e-6,
) -> Tensor:
    """Codes ``z_BN`` minimising ½‖x − b − zD‖² + λ‖z‖₁ for every row, by FISTA.

    ``z0_BN`` warm-starts (the problem is convex, so any start reaches the optimum).
    ``mask_BN`` fixes the support: latents outside it stay 0 (with ``lam=0`` this is the
    least-squares refit on a given support). Stops early when no code moves by more
    than ``tol`` relative to the codes' size.
    """
    x_BD = x_BD.float()
    D_ND = D_ND.float().to(x_BD.device)
    r_BD = x_BD - bias_D.float().to(x_BD.device) if bias_D is not None else x_BD
    if L is None:
        L = lipschitz_constant(D_ND)
    if L <= 0:
        return x_BD.new_zeros(x_BD.shape[0], D_ND.shape[0])
    step, thresh = 1.0 / L, lam / L
    # Dᵀx once; the gradient at y is y·(D Dᵀ) − x·Dᵀ. With N > D, (y·D)·Dᵀ is cheaper
    # than forming the N×N Gram matrix.
    xD_BN = r_BD @ D_ND.T
    z_BN = z0_BN.float().clone() if z0_BN is not None else torch.zeros_like(xD_BN)
    if mask_BN is not None:
        z_BN = z_BN * mask_BN
    y_BN, t = z_BN.clone(), 1.0
    for _ in range(iters):
        grad_BN = (y_BN @ D_ND) @ D_ND.T - xD_BN
        z_new_BN = soft_threshold(y_BN - step * grad_BN, thresh, nonnegative)
        if mask_BN is not None:
            z_new_BN = z_new_BN * mask_BN
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y_BN = z_new_BN + ((t - 1) / t_new) * (z_new_BN - z_BN)
        delta = float((z_new_BN - z_BN).abs().max()) if z_BN.numel() else 0.0
        z_BN, t = z_new_BN, t_new
        if delta <= tol * max(1.0, float(z_BN.abs().max()) if z_BN.numel() else 0.0):
            break
    return z_BN


@dataclass
class MatchedCode:
    """FISTA codes whose mean L0 was matched to a target by searching λ."""

    z_BN: Tensor
    lam: float
    l0: float
    """Mean number of nonzero codes per row actually reached."""
    steps: int
    """Bisection steps taken."""


def fista_matched_l0(
    x_BD: Tensor,
    D_ND: Tensor,
    target_l0: float,
    *,
    bias_D: Tensor | None = None,
    nonnegative: bool = True,
    iters: int = 300,
    bisection_steps: int = 20,
    rel_tol: float = 0.02,
) -> MatchedCode:
    """Bisect log λ until FISTA's mean L0 is within ``rel_tol`` of ``target_l0``.

    L0 falls as λ grows, and every z is 0 once λ ≥ max|Dᵀ(x−b)| (the subgradient
    condition at 0), so the search runs on [λ_max·1e-6, λ_max] in log space. Each solve
    warm-starts from the previous one's codes.
    """
    x_BD = x_BD.float()
    D_ND = D_ND.float().to(x_BD.device)
    r_BD = x_BD - bias_D.float().to(x_BD.device) if bias_D is not None else x_BD
    L = lipschitz_constant(D_ND)
    corr_BN = r_BD @ D_ND.T
    lam_max = float((corr_BN.clamp_min(0) if nonnegative else corr_BN.abs()).max())
    if lam_max <= 0 or target_l0 <= 0:
        z = torch.zeros_like(corr_BN)
        return MatchedCode(z, lam_max, 0.0, 0)
    lo, hi = math.log(lam_max * 1e-6), math.log(lam_max)  # lo: too many active, hi: too few
    best: MatchedCode | None = None
    z_BN = None
    for step in range(1, bisection_steps + 1):
        mid = (lo + hi) / 2
        lam = math.exp(mid)
        z_BN = fista(r_BD, D_ND, lam, nonnegative=nonnegative, iters=iters, L=L, z0_BN=z_BN)
        l0 = float((z_BN != 0).sum(-1).float().mean())
        if best is None or abs(l0 - target_l0) < abs(best.l0 - target_l0):
            best = MatchedCode(z_BN, lam, l0, step)
        if abs(l0 - target_l0) <= rel_tol * target_l0:
            break
        if l0 > target_l0:
            lo = mid
        else:
            hi = mid
    assert best is not None
    best.steps = step
    return best
