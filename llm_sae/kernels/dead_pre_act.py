"""Anthropic's pre-activation loss on the dead latents, in their subspace.

JumpReLU's dead latents get Σ_dead relu(θ − pre)·‖W_dec‖ (January 2025; as in SAELens).
Written as autograd through ``W_enc[dead]``, the indexing's backward makes a dense [N, D]
gradient of W_enc and of W_dec (75 MB each at n=24576, d=768, zeroed and added every step),
which also pushes the optimiser off its slab-by-slab path. Here the gradients are the
[M, D] blocks of the dead rows, deferred like AuxK's (``kernels.auxk``), and the input
side's gradient is that of the encoder's shift (−b_dec), a [D] vector; the one product left
is the dead latents' pre-activations (which also set their revived thresholds).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm_sae.kernels.auxk import compute_dtype, gather_rows, rows_grad


def dead_pre_acts(xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, dead_M: Tensor) -> Tensor:
    """[B, M]: xin·W_enc[dead]ᵀ + b_enc[dead] (xin what the encoder reads), no gradient,
    in the weights' dtype, its product in AuxK's (``auxk.compute_dtype``: bfloat16 on CPUs
    with bfloat16 units, as AuxK's own products over the same latents; they only move the
    dead latents' thresholds and the pre-activation loss's gradient, weight 3e-6), not
    autocast's."""
    dt = compute_dtype(W_enc_ND)
    with torch.no_grad(), torch.autocast(xin_BD.device.type, enabled=False):
        xin_BD = xin_BD.detach().to(dt)
        We_MD = gather_rows(W_enc_ND, dead_M, W_enc_ND.new_empty(dead_M.numel(), W_enc_ND.shape[1], dtype=dt))
        return torch.addmm(b_enc_N[dead_M].to(dt), xin_BD, We_MD.t()).to(W_enc_ND.dtype)


def dead_pre_act_loss(
    rel_BM: Tensor, scale_B: Tensor | None, xin_BD: Tensor, shift_D: Tensor | None,
    W_enc_ND: Tensor, b_enc_N: Tensor, theta_N: Tensor, W_dec_NE: Tensor, dead_M: Tensor,
) -> Tensor:  # fmt: skip
    """mean over rows of Σ_m relu(θ_m − rel_bm)·‖W_dec[m]‖ for the dead latents ``dead_M``
    (sorted, unique), rel_BM = ``dead_pre_acts``'s pre_BM / scale_b (overwritten here),
    with gradients to W_enc, b_enc, θ and W_dec on the dead rows, and to ``shift_D`` when
    the encoder's input xin is x + shift (an SAE's −b_dec): the input's own gradient,
    summed over rows, without a [B, D] one."""
    return _DeadPreActLoss.apply(rel_BM, scale_B, xin_BD.detach(), shift_D, W_enc_ND, b_enc_N, theta_N, W_dec_NE, dead_M)


class _DeadPreActLoss(torch.autograd.Function):
    """Everything the backward needs is reduced in the forward: per dead latent, Σ_b of
    relu(gap) and the rows where it is not under its threshold (a dead latent's few), so
    no [B, M] tensor outlives the forward."""

    @staticmethod
    def forward(ctx: Any, rel_BM: Tensor, scale_B: Tensor | None, xin_BD: Tensor, shift_D: Tensor | None,  # type: ignore[override]
                W_enc_ND: Tensor, b_enc_N: Tensor, theta_N: Tensor, W_dec_NE: Tensor, dead_M: Tensor) -> Tensor:  # fmt: skip
        B, M = rel_BM.shape
        gap_BM = torch.sub(theta_N[dead_M].to(rel_BM.dtype), rel_BM, out=rel_BM)
        off_b, off_m = (gap_BM <= 0).nonzero(as_tuple=True)
        relu_M = gap_BM.clamp_(min=0).sum(0)
        on_M = B - torch.bincount(off_m, minlength=M).to(relu_M.dtype)
        norm_M = W_dec_NE[dead_M].norm(dim=1)
        ctx.save_for_backward(off_b, off_m, relu_M, on_M, scale_B, xin_BD, shift_D, W_enc_ND, b_enc_N, theta_N,
                              W_dec_NE, dead_M, norm_M)  # fmt: skip
        ctx.B = B
        return (relu_M * norm_M).sum() / max(1, B)

    @staticmethod
    def backward(ctx: Any, g: Tensor):  # type: ignore[override]
        (off_b, off_m, relu_M, on_M, scale_B, xin_BD, shift_D, W_enc_ND, b_enc_N, theta_N, W_dec_NE, dead_M,
         norm_M) = ctx.saved_tensors  # fmt: skip
        need = ctx.needs_input_grad
        c = g.to(relu_M.dtype) / max(1, ctx.B)
        g_shift = g_We = g_be = g_theta = g_Wd = None
        if need[3] or need[4] or need[5]:
            # ∂/∂pre_bm = −c·‖W_dec[m]‖·[θ_m > rel_bm] / scale_b. A dead latent is under its
            # threshold on almost every row, so Σ_b ∂/∂pre_bm · xin_b is −c‖W_dec[m]‖ times
            # (Σ_b xin_b / scale_b, one sum for all m) minus the same over the few rows where m
            # is not under it: no [M, B] × [B, D] product.
            inv_B = relu_M.new_ones(ctx.B) if scale_B is None else 1 / scale_B.to(relu_M.dtype)
            w_M = norm_M * -c
            g_be_M = w_M * (inv_B.sum() - torch.zeros_like(w_M).index_add_(0, off_m, inv_B[off_b]))
            if need[3]:
                g_shift = (g_be_M @ W_enc_ND[dead_M]).to(shift_D.dtype)
            if need[4]:
                xs_BD = xin_BD.to(relu_M.dtype) * inv_B[:, None]
                off_MD = xs_BD.new_zeros(w_M.shape[0], xs_BD.shape[1]).index_add_(0, off_m, xs_BD[off_b])
                g_We = rows_grad(W_enc_ND, dead_M, (xs_BD.sum(0) - off_MD).mul_(w_M[:, None]), True)
            if need[5]:
                g_be = torch.zeros_like(b_enc_N).index_add_(0, dead_M, g_be_M.to(b_enc_N.dtype))
        if need[6]:
            g_theta = torch.zeros_like(theta_N).index_add_(0, dead_M, (on_M * norm_M * c).to(theta_N.dtype))
        if need[7]:
            G_ME = W_dec_NE[dead_M] * ((relu_M * c) / norm_M.clamp_min(1e-12))[:, None]
            g_Wd = rows_grad(W_dec_NE, dead_M, G_ME, True)
        return None, None, None, g_shift, g_We, g_be, g_theta, g_Wd, None
