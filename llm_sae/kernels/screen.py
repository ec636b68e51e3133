"""An exact float32 TopK encoder forward on CPU that runs its dense matmul in bfloat16.

The encoder's only dense work is s = x W_encᵀ + b_enc, and TopK keeps k of its n columns.
On CPUs with bfloat16 dot-product units (``avx512_bf16``, ``amx_bf16``) a bfloat16 matmul
runs ~2.2× faster than a float32 one, so the forward screens with bfloat16 and keeps the
float32 answer:

1. screen: s̃ = bf16(x)·bf16(W_enc)ᵀ + b_enc (float32 accumulation, bfloat16 output) in
   row slabs, and its top-(k+m) columns per row as candidates (through group maxima,
   ``screen_select``);
2. exact: the float32 pre-activations x·w_j + b_j of the candidates that can matter (a
   sampled dot product, 2·d FLOPs each): first the k the screen ranks highest, then only
   those whose screened value comes within the error bound of the k-th of these (see
   ``_screen_slab``), and the top k of all computed;
3. verify: a rigorous bound e_t ≥ |s̃_tj − (x_t·w_j + b_j)| (rounding of x, W and b to
   bfloat16, float32 accumulation, rounding of the output; see ``_error``) certifies a
   row when its k-th exact value exceeds, by e_t, the screened value of every latent not
   computed (the (k+m)-th screened value bounds those outside the candidates): none of
   them can then reach the top k. Rows that fail are recomputed in float32 over all n
   latents, the reference path, and counted in ``STATS``.

So the selection equals the float32 top-k (up to ties within float32 rounding, which any
float32 summation order has), and the values are float32 dot products. ``LLM_SAE_SCREEN``
= 0 turns the screen off, = 1 forces it on where the CPU flags are missing (for tests).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from llm_sae.kernels import screen_buffers, screen_select, sparse_ops

# Extra candidates per row beyond k: more means fewer rows fail verification but a
# slower top-(k+m) and more exact dot products. Measured at k=32, n=24576, d=768 on an SAE
# after 300 steps on synthetic data: m = 8, 16, 32, 64 fail 99%, 69%, 1.8%, 0% of rows;
# a failed row costs ~20× what 32 more candidates do, so 32 is about the optimum. Fixed,
# not adapted at run time, so that which rows fall back (and so the last bits of their
# values) depends only on the inputs: resumed runs stay bit-identical.
MARGIN = 32


def margin(k: int) -> int:
    """Extra candidates per row at this k: MARGIN, or k when k is larger.

    Verification needs a gap between the k-th and the (k+m)-th value wider than the bf16
    error bound (~0.14 σ of the pre-activations at d=768, mostly ‖x − bf16(x)‖·‖w‖ and
    ‖x‖·‖w − bf16(w)‖). Near the top of n values the gap between neighbours shrinks as k
    grows (more values sit near the k-th), so a fixed m certifies fewer rows at larger k:
    a fresh SAE at n=24576, d=768 fails 18% of rows at k=64 and 99% at k=128 with m=32,
    and 0% at both with m=k (2.5% at k=128 with m=64). The extra candidates cost little:
    the top-(k+m) runs on group maxima, and exact values are computed only for the
    candidates within the bound of the k-th (~60 more per row at k=128, not m).
    """
    return max(MARGIN, k)

# The screen pays off only when the candidates are a small part of the n latents.
_MIN_RATIO = 8

_U = 2.0**-8  # bfloat16 unit roundoff (8 significand bits, round to nearest)
_U32 = 2.0**-24  # float32 unit roundoff
_TINY = 2.0**-100  # absolute slack: bfloat16 dot-product units flush subnormals to zero
# Multiplies the whole error bound: 1 is the proof, tests shrink it to see it matters.
_BOUND_SCALE = 1.0

STATS = {"rows": 0, "fallback_rows": 0, "exact": 0}
"""Rows screened, rows recomputed in float32 because verification failed, and exact
candidate values the TopK path computed (cumulative)."""


def reset_stats() -> None:
    STATS.update(rows=0, fallback_rows=0, exact=0)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where /proc/cpuinfo lists a bfloat16 dot-product unit (Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def use_screen(x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int) -> bool:
    """Whether ``TopKEncode.forward`` should take the bfloat16-screened path."""
    return screen_pays(x_BD, W_enc_ND, b_enc_N, k + margin(k))


def screen_pays(x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, m: int) -> bool:
    """Whether to screen for ``m`` candidates per row: float32 on a CPU with bfloat16
    units (or ``LLM_SAE_SCREEN=1``), not under autocast, and m a small part of n."""
    env = os.environ.get("LLM_SAE_SCREEN", "")
    if env == "0":
        return False
    if not (
        x_BD.device.type == "cpu"
        and x_BD.dtype == W_enc_ND.dtype == b_enc_N.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and m < W_enc_ND.shape[0]
    ):
        return False
    if env == "1":
        return True
    return W_enc_ND.shape[0] >= _MIN_RATIO * m and cpu_has_fast_bf16()


def gamma(n: int) -> float:
    """Higham's γ_n bound on float32 summation of n terms, doubled for any blocked or
    paired accumulation order a matmul kernel may use."""
    return 2 * n * _U32 / (1 - 2 * n * _U32)


def clear() -> None:
    """Free the bfloat16 weight copy and the slab buffer."""
    screen_buffers.WEIGHTS.__init__()
    screen_buffers.SLAB.buf = None


def _slab_rows(N: int, D: int, budget: sparse_ops.ChunkBudget) -> int:
    """Rows per screen slab: the bfloat16 weight copy counts against the float32 path's
    slab budget, so the screen's resident memory is no more than the path it replaces."""
    left = budget.forward_bytes("cpu") - N * (D + 2) * 2
    return max(64, left // (2 * N))


def screened_topk(
    x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int, vals_BK: Tensor, idx_BK: Tensor,
    budget: sparse_ops.ChunkBudget = sparse_ops.DEFAULT_BUDGET,
) -> int:
    """Fill vals_BK / idx_BK with the float32 top-k of x W_encᵀ + b_enc (pre-ReLU) per row;
    returns how many rows fell back to the float32 matmul."""
    B, D = x_BD.shape
    N = W_enc_ND.shape[0]
    M = k + margin(k)
    if B == 0:
        return 0
    x_BD = x_BD.contiguous()
    Wa_ND2, consts = screen_buffers.WEIGHTS.make(W_enc_ND, b_enc_N)
    rows = min(B, _slab_rows(N, D, budget))
    buf = screen_buffers.SLAB.get(rows * N * 2)
    xa_CD2 = torch.empty(rows, D + 2, dtype=torch.bfloat16)
    xa_CD2[:, D:] = 1
    bad = []
    for s in range(0, B, rows):
        e = min(B, s + rows)
        bad_C = _screen_slab(
            x_BD[s:e], W_enc_ND, b_enc_N, Wa_ND2, consts, k, M,
            xa_CD2[: e - s], buf, vals_BK[s:e], idx_BK[s:e],
        )  # fmt: skip
        if bad_C.numel():
            bad.append(bad_C + s)
    # The failed rows of all slabs together: each float32 pass reads all of W_enc.
    bad_R = torch.cat(bad) if bad else idx_BK.new_empty(0)
    if bad_R.numel():
        _fallback(x_BD, W_enc_ND, b_enc_N, k, bad_R, buf, vals_BK, idx_BK)
    STATS["rows"] += B
    STATS["fallback_rows"] += bad_R.numel()
    return bad_R.numel()


def _screen_slab(
    x_CD: Tensor,
    W_ND: Tensor,
    b_N: Tensor,
    Wa_ND2: Tensor,
    consts: tuple[float, float, float, float],
    k: int,
    M: int,
    xa_CD2: Tensor,
    buf: Tensor,
    vals_CK: Tensor,
    idx_CK: Tensor,
) -> Tensor:
    """Screen, then the exact top k into vals/idx; returns the rows (slab-relative) that
    verification did not certify.

    The screen's top M (in ``screen_select.group_top``'s M groups) are only candidates:
    exact values are computed in two rounds. First for the k groups' maxima the screen
    ranks highest: k latents, so their smallest exact value V is a floor for the row's
    k-th. Then only for the candidates whose screened value s could still reach V, s ≥ c
    with c = V − (error bound): at k=128 on a fresh SAE ~60 more per row, against the M − k
    = 128 more the single round computed. Every latent left out has s ≤ c (or lies outside
    the groups, ≤ T ≤ c), so the row is certified when its k-th exact value exceeds the
    bound at c, which c is chosen to make true whenever c ≥ T.
    """
    C = x_CD.shape[0]
    s_CN = _screen(x_CD, Wa_ND2, xa_CD2, buf)
    e0_C = _error(x_CD, xa_CD2, consts)
    gmax_CM, grp_CM, s_CP, G = screen_select.group_top(s_CN, M)
    T_C = gmax_CM.min(dim=1).values.float()  # ≥ every screened value outside the groups

    # Round 1: the maxima of the k groups with the largest maxima (k distinct latents).
    grp_Ck = gmax_CM.topk(k, dim=1, sorted=False).indices
    g = s_CP.shape[1] // M
    # (max, not argmax: argmax over a middle dimension measured 4x slower)
    member_Ck = s_CP.view(C, g, M).gather(2, grp_Ck[:, None, :].expand(C, g, k)).max(dim=1).indices
    at_Ck = member_Ck * M + grp_Ck
    lat1_Ck = screen_select.columns(grp_CM, at_Ck, G)
    v1_Ck = sparse_ops.gathered_dot(W_ND, lat1_Ck, x_CD, 1).add_(b_N[lat1_Ck])
    V_C = v1_Ck.min(dim=1).values

    # Round 2: the other candidates with s ≥ c. A latent with s < c has a real value below
    # c + bound(c) < V; the factor leaves room for rounding in computing c itself.
    c_C = torch.maximum(V_C - (_bound(V_C, e0_C) - V_C) * (1 + 2**-5), T_C)
    # In bfloat16, against c rounded to nearest: no bfloat16 value lies in [c, bf16(c)),
    # so this takes every s ≥ c (and perhaps s = bf16(c) < c too), without a float copy.
    take_CP = s_CP >= c_C.to(s_CP.dtype)[:, None]
    take_CP.scatter_(1, at_Ck, False)
    n_C = take_CP.sum(dim=1)
    over_C = n_C > M  # near ties the screen cannot order: the float32 path is cheaper
    if bool(over_C.any()):
        take_CP[over_C] = False
        n_C.masked_fill_(over_C, 0)
    row_Q, at_Q = take_CP.nonzero(as_tuple=True)  # row by row, as ragged_dot reads them
    lat2_Q = grp_CM[row_Q, at_Q % M] + at_Q.div(M, rounding_mode="floor") * G
    v2_Q = screen_select.ragged_dot(W_ND, lat2_Q, n_C, x_CD).add_(b_N[lat2_Q])

    # The top k of both rounds: round 2's values in rows padded with −inf.
    R = int(n_C.max()) if C else 0
    v_CR = v1_Ck.new_full((C, k + R), float("-inf"))
    lat_CR = lat1_Ck.new_zeros(C, k + R)
    v_CR[:, :k], lat_CR[:, :k] = v1_Ck, lat1_Ck
    pos_Q = torch.arange(k, k + lat2_Q.numel()) - (n_C.cumsum(0) - n_C)[row_Q]
    v_CR[row_Q, pos_Q], lat_CR[row_Q, pos_Q] = v2_Q, lat2_Q
    top_CK, pos_CK = v_CR.topk(k, dim=1, sorted=False)
    torch.gather(lat_CR, 1, pos_CK, out=idx_CK)
    vals_CK.copy_(top_CK)
    STATS["exact"] += C * k + lat2_Q.numel()
    ok_C = top_CK.min(dim=1).values > _bound(c_C, e0_C)  # NaN/inf rows fail too
    return (~ok_C | over_C).nonzero().view(-1)


def _screen(x_CD: Tensor, Wa_ND2: Tensor, xa_CD2: Tensor, buf: Tensor) -> Tensor:
    """s̃ = bf16(x)·[bf16(W), b_hi, b_lo]ᵀ, the screen, in the slab buffer."""
    C, D = x_CD.shape
    N = Wa_ND2.shape[0]
    xa_CD2[:, :D].copy_(x_CD)
    s_CN = buf[: C * N * 2].view(torch.bfloat16).view(C, N)
    return torch.mm(xa_CD2, Wa_ND2.t(), out=s_CN)


def _error(x_CD: Tensor, xa_CD2: Tensor, consts: tuple[float, float, float, float]) -> Tensor:
    """The part of the bound that does not depend on the screened value (see ``_bound``)."""
    D = x_CD.shape[1]
    dw, wa, w, b_max = consts
    # Every latent j's real pre-activation p_j = x·w_j + b_j. Its screened value is bf16(a_j)
    # for the float32 accumulator a_j (torch's CPU bfloat16 matmul, oneDNN's or its own,
    # accumulates in float32 and rounds once, at the end), so a_j ≤ t + u|t| where
    # bf16(a_j) ≤ t (rounding is monotone). a_j is x̃a·w̃a_j (x̃ = bf16(x), w̃a_j = [bf16(w_j),
    # b_hi, b_lo]) to within γ_{D+2}·‖x̃a‖‖w̃a_j‖, and x̃a·w̃a_j − p_j = −δx·w̃_j − x·δw_j +
    # (b_hi + b_lo − b_j) with δx = x − x̃, δw_j = w_j − w̃_j: Cauchy–Schwarz with the norms
    # measured, and |b_j − b_hi − b_lo| ≤ u²|b_j|.
    x_C = x_CD.norm(dim=1)
    dx_C = (xa_CD2[:, :D].float() - x_CD).norm(dim=1)
    xa_C = (xa_CD2.float().pow(2).sum(dim=1)).sqrt()
    err_C = xa_C * (wa * gamma(D + 2)) + dx_C * wa + x_C * dw + (2 * _U * _U * b_max + _TINY)
    # The candidates' float32 values are within γ_{D+1}(‖x‖‖w_j‖ + |b_j|) of the real ones.
    return err_C.add_((x_C * w + b_max) * gamma(D + 1))


def _bound(t_C: Tensor, e0_C: Tensor) -> Tensor:
    """What no latent whose screened value is ≤ t can reach with its float32 value."""
    return t_C + (t_C.abs() * _U + e0_C) * (_BOUND_SCALE * (1 + 2**-10))  # slack: float32 here


def _candidates(
    x_CD: Tensor,
    W_ND: Tensor,
    b_N: Tensor,
    Wa_ND2: Tensor,
    consts: tuple[float, float, float, float],
    M: int,
    xa_CD2: Tensor,
    buf: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(v_CM, cand_CM, bound_C): each row's top M latents by the bf16 screen, their exact
    float32 pre-activations, and a bound no other latent's real pre-activation exceeds."""
    s_CN = _screen(x_CD, Wa_ND2, xa_CD2, buf)
    s_CM, cand_CM = screen_select.grouped_topk(s_CN, M)
    T_C = s_CM.min(dim=1).values.float()  # ≥ every non-candidate's screened value
    v_CM = sparse_ops.gathered_dot(W_ND, cand_CM, x_CD, 1).add_(b_N[cand_CM])
    return v_CM, cand_CM, _bound(T_C, _error(x_CD, xa_CD2, consts))


def screened_candidates(
    x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, m: int, *, again: bool = False,
    budget: sparse_ops.ChunkBudget = sparse_ops.DEFAULT_BUDGET,
) -> tuple[Tensor, Tensor, Tensor]:
    """(vals_BM, idx_BM, bound_B): each row's top m latents by the bfloat16 screen, their
    float32 pre-activations x·w_j + b_j (as the float32 path computes them), and a bound
    that the pre-activation of every latent not among them stays below (NaN for a NaN
    row): for a selection that needs every value above some cut-off, not an exact top m
    (BatchTopK's), so no margin of extra candidates. ``again``: a second call within one
    function, with W and b unchanged, reuses the bfloat16 copy of the first."""
    B, D = x_BD.shape
    N = W_enc_ND.shape[0]
    x_BD = x_BD.contiguous()
    Wa_ND2, consts = screen_buffers.WEIGHTS.make(W_enc_ND, b_enc_N, again=again)
    rows = max(1, min(B, _slab_rows(N, D, budget)))
    buf = screen_buffers.SLAB.get(rows * N * 2)
    xa_CD2 = torch.empty(rows, D + 2, dtype=torch.bfloat16)
    xa_CD2[:, D:] = 1
    parts = [
        _candidates(x_BD[s : s + rows], W_enc_ND, b_enc_N, Wa_ND2, consts, m, xa_CD2[: min(B, s + rows) - s], buf)
        for s in range(0, B, rows)
    ]
    STATS["rows"] += B
    if not parts:
        return x_BD.new_empty(0, m), torch.empty(0, m, dtype=torch.long), x_BD.new_empty(0)
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))  # type: ignore[return-value]


def _fallback(
    x_BD: Tensor, W_ND: Tensor, b_N: Tensor, k: int, rows_R: Tensor, buf: Tensor,
    vals_BK: Tensor, idx_BK: Tensor,
) -> None:  # fmt: skip
    """The float32 reference for the given rows, in the slab buffer viewed as float32."""
    N = W_ND.shape[0]
    step = max(1, buf.numel() // (4 * N))
    for s in range(0, rows_R.numel(), step):
        r = rows_R[s : s + step]
        pre_RN = buf[: r.numel() * N * 4].view(torch.float32).view(r.numel(), N)
        torch.addmm(b_N, x_BD[r], W_ND.t(), out=pre_RN)
        v_RK, i_RK = torch.topk(pre_RN, k, dim=1, sorted=False)
        vals_BK[r] = v_RK
        idx_BK[r] = i_RK
