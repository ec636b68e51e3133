"""TopK encode and decode as autograd functions whose backward touches only the k active latents."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels import screen
from llm_sae.kernels.sparse_ops import (
    DEFAULT_BUDGET,
    PRE_ACTS,
    ChunkBudget,
    chunk_rows,
    fwd_chunk_rows,
    gathered_dot,
    record_weight_grad,
    sparse_t_dense,
    weighted_row_sum,
)


# Triton dispatch: the kernels live in llm_sae/kernels/triton.py; the torch code here stays
# the reference they are tested against. CUDA tensors take the Triton path whenever triton
# imports; CPU tensors only under LLM_SAE_TRITON=1 TRITON_INTERPRET=1.
def use_triton(t: Tensor) -> bool:
    import llm_sae.kernels.triton as triton_kernels

    return triton_kernels.usable_for(t)


def use_fused_topk(t: Tensor) -> bool:
    """The fused encoder + top-k kernel (``kernels/fused_topk.py``): opt-in with
    ``LLM_SAE_FUSED_TOPK=1`` until a GPU benchmark says it wins; on the CPU only under
    the Triton interpreter (tests)."""
    if os.environ.get("LLM_SAE_FUSED_TOPK") != "1":
        return False
    import llm_sae.kernels.triton as triton_kernels

    if t.device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and triton_kernels.available()
    return t.device.type == "cuda" and triton_kernels.available()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class TopKEncode(torch.autograd.Function):
    """ReLU(x W_encᵀ + b_enc) restricted to its top k entries; sparse backward."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int, budget: ChunkBudget,  # type: ignore[override]
                center_D: Tensor | None = None):  # fmt: skip
        B, N = x_BD.shape[0], W_enc_ND.shape[0]
        ctx.budget = budget
        if center_D is not None:
            x_BD = x_BD - center_D
        vals_BK = x_BD.new_empty(B, k)
        idx_BK = torch.empty(B, k, dtype=torch.long, device=x_BD.device)

        if use_fused_topk(x_BD):
            from llm_sae.kernels.fused_topk import fused_topk_encode

            vals, idx = fused_topk_encode(x_BD, W_enc_ND, b_enc_N, k)
            vals_BK.copy_(vals)
            idx_BK.copy_(idx)
            return TopKEncode._finish(ctx, x_BD, W_enc_ND, vals_BK, idx_BK)
        if screen.use_screen(x_BD, W_enc_ND, b_enc_N, k):
            screen.screened_topk(x_BD, W_enc_ND, b_enc_N, k, vals_BK, idx_BK, budget)
            return TopKEncode._finish(ctx, x_BD, W_enc_ND, vals_BK, idx_BK)
        chunk = fwd_chunk_rows(N, x_BD, budget)
        pre_CN = PRE_ACTS.get(min(chunk, B), N, x_BD)
        W_enc_DN = W_enc_ND.t()
        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            torch.addmm(b_enc_N, x_BD[s:e], W_enc_DN, out=pre_CN[: e - s])
            # top-k then ReLU on the k values equals ReLU then top-k (ReLU is monotone)
            # and skips a dense pass over the pre-activations.
            torch.topk(pre_CN[: e - s], k, dim=1, sorted=False, out=(vals_BK[s:e], idx_BK[s:e]))
        return TopKEncode._finish(ctx, x_BD, W_enc_ND, vals_BK, idx_BK)

    @staticmethod
    def _finish(ctx, x_BD: Tensor, W_enc_ND: Tensor, vals_BK: Tensor, idx_BK: Tensor):
        vals_BK.clamp_(min=0)  # non-positive winners become exact zeros
        ctx.save_for_backward(x_BD, W_enc_ND, vals_BK, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_vals_BK: Tensor, _grad_idx: Tensor | None):  # type: ignore[override]
        x_BD, W_enc_ND, vals_BK, idx_BK = ctx.saved_tensors
        # ReLU's derivative: zero where the winner was not positive.
        g_BK = torch.where(vals_BK > 0, grad_vals_BK, 0).to(W_enc_ND.dtype)
        need_x, need_W, need_b, _, _, need_c = ctx.needs_input_grad
        grad_x, grad_W, grad_b = pair_grads(x_BD, W_enc_ND, g_BK, idx_BK, (need_x, need_W, need_b or need_c), ctx.budget)
        # x − c reaches every pair's pre-activation: ∂L/∂c = −Σ_b ∂L/∂x_b = −Σ_j (∂L/∂b_j) w_j,
        # one pass over W_enc instead of the B·k rows of ∂L/∂x (which x, data, seldom needs).
        grad_c = -(grad_b.to(W_enc_ND.dtype) @ W_enc_ND) if need_c else None
        return grad_x, grad_W, grad_b if need_b else None, None, None, grad_c


