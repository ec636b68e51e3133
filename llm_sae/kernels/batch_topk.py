"""The pairs a batch-level TopK keeps, found without a dense [B, N] tensor.

BatchTopK keeps the k·B largest ReLU pre-activations of a whole batch, so a token gets a
variable number of latents. Its dense form holds all B·N pre-activations (400 MB at
B=4096, N=24576) and backpropagates through all of them. Here the selection runs on each
row's top c candidates (from the bfloat16 screen on CPUs that can, with a bound on the
rest; else the exact TopK encoder), the kept pairs keep the values the search computed,
with ``pair_pre_acts``'s sparse backward, and they are folded into virtual rows of a few
pairs (``fold_pairs``) rather than padded to the longest row, so decode and backward cost
about what TopK's do at the same mean L0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels import screen
from llm_sae.kernels.topk import pair_grads, pair_pre_acts, topk_decode, topk_encode

# Candidates per row, as a multiple of the mean count k: a row keeps more than k when its
# pre-activations are larger than the batch's; rows that need more are widened alone.
# With the exact top c (GPUs, float64): at n=24576, d=768, B=1024, 1 thread, the step
# cost 1.6x TopK's with c = 4k, 1.31x with 2k (3 rows widened a step), 1.22x with 1.5k
# (77 rows). The bfloat16 screen (``screened_candidates``) needs no margin of extra
# candidates, so its top-2k costs what TopK's top-(k + margin) does; its bound adds the
# bf16 error, so more rows are widened (226 of 2048 on a fresh SAE at k=32, through the
# screen again, ~55 ms; c = 3k widens 7 but costs more than it saves).
CANDIDATES_PER_K = 2


def _candidates(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, c: int, again: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """(vals_BC ≥ 0, idx_BC, bound_B): c candidates per row and a bound that no other
    latent's ReLU pre-activation exceeds: the screen's where it runs, else the exact
    top c (whose smallest value is the bound)."""
    if screen.screen_pays(xin_BD, W_enc_ND, b_enc_N, c):
        vals_BC, idx_BC, bound_B = screen.screened_candidates(xin_BD, W_enc_ND, b_enc_N, c, again=again)
        return vals_BC.clamp_(min=0), idx_BC, bound_B
    vals_BC, idx_BC = topk_encode(xin_BD, W_enc_ND, b_enc_N, c)  # ReLU'd: ≥ 0
    return vals_BC, idx_BC, vals_BC.min(dim=1).values


def batch_topk_pairs(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int, row_scale_B: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(idx_BK, on_BK): the latents of the k·B largest ReLU(xin W_encᵀ + b_enc) entries of
    the batch, K = the most any row keeps; row b's kept latents first, ``on_BK`` (float 1/0)
    marks them (the rest are padding, any valid index). With ``row_scale_B`` (positive)
    the entries are ranked as ReLU(·) / row_scale_B[b]: the selection relative to each
    row's scale (BatchTopK's early training); the order within a row is unchanged.

    Exact: the selection from the c candidates of each row (c = 2k) equals the selection
    over all N unless some row's bound (its c-th value, or the screen's bound on every
    non-candidate) reaches the batch threshold (that row may have more above it); then
    those rows alone are redone with the exact top 2c, up to c = N. (The threshold only
    rises as candidates are added, so a row once cleared stays cleared.)
    """
    idx_BK, on_BK, _, _ = _select(xin_BD, W_enc_ND, b_enc_N, k, row_scale_B)
    return idx_BK, on_BK


