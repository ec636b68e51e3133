"""AuxK's auxiliary decode, computed in the dead latents' subspace.

AuxK (Gao et al. 2024) decodes each token's top k_aux dead latents. Every product it needs
involves only the M dead latents: their pre-activations for the selection, the decode,
and the gradients of their rows of W_enc and W_dec. Done as dense [B, M] products these
cost 2·B·M·D FLOPs each at the machine's matmul rate: at 1% dead (M = 246 at n = 24576)
about 1% of the encoder each. The sparse alternative, B·k_aux (token, latent) pairs
through the TopK kernels, does 2·B·k_aux·D FLOPs at a sparse rate ~10x lower (k_aux =
d/2 = 384 by default, so M ≤ k_aux at 1% dead and the pairs are not even fewer), and its
gradients are written a slab of rows at a time, twice (BENCHMARKS.md).

The weight gradients are [M, D] blocks of rows: a trainer that collects deferred
gradients (``DeferredWeightGrads``) gets them as blocks, so no [N, D] gradient exists;
elsewhere they are scattered into ordinary [N, D] gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm_sae.kernels.sparse_ops import record_weight_rows

# Rows of the batch per dense [C, M] slab: bounds the step's extra memory at 10% dead
# (M = 2458) to a few slabs of ~10 MB instead of [B, M] tensors of 40 MB.
SLAB_BYTES = 8 * 2**20


class DeadDecode(torch.autograd.Function):
    """ê[b] = Σ over b's top k_aux dead latents j of ReLU(pre[b, j]) · W_dec[j]."""

    @staticmethod
    def forward(ctx, xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_ND: Tensor, dead_M: Tensor, k_aux: int):  # type: ignore[override]
        B, M = xin_BD.shape[0], dead_M.numel()
        We_MD, be_M, Wd_MD = W_enc_ND[dead_M], b_enc_N[dead_M], W_dec_ND[dead_M]
        e_BD = xin_BD.new_empty(B, W_dec_ND.shape[1])
        vals_BK = xin_BD.new_empty(B, k_aux)
        pos_BK = torch.empty(B, k_aux, dtype=torch.long, device=xin_BD.device)
        step = max(1, SLAB_BYTES // max(1, 4 * M))
        for s in range(0, B, step):
            e = min(B, s + step)
            pre_CM = torch.addmm(be_M, xin_BD[s:e], We_MD.t())
            # top-k then ReLU equals ReLU then top-k; ties among ReLU's zeros decode to nothing.
            torch.topk(pre_CM, k_aux, dim=1, sorted=False, out=(vals_BK[s:e], pos_BK[s:e]))
            vals_BK[s:e].clamp_(min=0)
            z_CM = pre_CM.zero_().scatter_(1, pos_BK[s:e], vals_BK[s:e])
            torch.mm(z_CM, Wd_MD, out=e_BD[s:e])
        ctx.save_for_backward(xin_BD, Wd_MD, dead_M, vals_BK, pos_BK)
        ctx.shapes = (W_enc_ND, W_dec_ND)
        return e_BD

    @staticmethod
    def backward(ctx, g_BD: Tensor):  # type: ignore[override]
        xin_BD, Wd_MD, dead_M, vals_BK, pos_BK = ctx.saved_tensors
        W_enc_ND, W_dec_ND = ctx.shapes
        B, M = xin_BD.shape[0], dead_M.numel()
        g_BD = g_BD.contiguous()
        gWe_MD = xin_BD.new_zeros(M, xin_BD.shape[1])
        gWd_MD = torch.zeros_like(Wd_MD)
        gb_M = xin_BD.new_zeros(M)
        step = max(1, SLAB_BYTES // max(1, 4 * M))
        z_CM = xin_BD.new_empty(min(B, step), M)
        for s in range(0, B, step):
            e = min(B, s + step)
            z = z_CM[: e - s].zero_().scatter_(1, pos_BK[s:e], vals_BK[s:e])
            gWd_MD.addmm_(z.t(), g_BD[s:e])
            # ∂/∂pre: the decode's gradient at the chosen, positive entries only.
            g_pre = torch.mm(g_BD[s:e], Wd_MD.t()).mul_(z > 0)
            gWe_MD.addmm_(g_pre.t(), xin_BD[s:e])
            gb_M += g_pre.sum(0)
        needs = ctx.needs_input_grad
        grad_b = torch.zeros(W_enc_ND.shape[0], dtype=gb_M.dtype, device=gb_M.device).index_add_(0, dead_M, gb_M) if needs[2] else None
        return (None, _rows_grad(W_enc_ND, dead_M, gWe_MD, needs[1]), grad_b,
                _rows_grad(W_dec_ND, dead_M, gWd_MD, needs[3]), None, None)  # fmt: skip


def _rows_grad(W_ND: Tensor, rows_M: Tensor, G_MD: Tensor, need: bool) -> Tensor | None:
    """The gradient that is G on ``rows_M`` and zero elsewhere: deferred as a block when a
    trainer collects, else an ordinary [N, D] tensor."""
    if not need or record_weight_rows(W_ND, rows_M, G_MD):
        return None
    return torch.zeros_like(W_ND).index_add_(0, rows_M, G_MD.to(W_ND.dtype))


def dead_decode(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_ND: Tensor, dead_M: Tensor, k_aux: int
) -> Tensor:
    """AuxK's ê (no bias): per row, the decode of its top ``k_aux`` ReLU pre-activations
    among the latents ``dead_M`` (sorted, unique). The input gets no gradient (AuxK trains
    only the dead latents); W_enc, b_enc and W_dec get theirs on the dead rows only.
    Float32 even under autocast (the products are small)."""
    if not 0 < k_aux <= dead_M.numel():
        raise ValueError(f"k_aux={k_aux} must be in 1..{dead_M.numel()} (the dead latents)")
    with torch.autocast(xin_BD.device.type, enabled=False):
        x_BD = xin_BD.detach().to(W_enc_ND.dtype).contiguous()
        return DeadDecode.apply(x_BD, W_enc_ND, b_enc_N, W_dec_ND, dead_M, k_aux)