def pair_grads(
    x_BD: Tensor, W_enc_ND: Tensor, g_BK: Tensor, idx_BK: Tensor, needs: tuple[bool, ...],
    budget: ChunkBudget = DEFAULT_BUDGET,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad x, grad W_enc, grad b_enc) of pre[b, k] = x[b]·W_enc[idx[b, k]] + b_enc[idx[b, k]]
    given g = ∂L/∂pre: O(B·K·D) work, and W_enc's gradient deferred when a trainer collects."""
    if use_triton(W_enc_ND):  # Triton dispatch (see use_triton)
        import llm_sae.kernels.triton as triton_kernels

        return triton_kernels.encode_backward(x_BD, W_enc_ND, g_BK, idx_BK, needs)
    chunk = chunk_rows(idx_BK.shape[1], x_BD.shape[1], x_BD.element_size(), budget)
    grad_x = grad_W = grad_b = None
    if needs[0]:
        grad_x = weighted_row_sum(W_enc_ND, idx_BK, g_BK)
    if needs[1] and not record_weight_grad(W_enc_ND, idx_BK, g_BK, x_BD):
        grad_W = sparse_t_dense(idx_BK, g_BK, x_BD, W_enc_ND.shape[0], chunk)
    if needs[2]:
        grad_b = torch.zeros(W_enc_ND.shape[0], dtype=g_BK.dtype, device=g_BK.device)
        grad_b.index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
    return grad_x, grad_W, grad_b


class PairPreActs(torch.autograd.Function):
    """pre[b, k] = x[b]·W_enc[idx[b, k]] + b_enc[idx[b, k]] at given pairs; sparse backward.

    For a selection made elsewhere (AuxK's top k over the dead latents, BatchTopK's top
    k·B of a batch): the values and gradients of exactly the chosen pairs, through the
    same sparse kernels (and deferred weight gradients) as ``TopKEncode``."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, idx_BK: Tensor):  # type: ignore[override]
        chunk = chunk_rows(idx_BK.shape[1], x_BD.shape[1], x_BD.element_size())
        pre_BK = gathered_dot(W_enc_ND, idx_BK, x_BD.contiguous(), chunk).add_(b_enc_N[idx_BK])
        ctx.save_for_backward(x_BD, W_enc_ND, idx_BK)
        return pre_BK

    @staticmethod
    def backward(ctx, grad_BK: Tensor):  # type: ignore[override]
        x_BD, W_enc_ND, idx_BK = ctx.saved_tensors
        g_BK = grad_BK.to(W_enc_ND.dtype).contiguous()
        return (*pair_grads(x_BD, W_enc_ND, g_BK, idx_BK, ctx.needs_input_grad[:3]), None)


def pair_pre_acts(x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, idx_BK: Tensor) -> Tensor:
    """x[b]·W_enc[idx[b, k]] + b_enc[idx[b, k]] for each (b, k): [B, K], float32 even under
    autocast (a few dot products per row; no cast copy of W_enc), sparse backward."""
    _check("W_enc_ND", W_enc_ND, 2)
    if idx_BK.shape[:-1] != x_BD.shape[:-1]:
        raise ValueError(f"idx {tuple(idx_BK.shape)} does not match x {tuple(x_BD.shape)}")
    with torch.autocast(x_BD.device.type, enabled=False):
        return PairPreActs.apply(x_BD.to(W_enc_ND.dtype), W_enc_ND, b_enc_N, idx_BK)


class TopKDecode(torch.autograd.Function):
    """x_hat[b] = Σ_k vals[b, k] · W_dec[idx[b, k]]; sparse backward."""

    @staticmethod
    def forward(ctx, vals_BK: Tensor, idx_BK: Tensor, W_dec_ND: Tensor, budget: ChunkBudget):  # type: ignore[override]
        ctx.save_for_backward(vals_BK, idx_BK, W_dec_ND)
        ctx.budget = budget
        if use_triton(W_dec_ND):  # Triton dispatch (see use_triton)
            import llm_sae.kernels.triton as triton_kernels

            return triton_kernels.decode_forward(vals_BK, idx_BK, W_dec_ND)
        return weighted_row_sum(W_dec_ND, idx_BK, vals_BK.to(W_dec_ND.dtype))

    @staticmethod
    def backward(ctx, grad_out_BD: Tensor):  # type: ignore[override]
        vals_BK, idx_BK, W_dec_ND = ctx.saved_tensors
        grad_out_BD = grad_out_BD.contiguous()
        if use_triton(W_dec_ND):  # Triton dispatch (see use_triton)
            import llm_sae.kernels.triton as triton_kernels

            need = ctx.needs_input_grad
            gv, gw = triton_kernels.decode_backward(
                vals_BK, idx_BK, W_dec_ND, grad_out_BD, need[0], need[2]
            )
            return gv, None, gw, None
        chunk = chunk_rows(idx_BK.shape[1], W_dec_ND.shape[1], W_dec_ND.element_size(), ctx.budget)
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = gathered_dot(W_dec_ND, idx_BK, grad_out_BD, chunk).to(vals_BK.dtype)
        if ctx.needs_input_grad[2]:
            coef_BK = vals_BK.to(W_dec_ND.dtype)
            if not record_weight_grad(W_dec_ND, idx_BK, coef_BK, grad_out_BD):
                grad_W = sparse_t_dense(idx_BK, coef_BK, grad_out_BD, W_dec_ND.shape[0], chunk)
        return grad_vals, None, grad_W, None


def _check(name: str, t: Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def topk_encode(
    x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int, *, budget: ChunkBudget = DEFAULT_BUDGET,
    center_D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k of ReLU((x − center) W_encᵀ + b_enc) per row, as (vals_BK, idx_BK); sparse
    backward.

    Values are ≥ 0 (a row with fewer than k positive pre-activations gets zeros), in no
    particular order. Gradients flow to x, W_enc, b_enc and ``center`` (an SAE's b_dec)
    through the k entries only; passing the centre here rather than x − center spares the
    B·k-row gradient of x where x (data) needs none. ``budget`` bounds the temporaries of
    each slab of rows, forward and backward.
    """
    _check("W_enc_ND", W_enc_ND, 2)
    _check("b_enc_N", b_enc_N, 1)
    lead = x_BD.shape[:-1]
    if not 0 < k <= W_enc_ND.shape[0]:
        raise ValueError(f"k={k} must be in 1..n_latents={W_enc_ND.shape[0]}")
    x_BD = x_BD.reshape(-1, x_BD.shape[-1])
    amp = _autocast_dtype(x_BD.device.type)
    if amp is not None:
        # Under autocast the encoder matmul runs in the autocast dtype (ops with out= are
        # not autocast by torch), on cast copies of the float32 master weights; the casts'
        # backward returns the gradients to the masters in float32.
        x_BD, W_enc_ND, b_enc_N = x_BD.to(amp), W_enc_ND.to(amp), b_enc_N.to(amp)
        center_D = None if center_D is None else center_D.to(amp)
    vals_BK, idx_BK = TopKEncode.apply(x_BD, W_enc_ND, b_enc_N, k, budget, center_D)
    return vals_BK.view(*lead, k), idx_BK.view(*lead, k)