@torch.no_grad()
def _select(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int, row_scale_B: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batch_topk_pairs``, the kept pairs' values (ReLU'd, 0 on padding) as the
    candidate search computed them, and the batch's cut-off in raw (unscaled) units: the
    smallest positive kept value when nothing is rescaled (0 if none); when rescaled, the
    k·B-th largest raw candidate value, exact unless a row holds more of the batch's k·B
    largest raw values than its candidates (then a lower bound: an estimate for the
    inference threshold, which the plain phase at the end of training settles)."""
    B, N = xin_BD.shape[0], W_enc_ND.shape[0]
    n_keep = min(B * N, k * B)
    c = min(N, max(k, int(CANDIDATES_PER_K * k)))
    vals_BC, idx_BC, last_B = _candidates(xin_BD, W_enc_ND, b_enc_N, c)
    inv_B1 = None if row_scale_B is None else (1.0 / row_scale_B.float()).view(B, 1)
    while True:
        # Ranked on the rescaled values; the bound scales with its row (scales are > 0).
        rank_BC = vals_BC if inv_B1 is None else vals_BC * inv_B1
        flat_vals, flat_pos = rank_BC.flatten().topk(n_keep, sorted=False)
        threshold = flat_vals.min() if n_keep else vals_BC.new_tensor(float("inf"))
        # A row whose bound is positive and not below the threshold may hold
        # non-candidates that belong in the selection.
        bound_B = last_B if inv_B1 is None else last_B * inv_B1[:, 0]
        bad_R = ((bound_B >= threshold) & (bound_B > 0)).nonzero().view(-1)
        if c == N or bad_R.numel() == 0:
            break
        c = min(N, 2 * c)
        v_RC, i_RC, bound_R = _candidates(xin_BD[bad_R], W_enc_ND, b_enc_N, c, again=True)
        # Other rows keep their candidates, padded with -1: below every ReLU value, never kept.
        pad = c - vals_BC.shape[1]
        vals_BC = torch.cat([vals_BC, vals_BC.new_full((B, pad), -1.0)], dim=1)
        idx_BC = torch.cat([idx_BC, idx_BC.new_zeros(B, pad)], dim=1)
        vals_BC[bad_R], idx_BC[bad_R] = v_RC, i_RC
        last_B[bad_R] = bound_R
    on_BC = torch.zeros(B * c, dtype=torch.bool, device=vals_BC.device)
    on_BC[flat_pos] = True
    on_BC = on_BC.view(B, c)
    # Kept pairs first in each row (a stable sort: in candidate order), then trim to the
    # longest row.
    order_BC = torch.sort(on_BC.to(torch.int8), dim=1, descending=True, stable=True).indices
    K = max(1, int(on_BC.sum(dim=1).max())) if B else 1
    order_BK = order_BC[:, :K]
    on_BK = on_BC.gather(1, order_BK).to(xin_BD.dtype)
    vals_BK = vals_BC.gather(1, order_BK).clamp_(min=0).mul_(on_BK)
    if inv_B1 is None:
        kept = vals_BK[vals_BK > 0]
        cut = kept.min() if kept.numel() else vals_BC.new_zeros(())
    else:
        cut = vals_BC.flatten().topk(n_keep, sorted=False).values.min() if n_keep else vals_BC.new_zeros(())
    return idx_BC.gather(1, order_BK), on_BK, vals_BK, cut

# What a virtual row (``fold_pairs``) costs beyond its pairs, in pairs: the gather of its
# input row, the scatter of its decode and both in the backward, and the sparse kernels'
# per-row overheads. Measured (n=24576, d=768, k=32, B=2048, 1 thread, steps interleaved
# in one process): 1, 2, 4, 8, 16 gave BatchTopK 1.27, 1.21, 1.20, 1.16, 1.13x TopK's step
# and Matryoshka 1.39, 1.39, 1.33, 1.31, 1.27x; 16 to 64 and no folding are within noise.
ROW_COST = 16
_WIDTHS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def choose_width(count: Tensor, K: int) -> int:
    """The virtual rows' width J for runs of ``count`` pairs (any shape; the longest K): the
    fewest slots plus ROW_COST per virtual row, over _WIDTHS below K and K itself."""
    widths_W = torch.tensor(sorted({j for j in _WIDTHS if j < K} | {K}), device=count.device)
    flat = count.reshape(1, -1)
    rows_W = ((flat + widths_W[:, None] - 1) // widths_W[:, None]).sum(1)
    return int(widths_W[int(torch.argmin(rows_W * (widths_W + ROW_COST)))])  # one read-back


def fold_pairs(idx_BK: Tensor, on_BK: Tensor, widths: list[int]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """(rows_V, pos_VJ, on_VJ, sizes): the kept pairs (``on_BK``) as V virtual rows of J
    pairs, each holding pairs of one row and one latent range [widths[i-1], widths[i]),
    ranges in order (``sizes[i]`` virtual rows for range i); ``rows_V`` is each virtual
    row's row b of the batch and ``pos_VJ`` its pairs' positions in row b of idx_BK (so
    ``idx_BK[rows_V].gather(1, pos_VJ)``); ``on_VJ`` (bool) marks them (the rest: padding).

    A row keeps a variable number of latents, and [B, K] padded to the longest row makes
    the sparse kernels do K/k times TopK's work (K ≈ 2.3k at B=2048, k=32, on random
    data). Cut into virtual rows of J pairs, the padding is at most J−1 a row and range;
    J is chosen per batch from the counts: the fewest slots + ROW_COST a virtual row.
    """
    B, K = idx_BK.shape
    L, dev = len(widths), idx_BK.device
    bounds = torch.tensor(widths, dtype=idx_BK.dtype, device=dev)
    level_BK = torch.bucketize(idx_BK, bounds, right=True)  # w[i-1] <= idx < w[i] → i
    level_BK.masked_fill_(on_BK <= 0, L)  # padding last
    # One stable sort of each row by range: range i's pairs are then a contiguous run.
    order_BK = torch.sort(level_BK, dim=1, stable=True).indices
    count_BL = torch.zeros(B, L + 1, dtype=torch.long, device=dev).scatter_add_(1, level_BK, torch.ones_like(level_BK))
    start_LB = (count_BL.cumsum(1) - count_BL)[:, :L].t().reshape(-1)
    count_LB = count_BL[:, :L].t().reshape(-1)
    J = choose_width(count_LB, K)
    nv_LB = (count_LB + J - 1) // J
    lb_V = torch.repeat_interleave(torch.arange(L * B, device=dev), nv_LB)
    first_LB = nv_LB.cumsum(0) - nv_LB
    m_V = torch.arange(lb_V.numel(), device=dev) - first_LB[lb_V]  # which cut of its run
    off_VJ = m_V[:, None] * J + torch.arange(J, device=dev)
    on_VJ = off_VJ < count_LB[lb_V, None]
    pos_VJ = (start_LB[lb_V, None] + off_VJ).clamp_(max=K - 1).masked_fill_(~on_VJ, 0)
    rows_V = lb_V % B
    sizes = nv_LB.view(L, B).sum(1).tolist()
    return rows_V, order_BK[rows_V].gather(1, pos_VJ), on_VJ, sizes


def batch_topk_decodes(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_NE: Tensor, k: int, widths: list[int],
    row_scale_B: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK's training forward on the sparse kernels, split by latent range: (dec_LBE,
    vals_VJ, idx_VJ, cut), dec_LBE[i] the decode (no bias) of the kept latents in
    [widths[i-1], widths[i]), the kept pairs as ``fold_pairs``'s virtual rows (padding
    holds 0), and the batch's raw cut-off (``_select``'s, for the inference threshold).
    Each range's decode is the sum of its virtual rows' (``batch_topk_virtual_decodes``)."""
    dec_VE, rows_V, sizes, vals_VJ, idx_VJ, cut = batch_topk_virtual_decodes(
        xin_BD, W_enc_ND, b_enc_N, W_dec_NE, k, widths, row_scale_B
    )
    # Each virtual row's decode added to its row of its range's decode: one index_add
    # (and one gather in the backward) for all ranges.
    B, dev = xin_BD.shape[0], rows_V.device
    level_V = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
    out_LBE = _AddRows.apply(dec_VE, level_V * B + rows_V, len(sizes) * B)
    return out_LBE.view(len(sizes), B, W_dec_NE.shape[1]), vals_VJ, idx_VJ, cut


