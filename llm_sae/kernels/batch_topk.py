"""The pairs a batch-level TopK keeps, found without a dense [B, N] tensor.

BatchTopK keeps the k·B largest ReLU pre-activations of a whole batch, so a token gets a
variable number of latents. Its dense form holds all B·N pre-activations (400 MB at
B=4096, N=24576) and backpropagates through all of them. Here the selection runs on each
row's top c candidates from the TopK encoder (screened in bf16 on CPUs that can), and the
caller recomputes the kept pairs' values with a sparse backward (``pair_pre_acts``), so
decode and backward cost what TopK's do at the same mean L0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels.topk import pair_pre_acts, topk_encode

# Candidates per row, as a multiple of the mean count k: a row keeps more than k when its
# pre-activations are larger than the batch's; rows that need more are widened alone.
# The screened top-(c + margin) dominates the selection's cost: at n=24576, d=768, B=1024,
# 1 thread, the step costs 1.6x TopK's with c = 4k, 1.31x with 2k (3 rows widened a
# step), 1.22x with 1.5k (77 rows widened; more on real data, whose norms vary more).
CANDIDATES_PER_K = 2


@torch.no_grad()
def batch_topk_pairs(xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(idx_BK, on_BK): the latents of the k·B largest ReLU(xin W_encᵀ + b_enc) entries of
    the batch, K = the most any row keeps; row b's kept latents first, ``on_BK`` (float 1/0)
    marks them (the rest are padding, any valid index).

    Exact: the selection from the top c per row (c = 2k) equals the selection over all N unless
    some row's c-th candidate reaches the batch threshold (that row may have more above
    it); then those rows alone are redone with 2c candidates, up to c = N. (The threshold
    only rises as candidates are added, so a row once cleared stays cleared.)
    """
    B, N = xin_BD.shape[0], W_enc_ND.shape[0]
    n_keep = min(B * N, k * B)
    c = min(N, max(k, int(CANDIDATES_PER_K * k)))
    vals_BC, idx_BC = topk_encode(xin_BD, W_enc_ND, b_enc_N, c)  # ReLU'd: ≥ 0
    last_B = vals_BC.min(dim=1).values
    while True:
        flat_vals, flat_pos = vals_BC.flatten().topk(n_keep, sorted=False)
        threshold = flat_vals.min() if n_keep else vals_BC.new_tensor(float("inf"))
        # A row whose smallest candidate is positive and not below the threshold may hold
        # non-candidates that belong in the selection.
        bad_R = ((last_B >= threshold) & (last_B > 0)).nonzero().view(-1)
        if c == N or bad_R.numel() == 0:
            break
        c = min(N, 2 * c)
        v_RC, i_RC = topk_encode(xin_BD[bad_R], W_enc_ND, b_enc_N, c)
        # Other rows keep their candidates, padded with -1: below every ReLU value, never kept.
        pad = c - vals_BC.shape[1]
        vals_BC = torch.cat([vals_BC, vals_BC.new_full((B, pad), -1.0)], dim=1)
        idx_BC = torch.cat([idx_BC, idx_BC.new_zeros(B, pad)], dim=1)
        vals_BC[bad_R], idx_BC[bad_R] = v_RC, i_RC
        last_B[bad_R] = v_RC.min(dim=1).values
    on_BC = torch.zeros(B * c, dtype=torch.bool, device=vals_BC.device)
    on_BC[flat_pos] = True
    on_BC = on_BC.view(B, c)
    # Kept pairs first in each row (a stable sort: in candidate order), then trim to the
    # longest row.
    order_BC = torch.sort(on_BC.to(torch.int8), dim=1, descending=True, stable=True).indices
    K = max(1, int(on_BC.sum(dim=1).max())) if B else 1
    order_BK = order_BC[:, :K]
    return idx_BC.gather(1, order_BK), on_BC.gather(1, order_BK).to(xin_BD.dtype)


def batch_topk_acts(xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(vals_BK, idx_BK): BatchTopK's latents as pairs, ``batch_topk_pairs``'s selection
    with the values recomputed by ``pair_pre_acts`` (sparse backward to xin, W_enc and
    b_enc); padding pairs hold 0."""
    idx_BK, on_BK = batch_topk_pairs(xin_BD.detach(), W_enc_ND, b_enc_N, k)
    return F.relu(pair_pre_acts(xin_BD, W_enc_ND, b_enc_N, idx_BK)) * on_BK, idx_BK


def split_pairs(vals_BK: Tensor, idx_BK: Tensor, widths: list[int]) -> list[tuple[Tensor, Tensor]]:
    """The nonzero pairs split by latent range: entry i holds, per row, the pairs whose
    latent lies in [widths[i-1], widths[i]) (from 0 for i = 0), as (vals, idx) padded
    with zeros to the row that has the most. ``vals`` keeps its gradient (a gather).

    Matryoshka's prefix decodes are then cumulative sums of sparse decodes of these
    parts, and together the parts hold about as many pairs as the whole: no [B, N]."""
    B, K = idx_BK.shape
    L = len(widths)
    bounds = torch.tensor(widths, dtype=idx_BK.dtype, device=idx_BK.device)
    level_BK = torch.bucketize(idx_BK, bounds, right=True)  # w[i-1] <= idx < w[i] → i
    level_BK.masked_fill_(vals_BK.detach() <= 0, L)  # padding and zeros: dropped
    # One stable sort of each row by level: level i's pairs are then a contiguous run.
    order_BK = torch.sort(level_BK, dim=1, stable=True).indices
    count_BL = torch.zeros(B, L + 1, dtype=torch.long, device=idx_BK.device)
    count_BL.scatter_add_(1, level_BK, torch.ones_like(level_BK))
    start_BL = count_BL.cumsum(1) - count_BL
    most_L = count_BL[:, :L].amax(0).tolist() if B else [0] * L
    parts = []
    for i in range(L):
        arange_J = torch.arange(max(1, most_L[i]), device=idx_BK.device)
        valid_BJ = arange_J < count_BL[:, i : i + 1]
        pos_BJ = (start_BL[:, i : i + 1] + arange_J).clamp_(max=K - 1).masked_fill_(~valid_BJ, 0)
        sel_BJ = order_BK.gather(1, pos_BJ)
        parts.append((vals_BK.gather(1, sel_BJ) * valid_BJ, idx_BK.gather(1, sel_BJ)))
    return parts
