"""The (token, latent) pairs whose pre-activation clears a per-latent threshold, found
without a float32 [B, N] tensor: JumpReLU's gate on the sparse kernels.

JumpReLU keeps the pairs with pre > θ_j, and its threshold's straight-through gradient
reads the pairs within ε/2 of θ_j: every pair with pre above lo_j = θ_j − ε/2 (relative to
the row's scale early in training). A dense gate reads and writes the [B, N] float32
pre-activations several times (the compare, the near-threshold mask, their sums: 3-6x
TopK's step on a CPU). Here, on CPUs with bfloat16 dot-product units, the encoder runs as
the TopK screen does (``screen``): a bfloat16 matmul with float32 accumulation, whose extra
columns fold in the bias, the row's scale times the latent's threshold and the row's error
bound, so that a pair is a candidate exactly when its screened value is positive (one
integer compare of the bfloat16 bits). The candidates' float32 pre-activations are then
computed as sampled dot products (an SDDMM on their pattern), and the caller applies the
exact rule to them. Elsewhere (GPUs, float64, autocast) the dense pre-activations pick the
candidates. The folding of a batch's variable-length rows into virtual rows for the
sparse kernels is ``fold_rows``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels import screen
from llm_sae.kernels.batch_topk import choose_width
from llm_sae.kernels.screen_buffers import cast_rows
from llm_sae.kernels.screen_select import ragged_dot

_U = 2.0**-8  # bfloat16 unit roundoff
_TINY = 2.0**-100  # bfloat16 dot-product units flush subnormals; values above this stay positive
RELATIVE_SLACK = 2.0**-16
"""Candidates also take pairs up to this fraction of σ_b·(|lo| + 1) below the cut: far more
than the float32 rounding of the caller's own test (pre / σ against θ and θ ± ε/2)."""
BOUND_SCALE = 1.0
"""Multiplies the screen's error bound: 1 is the proof, tests set 0 to see it matters."""
EXTRA = 6
"""The screen's extra columns: b_hi, b_lo, three for σ_b·lo_j in bfloat16 pieces, the bound."""
SLAB_BYTES = 8 * 2**20
"""The bfloat16 [R, C] block of screened values: R rows (at most ROWS) by C latents."""
ROWS = 2048


class _Copy(threading.local):
    def __init__(self) -> None:
        self.Wa: Tensor | None = None


_COPY = _Copy()


def clear() -> None:
    """Free the bfloat16 weight copy."""
    _COPY.Wa = None