def batch_topk_virtual_decodes(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_NE: Tensor, k: int, widths: list[int],
    row_scale_B: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[int], Tensor, Tensor, Tensor]:
    """``batch_topk_decodes`` before the sum over virtual rows: (dec_VE, rows_V, sizes,
    vals_VJ, idx_VJ, cut), dec_VE[v] the decode (no bias) of virtual row v, a part of row
    rows_V[v] of the batch; the first sizes[0] virtual rows hold range 0, the next sizes[1]
    range 1, and so on. Matryoshka sums them into its running prefix decodes.

    The selection is ``batch_topk_pairs``'s; the values are the candidate search's
    (float32 dot products, as ``pair_pre_acts`` computes them; recomputed by it under
    autocast, where the search ran in low precision), with its sparse backward to xin,
    W_enc and b_enc, and decoded once by the sparse decode. With widths = [n] it is
    BatchTopK's decode. Same values and gradients as the dense [B, N] forms (tested)."""
    B = xin_BD.shape[0]
    idx_BK, on_BK, vals_BK, cut = _select(xin_BD.detach(), W_enc_ND, b_enc_N, k, row_scale_B)
    # The encoder's pairs folded as one range (the least padding), the decoder's by range.
    rows_U, pos_UJ, on_UJ, _ = fold_pairs(idx_BK, on_BK, [W_enc_ND.shape[0]])
    idx_UJ = idx_BK[rows_U].gather(1, pos_UJ)
    xin_UD = xin_BD.index_select(0, rows_U)
    on_UJ = on_UJ.to(W_enc_ND.dtype)
    if torch.is_autocast_enabled(xin_BD.device.type) or vals_BK.dtype != W_enc_ND.dtype:
        vals_UJ = F.relu(pair_pre_acts(xin_UD, W_enc_ND, b_enc_N, idx_UJ)) * on_UJ
    else:
        vals_UJ = _KeptValues.apply(vals_BK[rows_U].gather(1, pos_UJ) * on_UJ, xin_UD, W_enc_ND, b_enc_N, idx_UJ)
    if len(widths) == 1:
        rows_V, idx_VJ, vals_VJ, sizes = rows_U, idx_UJ, vals_UJ, [rows_U.numel()]
    else:
        rows_V, pos_VJ, on_VJ, sizes = fold_pairs(idx_BK, on_BK, widths)
        idx_VJ = idx_BK[rows_V].gather(1, pos_VJ)
        # Each pair's slot in the encoder's layout, through its (row, position) in idx_BK.
        K = idx_BK.shape[1]
        on_flat = on_UJ.flatten() > 0
        slot_BK = torch.zeros(B * K, dtype=torch.long, device=idx_BK.device)
        slot_BK[(rows_U[:, None] * K + pos_UJ).flatten()[on_flat]] = torch.arange(on_flat.numel(), device=idx_BK.device)[on_flat]
        slot_VJ = (rows_V[:, None] * K + pos_VJ).flatten()
        vals_VJ = vals_UJ.flatten()[slot_BK[slot_VJ]].view(-1, pos_VJ.shape[1]) * on_VJ
    return topk_decode(vals_VJ, idx_VJ, W_dec_NE), rows_V, sizes, vals_VJ, idx_VJ, cut