def topk_decode(
    vals_BK: Tensor, idx_BK: Tensor, W_dec_ND: Tensor, *, budget: ChunkBudget = DEFAULT_BUDGET
) -> Tensor:
    """Σ_k vals[..., k] · W_dec[idx[..., k]] (no bias); sparse backward to vals and W_dec."""
    _check("W_dec_ND", W_dec_ND, 2)
    if vals_BK.shape != idx_BK.shape:
        raise ValueError(f"vals {tuple(vals_BK.shape)} and idx {tuple(idx_BK.shape)} differ")
    lead, K = vals_BK.shape[:-1], vals_BK.shape[-1]
    x_BD = TopKDecode.apply(vals_BK.reshape(-1, K), idx_BK.reshape(-1, K), W_dec_ND, budget)
    return x_BD.view(*lead, W_dec_ND.shape[1])


def dense_topk_encode(
    x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Reference for ``topk_encode``: plain autograd through a dense ReLU and ``torch.topk``."""
    pre_BN = F.relu(x_BD @ W_enc_ND.t() + b_enc_N)
    return pre_BN.topk(k, dim=-1, sorted=False)


def dense_topk_decode(vals_BK: Tensor, idx_BK: Tensor, W_dec_ND: Tensor) -> Tensor:
    """Reference for ``topk_decode``: scatter into dense [B, N] latents, then a dense matmul."""
    z_BN = vals_BK.new_zeros(*vals_BK.shape[:-1], W_dec_ND.shape[0]).scatter(-1, idx_BK, vals_BK)
    return z_BN @ W_dec_ND


def clear_workspace() -> None:
    """Free the cached pre-activation buffers (e.g. after training, before analysis)."""
    PRE_ACTS.buf = None
    screen.clear()