def threshold_pairs(
    x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, lo_N: Tensor, scale_B: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows_P, cols_P, pre_P): every pair (b, j) with (x_b·w_j + b_j) / scale_b > lo_j
    (scale 1 without ``scale_B``), and possibly some just below, in row-major order (rows
    ascending, columns ascending within a row); pre_P their float32 pre-activations x_b·w_j +
    b_j (raw, not divided by the scale), as the dense float32 path would give them (within
    float32 summation order). Under autocast the dense pre-activations are in low
    precision and pick the candidates; their values are then recomputed in float32."""
    with torch.no_grad():
        found = _screened(x_BD, W_enc_ND, b_enc_N, lo_N, scale_B) if _screens(x_BD, W_enc_ND, b_enc_N) else None
        if found is not None:
            rows_P, cols_P = found
            return rows_P, cols_P, pair_values(x_BD, W_enc_ND, b_enc_N, rows_P, cols_P)
        pre_BN = F.linear(x_BD, W_enc_ND, b_enc_N)
        rel_BN = pre_BN if scale_B is None else pre_BN / scale_B[:, None]
        rows_P, cols_P = (rel_BN > lo_N.to(rel_BN.dtype)).nonzero(as_tuple=True)
        del rel_BN
        if pre_BN.dtype != W_enc_ND.dtype:  # autocast: the values in the weights' precision
            return rows_P, cols_P, pair_values(x_BD.to(W_enc_ND.dtype), W_enc_ND, b_enc_N, rows_P, cols_P)
        return rows_P, cols_P, pre_BN[rows_P, cols_P]


def _screens(x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor) -> bool:
    """The screen's conditions (float32 on a CPU with bfloat16 units, no autocast, or
    LLM_SAE_SCREEN=1), for a gate that keeps a small part of the latents."""
    return screen.screen_pays(x_BD, W_enc_ND, b_enc_N, max(1, W_enc_ND.shape[0] // 64))


def pair_values(x_BD: Tensor, W_ND: Tensor, b_N: Tensor | None, rows_P: Tensor, cols_P: Tensor) -> Tensor:
    """x[rows_P[p]]·W[cols_P[p]] (+ b[cols_P[p]]) for pairs in row-major order: one sampled
    dense-dense product on their CSR pattern on a CPU, gathered rows elsewhere."""
    B, P = x_BD.shape[0], rows_P.numel()
    if P == 0:
        return x_BD.new_empty(0)
    if x_BD.device.type == "cpu":
        out = ragged_dot(W_ND, cols_P, torch.bincount(rows_P, minlength=B), x_BD.contiguous())
        return out if b_N is None else out.add_(b_N[cols_P])
    step = max(1, 2**22 // max(1, x_BD.shape[1]))
    out = torch.empty(P, dtype=W_ND.dtype, device=W_ND.device)
    for s in range(0, P, step):
        r, c = rows_P[s : s + step], cols_P[s : s + step]
        out[s : s + step] = torch.linalg.vecdot(W_ND.index_select(0, c), x_BD.index_select(0, r))
    return out if b_N is None else out.add_(b_N[cols_P])


def near_probe(x_hat_BE: Tensor, theta_N: Tensor, W_dec_NE: Tensor, rows_Q: Tensor, cols_Q: Tensor, coef_Q: Tensor) -> Tensor:
    """x̂ itself, and in the backward θ's straight-through gradient from the pairs within
    ε/2 of θ that do not fire: θ_j gets Σ coef_q·(W_dec[j]·g_b) over its pairs (b, j), g
    the gradient of x̂. Such a pair decodes 0 (no gradient to W_dec, x or its value), so it
    needs no place in the decode: one sampled dot product each, in the backward."""
    return _NearProbe.apply(x_hat_BE, theta_N, W_dec_NE, rows_Q, cols_Q, coef_Q)


class _NearProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat_BE: Tensor, theta_N: Tensor, W_dec_NE: Tensor, rows_Q: Tensor, cols_Q: Tensor, coef_Q: Tensor):  # type: ignore[override]
        ctx.save_for_backward(W_dec_NE, rows_Q, cols_Q, coef_Q)
        ctx.theta = (theta_N.shape, theta_N.dtype)
        return x_hat_BE.view_as(x_hat_BE)

    @staticmethod
    def backward(ctx, g_BE: Tensor):  # type: ignore[override]
        W_NE, rows_Q, cols_Q, coef_Q = ctx.saved_tensors
        g_theta = None
        if ctx.needs_input_grad[1]:
            gz_Q = pair_values(g_BE.to(W_NE.dtype), W_NE, None, rows_Q, cols_Q)
            g_theta = torch.zeros(*ctx.theta[0], dtype=torch.float32, device=g_BE.device)
            g_theta = g_theta.index_add_(0, cols_Q, (gz_Q * coef_Q).float()).to(ctx.theta[1])
        return g_BE, g_theta, None, None, None, None


def _screened(x_BD: Tensor, W_ND: Tensor, b_N: Tensor, lo_N: Tensor, scale_B: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The candidates by the bfloat16 screen (None for weights so large, ~1000× a unit row,
    that the bound below does not cover its own column): a superset of the pairs with
    x_b·w_j + b_j > σ_b·lo_j − slack_b (σ the row's scale, slack ``RELATIVE_SLACK``'s).

    Each screened value is bf16(acc), acc the float32 accumulation of x̃a_b·w̃a_j with
    x̃a_b = [bf16(x_b), 1, 1, σ_hi, σ_hi, σ_lo, E_b], w̃a_j = [bf16(w_j), b_hi, b_lo, −λ_hi,
    −λ_lo, −λ_hi, 1] (λ = lo, each split into a bfloat16 head and the bfloat16 rounding of
    the rest). acc differs from p − σλ + E (p the real pre-activation) by at most the
    accumulation error γ‖x̃a‖‖w̃a_j‖, the rounding of x and w (‖δx‖‖bf16(w_j)‖ + ‖x‖‖δw_j‖), of
    the bias (2u²|b|) and of σλ's pieces (5u²σ|λ|), the bound the TopK screen uses (``screen._error``).
    E_b exceeds those plus the slack and 2·_TINY, so every pair above the cut has acc >
    _TINY, and its bfloat16 value is positive: its bits, read as int16, are > 0."""
    B, D = x_BD.shape
    N = W_ND.shape[0]
    Wa, (dw, wd, wa, b_max, lam_max) = _weights(W_ND, b_N, lo_N)
    g_acc = screen.gamma(D + EXTRA)
    if g_acc * wa > 0.1:  # the bound's one-step cover of E's own error needs this: dense instead
        return None
    xa = _rows(x_BD.contiguous(), x_BD.new_ones(B) if scale_B is None else scale_B.float(),
               (dw, wd, wa, b_max, lam_max), g_acc)  # fmt: skip
    # Blocks of latents for all rows (a block of W is packed for the matmul once; row
    # slabs repack all of W for each), of rows too for large batches.
    rows = min(B, ROWS)
    cols = max(1, min(N, SLAB_BYTES // (2 * max(1, rows))))
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    mask = torch.empty(rows, cols, dtype=torch.bool)
    keys = []
    for s in range(0, B, rows):
        e = min(B, s + rows)
        for c in range(0, N, cols):
            f = min(N, c + cols)
            s_RC = torch.mm(xa[s:e], Wa[c:f].t(), out=out[: e - s, : f - c])
            m_RC = torch.gt(s_RC.view(torch.int16), 0, out=mask[: e - s, : f - c])
            r, j = m_RC.nonzero(as_tuple=True)
            keys.append((r + s) * N + (j + c))
    key_P = torch.cat(keys).sort().values if keys else torch.empty(0, dtype=torch.long)
    return key_P // N, key_P % N


def _rows(x_BD: Tensor, sig_B: Tensor, consts: tuple[float, float, float, float, float], g_acc: float) -> Tensor:
    """[B, D + EXTRA] bfloat16 [x | 1 | 1 | σ_hi | σ_hi | σ_lo | E]: each row's side of the
    screen, with E its bound (``_screened``)."""
    B, D = x_BD.shape
    dw, wd, wa, b_max, lam_max = consts
    xa = torch.empty(B, D + EXTRA, dtype=torch.bfloat16)
    xa[:, :D].copy_(x_BD)
    xa[:, D : D + 2] = 1
    sig_hi = sig_B.to(torch.bfloat16)
    xa[:, D + 2], xa[:, D + 3] = sig_hi, sig_hi
    xa[:, D + 4] = sig_B - sig_hi.float()
    x_B = x_BD.norm(dim=1)
    xf_BD = xa[:, :D].float()
    base_B = (xf_BD.norm(dim=1).square_() + xa[:, D : D + 5].float().square().sum(1)).sqrt_()
    dx_B = xf_BD.sub_(x_BD).norm(dim=1)
    slack_B = (sig_B * (lam_max + 1)) * RELATIVE_SLACK
    err_B = base_B * (wa * g_acc) + dx_B * wd + x_B * dw + 2 * _U * _U * b_max + 5 * _U * _U * sig_B * lam_max
    E_B = (err_B * BOUND_SCALE + slack_B + 2 * _TINY) * (1 + 2**-10)
    # E enters ‖x̃a‖ too: one more accumulation error of γ·wa·E (≤ 0.1·E) covers it; and
    # bfloat16's round-to-nearest below.
    xa[:, D + 5] = (E_B * (1 + 2 * g_acc * wa)) * (1 + 2**-6)
    return xa


def _weights(W_ND: Tensor, b_N: Tensor, lo_N: Tensor) -> tuple[Tensor, tuple[float, float, float, float, float]]:
    """[N, D + EXTRA] bfloat16 [W | b_hi | b_lo | −λ_hi | −λ_lo | −λ_hi | 1] in a buffer kept
    across calls (remade every call: the weights change each step), and (max ‖w − bf16(w)‖,
    max ‖bf16(w)‖, max ‖w̃a_j‖, max |b|, max |λ|)."""
    N, D = W_ND.shape
    Wa = _COPY.Wa
    if Wa is None or Wa.shape != (N, D + EXTRA):
        _COPY.Wa = None
        Wa = _COPY.Wa = torch.empty(N, D + EXTRA, dtype=torch.bfloat16)
    Wa[:, D].copy_(b_N)
    Wa[:, D + 1].copy_(b_N - Wa[:, D].float())
    lo = lo_N.float()
    Wa[:, D + 2].copy_(-lo)
    Wa[:, D + 3].copy_(-(lo + Wa[:, D + 2].float()))
    Wa[:, D + 4].copy_(Wa[:, D + 2])
    Wa[:, D + 5] = 1
    wd_N, dw_N = cast_rows(W_ND, Wa)
    if not N:
        return Wa, (0.0, 0.0, 0.0, 0.0, 0.0)
    wd, dw = float(wd_N.max()), float(dw_N.max())
    wa = float(wd_N.square_().add_(Wa[:, D:].float().square().sum(dim=1)).max().sqrt())
    b_max = float(b_N.abs().max()) if N else 0.0
    lam_max = float(lo.abs().max()) if N else 0.0
    return Wa, (dw, wd, wa, b_max, lam_max)


def fold_rows(rows_P: Tensor, B: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """(rows_V, v_P, j_P, J): pairs in row-major order, given by their rows, laid out as V
    virtual rows of J slots for the sparse kernels: pair p goes to slot j_P[p] of virtual
    row v_P[p], a part of row rows_V[v] of the batch. A row's pairs fill ⌈count/J⌉ virtual
    rows; J is ``batch_topk.choose_width``'s (the fewest slots plus a cost per row)."""
    dev = rows_P.device
    count_B = torch.bincount(rows_P, minlength=B)
    J = choose_width(count_B[None], max(1, int(count_B.max())) if B else 1)
    nv_B = (count_B + J - 1) // J
    rows_V = torch.repeat_interleave(torch.arange(B, device=dev), nv_B)
    first_B, start_B = nv_B.cumsum(0) - nv_B, count_B.cumsum(0) - count_B
    pos_P = torch.arange(rows_P.numel(), device=dev) - start_B[rows_P]
    return rows_V, first_B[rows_P] + pos_P // J, pos_P % J, J