class _AddRows(torch.autograd.Function):
    """[R, E] zeros with rows_VE[v] added to row dest_V[v]; the backward gathers.
    ``Tensor.index_add`` keeps its source for the backward (only for its shape): [V, E],
    25 MB for Matryoshka's virtual rows at B=2048."""

    @staticmethod
    def forward(ctx, rows_VE: Tensor, dest_V: Tensor, R: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(dest_V)
        return rows_VE.new_zeros(R, rows_VE.shape[1]).index_add_(0, dest_V, rows_VE)

    @staticmethod
    def backward(ctx, g_RE: Tensor):  # type: ignore[override]
        (dest_V,) = ctx.saved_tensors
        return g_RE.index_select(0, dest_V), None, None


class _KeptValues(torch.autograd.Function):
    """ReLU(pre) at the kept pairs, given the values already computed (0 on padding):
    ``pair_pre_acts``'s backward without its forward's B·K dot products."""

    @staticmethod
    def forward(ctx, vals_VJ: Tensor, x_VD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, idx_VJ: Tensor):  # type: ignore[override]
        ctx.save_for_backward(vals_VJ, x_VD, W_enc_ND, idx_VJ)
        return vals_VJ.clone()

    @staticmethod
    def backward(ctx, grad_VJ: Tensor):  # type: ignore[override]
        vals_VJ, x_VD, W_enc_ND, idx_VJ = ctx.saved_tensors
        # ReLU's derivative (and the padding's zero): only positive kept values pass.
        g_VJ = torch.where(vals_VJ > 0, grad_VJ, 0).to(W_enc_ND.dtype).contiguous()
        return None, *pair_grads(x_VD.to(W_enc_ND.dtype), W_enc_ND, g_VJ, idx_VJ, ctx.needs_input_grad[1:4]), None


def add_rows(rows_VE: Tensor, dest_V: Tensor, R: int) -> Tensor:
    """[R, E]: zeros with rows_VE[v] added to row dest_V[v] (the backward gathers)."""
    return _AddRows.apply(rows_VE, dest_V, R)


def kept_values(vals_VJ: Tensor, x_VD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, idx_VJ: Tensor) -> Tensor:
    """The pairs' values already computed (0 on padding), with ``pair_pre_acts``'s sparse
    backward where they are positive (ReLU's derivative) and none elsewhere."""
    return _KeptValues.apply(vals_VJ, x_VD, W_enc_ND, b_enc_N, idx_VJ)
