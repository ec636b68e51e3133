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

On a CPU with bfloat16 units (``screen.cpu_has_fast_bf16``) the products run in bfloat16
with float32 accumulation (``compute_dtype``): ~6× the float32 rate there, which takes a
step with 10% of the latents dead from ~1.6× to ~1.25× a clean one (BENCHMARKS.md). AuxK
is an auxiliary loss (default weight 1/32) whose gradient only turns the dead latents
towards the residual, and its fit scale is not differentiated, so ~2⁻⁸ relative error in
its values and gradients, and another choice between dead latents whose pre-activations
lie within that error of each other, do not change what it does (``bench recovery``
before and after, BENCHMARKS.md). ê, the loss, the fit scale, the residuals and the
[M, D] gradient blocks stay float32 (the input is kept in bfloat16 for the backward).
``LLM_SAE_AUXK_BF16`` = 0 keeps every product in float32, = 1 forces bfloat16 where the
CPU flags are missing (for tests).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from llm_sae.kernels.screen import cpu_has_fast_bf16
from llm_sae.kernels.sparse_ops import record_weight_rows

# Rows of the batch per dense [C, M] slab: bounds the step's extra memory at 10% dead
# (M = 2458) to a few slabs of ~10 MB instead of [B, M] tensors of 40 MB.
SLAB_BYTES = 8 * 2**20


def _slab_rows(B: int, most: int) -> int:
    """Rows per slab, at most ``most``: B in equal slabs where a divisor of B gives at most
    twice the fewest slabs, else ``most``. oneDNN keeps a primitive, and memory with it, per
    shape a bfloat16 product has run at; a short last slab doubles the shapes (Matryoshka's
    step peak at 10% dead: 1.55× the floor with slabs of 4·426 + 344 rows, 1.52× with 8·256)."""
    most = max(1, min(B, most))
    fewest = max(1, -(-B // most))
    for n in range(fewest, 2 * fewest + 1):
        if B % n == 0:
            return max(1, B // n)
    return most


def compute_dtype(W_ND: Tensor) -> torch.dtype:
    """The dtype of AuxK's products for weights ``W_ND``: bfloat16 for float32 weights on
    a CPU with bfloat16 units (not on GPUs, whose float32 products are cheap beside the
    step), else the weights' own (module docstring; ``LLM_SAE_AUXK_BF16``)."""
    env = os.environ.get("LLM_SAE_AUXK_BF16", "")
    if env == "0" or W_ND.device.type != "cpu" or W_ND.dtype != torch.float32:
        return W_ND.dtype
    return torch.bfloat16 if env == "1" or cpu_has_fast_bf16() else W_ND.dtype


def _workspace(dtype: torch.dtype, device: torch.device, *shapes: tuple[int, ...]) -> list[Tensor]:
    """Tensors of these shapes as views of one allocation. glibc serves blocks of 4 MB and
    more from mmap and gives them back on free (``return_large_blocks_to_os``); the
    bfloat16 buffers are half the float32 ones' size, below that, and separately they
    stayed on its fragmenting heap (Matryoshka's step peak at 10% dead: 1.51× → 1.59×
    the floor)."""
    sizes = [-(-math.prod(sh) // 32) * 32 for sh in shapes]  # each view 64-byte aligned (bf16)
    parts = torch.empty(sum(sizes), dtype=dtype, device=device).split(sizes)
    return [t[: math.prod(sh)].view(sh) for t, sh in zip(parts, shapes, strict=True)]


def gather_rows(W_ND: Tensor, rows_M: Tensor, out_MD: Tensor) -> Tensor:
    """out = W[rows], cast to out's dtype through a cache-sized buffer of rows in W's
    dtype (0.9 ms for 2458 rows of 768 floats, against 6 ms through one [M, D] float32
    gather: its fresh pages, then a second pass from memory)."""
    if W_ND.dtype == out_MD.dtype:
        return torch.index_select(W_ND, 0, rows_M, out=out_MD)
    step = max(1, 2**18 // (W_ND.element_size() * max(1, W_ND.shape[1])))
    buf_RD = W_ND.new_empty(min(step, rows_M.numel()), W_ND.shape[1])
    for s in range(0, rows_M.numel(), step):
        r = rows_M[s : s + step]
        out_MD[s : s + r.numel()].copy_(torch.index_select(W_ND, 0, r, out=buf_RD[: r.numel()]))
    return out_MD


def _bits(t: Tensor) -> Tensor:
    """A bfloat16 tensor as its int16 bits, else the tensor: torch's CPU scatter, clamp and
    masking run 2-60× slower on bfloat16 than on int16, and for values ≥ 0 (and the
    clamp at 0, and masking by 0/1) the bits give the same result."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _acc_mm(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc = a·b for the first slab, else acc += a·b, in acc's dtype (a bfloat16 block is
    rounded once a slab and made float32 at the end: cheaper than adding each slab's
    product to a float32 block)."""
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def _grad_blocks(cd: torch.dtype, W_dtype: torch.dtype, ws: list[Tensor], shapes: list[tuple[int, int]]) -> list[Tensor]:
    """The [M, ·] gradient accumulators: views of the workspace ``ws`` when the products
    run in another dtype than W's (made W's at the end), else blocks of their own (they
    outlive the pass as the deferred gradients; a view would keep the workspace)."""
    if cd != W_dtype:
        return ws
    return [torch.empty(sh, dtype=W_dtype, device=ws[0].device) for sh in shapes]


class DeadDecode(torch.autograd.Function):
    """ê[b] = Σ over b's top k_aux dead latents j of ReLU(pre[b, j]) · W_dec[j]."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_ND: Tensor, dead_M: Tensor, k_aux: int):  # type: ignore[override]
        (B, D), M, E = x_BD.shape, dead_M.numel(), W_dec_ND.shape[1]
        cd = x_BD.dtype  # the products' (``dead_decode``); ê and the gradients are W's
        step = _slab_rows(B, SLAB_BYTES // max(1, x_BD.element_size() * M))
        We_MD, Wd_ME, pre_SM, dec_SE = _workspace(cd, x_BD.device, (M, D), (M, E), (step, M), (step, E))
        gather_rows(W_enc_ND, dead_M, We_MD)
        gather_rows(W_dec_ND, dead_M, Wd_ME)
        be_M = b_enc_N[dead_M].to(cd)
        e_BE = W_dec_ND.new_empty(B, E)
        vals_BK = x_BD.new_empty(B, k_aux)
        pos_BK = torch.empty(B, k_aux, dtype=torch.long, device=x_BD.device)
        for s in range(0, B, step):
            e = min(B, s + step)
            z_CM = torch.addmm(be_M, x_BD[s:e], We_MD.t(), out=pre_SM[: e - s])
            # ReLU then top-k (on the bits, whose order is the values' once all are ≥ 0):
            # ties among ReLU's zeros decode to nothing and get no gradient.
            torch.topk(_bits(z_CM).clamp_(min=0), k_aux, dim=1, sorted=False, out=(_bits(vals_BK[s:e]), pos_BK[s:e]))
            _bits(z_CM).zero_().scatter_(1, pos_BK[s:e], _bits(vals_BK[s:e]))
            if cd == e_BE.dtype:
                torch.mm(z_CM, Wd_ME, out=e_BE[s:e])
            else:
                e_BE[s:e] = torch.mm(z_CM, Wd_ME, out=dec_SE[: e - s])
        # W_dec's dead rows are gathered again in the backward rather than kept.
        ctx.save_for_backward(x_BD, dead_M, vals_BK, pos_BK)
        ctx.shapes = (W_enc_ND, W_dec_ND)
        return e_BE

    @staticmethod
    def backward(ctx, g_BE: Tensor):  # type: ignore[override]
        x_BD, dead_M, vals_BK, pos_BK = ctx.saved_tensors
        W_enc_ND, W_dec_ND = ctx.shapes
        (B, D), M, E = x_BD.shape, dead_M.numel(), W_dec_ND.shape[1]
        cd = x_BD.dtype
        step = _slab_rows(B, SLAB_BYTES // max(1, x_BD.element_size() * M))
        C = step
        m = M if cd != W_enc_ND.dtype else 0  # the accumulators' rows in the workspace
        Wd_ME, z_SM, gpre_SM, g_SE, *acc = _workspace(cd, x_BD.device, (M, E), (C, M), (C, M), (C, E), (m, D), (m, E))
        gather_rows(W_dec_ND, dead_M, Wd_ME)
        gWe_MD, gWd_ME = _grad_blocks(cd, W_enc_ND.dtype, acc, [(M, D), (M, E)])
        gb_M = W_enc_ND.new_zeros(M)
        for s in range(0, B, step):
            e = min(B, s + step)
            z_CM, g_CE, pos_CK = z_SM[: e - s], g_SE[: e - s].copy_(g_BE[s:e]), pos_BK[s:e]
            _bits(z_CM).zero_().scatter_(1, pos_CK, _bits(vals_BK[s:e]))
            _acc_mm(gWd_ME, z_CM.t(), g_CE, s == 0)
            # ∂/∂pre: the decode's gradient at the chosen, positive entries only (gathered
            # and scattered back: cheaper than masking all M columns).
            g_CK = torch.mm(g_CE, Wd_ME.t(), out=gpre_SM[: e - s]).gather(1, pos_CK)
            _bits(g_CK).mul_(_bits(vals_BK[s:e]) > 0)
            g_pre = _bits(z_CM).zero_().scatter_(1, pos_CK, _bits(g_CK)).view(cd)
            _acc_mm(gWe_MD, g_pre.t(), x_BD[s:e], s == 0)
            gb_M += g_pre.sum(0)  # in cd: a slab's sum rounded once
        gWe_MD, gWd_ME = gWe_MD.to(W_enc_ND.dtype), gWd_ME.to(W_dec_ND.dtype)
        needs = ctx.needs_input_grad
        grad_b = torch.zeros(W_enc_ND.shape[0], dtype=gb_M.dtype, device=gb_M.device).index_add_(0, dead_M, gb_M) if needs[2] else None
        return (None, rows_grad(W_enc_ND, dead_M, gWe_MD, needs[1]), grad_b,
                rows_grad(W_dec_ND, dead_M, gWd_ME, needs[3]), None, None)  # fmt: skip


def rows_grad(W_ND: Tensor, rows_M: Tensor, G_MD: Tensor, need: bool) -> Tensor | None:
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
    W's dtype even under autocast (the products are small), or bfloat16 products where
    ``compute_dtype`` says."""
    if not 0 < k_aux <= dead_M.numel():
        raise ValueError(f"k_aux={k_aux} must be in 1..{dead_M.numel()} (the dead latents)")
    with torch.autocast(xin_BD.device.type, enabled=False):
        x_BD = xin_BD.detach().to(compute_dtype(W_enc_ND)).contiguous()
        return DeadDecode.apply(x_BD, W_enc_ND, b_enc_N, W_dec_ND, dead_M, k_aux)


class DeadGroup(NamedTuple):
    """One AuxK over a contiguous run ``dead_M[start:stop]`` of the dead latents: its top
    ``k_aux`` per row model ``err_BD``, its loss weighted by ``scale``."""

    start: int
    stop: int
    k_aux: int
    err_BD: Tensor
    scale: float


def grouped_auxk_loss(
    xin_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_ND: Tensor, dead_M: Tensor, groups: list[DeadGroup],
    shift_D: Tensor | None = None,
) -> Tensor:
    """Σ over groups of scale · mean over rows of ‖e − s·ê‖² (``sae.ops.fitted_residual_loss``
    of each group's ``dead_decode``), in one pass over the dead latents; the groups cover
    ``dead_M`` (sorted, unique) in order, each with k_aux ≥ 1.

    Matryoshka's AuxK: each level's dead latents model the residual of the prefix ending
    with that level. Per level, ``dead_decode`` + ``fitted_residual_loss`` pay their fixed
    costs (the [B, M] products, top-k, scatters, the [B, D] input and residual kept for the
    backward) once per level; here the pre-activations of all dead latents are one product,
    each group takes its top k_aux within its own columns (all of them, with no top-k, when
    k_aux is the group's size), and the input-side gradient is one product. The gradients
    of a scalar loss are the upstream scalar times those of the loss itself, so they are
    computed here, a slab of rows at a time, and the backward only scales the [M, D] blocks:
    nothing of size [B, D] is kept. The encoder reads xin + ``shift_D`` when given (an
    SAE's x − b_dec, formed a slab at a time: no [B, D] copy). W's dtype even under
    autocast, or bfloat16 products where ``compute_dtype`` says; same result as the groups
    one by one (tested in float64)."""
    stop = 0
    for g in groups:
        if g.start != stop or not 0 < g.k_aux <= g.stop - g.start:
            raise ValueError(f"groups must cover dead_M in order, each with k_aux in 1..its size; got start="
                             f"{g.start} (expected {stop}), stop={g.stop}, k_aux={g.k_aux}")
        stop = g.stop
    if stop != dead_M.numel():
        raise ValueError(f"groups cover dead_M[:{stop}], not all {dead_M.numel()} dead latents")
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t.requires_grad for t in (W_enc_ND, b_enc_N, W_dec_ND))
    with torch.autocast(xin_BD.device.type, enabled=False):
        x_BD = xin_BD.detach().to(W_enc_ND.dtype).contiguous()
        shift = None if shift_D is None else shift_D.detach().to(W_enc_ND.dtype)
        return _GroupedAuxK.apply(x_BD, W_enc_ND, b_enc_N, W_dec_ND, dead_M, groups, needs, shift)


class _GroupedAuxK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_ND: Tensor, b_enc_N: Tensor, W_dec_ND: Tensor, dead_M: Tensor,  # type: ignore[override]
                groups: list[DeadGroup], needs: tuple[bool, bool, bool], shift_D: Tensor | None) -> Tensor:  # fmt: skip
        (B, D), M = x_BD.shape, dead_M.numel()
        cd = compute_dtype(W_enc_ND)  # the products' dtype; the residuals and gradients are W's
        grads = any(needs)
        E = W_dec_ND.shape[1]  # a transcoder's output width
        sq_GB = x_BD.new_empty(len(groups), B)
        # Slabs of rows: [C, M] codes and [C, E] residuals of up to SLAB_BYTES / 2 each, the
        # buffers reused by every slab and group (each fresh [B, D] block costs page faults).
        step = _slab_rows(B, SLAB_BYTES // (8 * max(M, D, E)))
        r_SE, tmp_SE = x_BD.new_empty(step, E), x_BD.new_empty(step, E)
        # The gradient accumulators and the decode's bf16 output live in the workspace only
        # when the products run in another dtype than W's.
        c, m = (step, M if grads else 0) if cd != x_BD.dtype else (0, 0)
        We_MD, Wd_MD, z_SM, gpre_SM, cr_SE, xs_SD, rc_SE, *acc = _workspace(
            cd, x_BD.device, (M, D), (M, E), (step, M), (step, M), (step, E), (step, D), (c, E), (m, D), (m, E))
        gWe_MD, gWd_MD = _grad_blocks(cd, x_BD.dtype, acc, [(M, D), (M, E)]) if grads else (None, None)
        gb_M = x_BD.new_zeros(M) if grads else None
        gather_rows(W_enc_ND, dead_M, We_MD)
        gather_rows(W_dec_ND, dead_M, Wd_MD)
        be_M = b_enc_N[dead_M].to(cd)
        if shift_D is None and cd == x_BD.dtype:
            xs_SD = None

        def row_dot(a_CE: Tensor, b_CE: Tensor) -> Tensor:  # vecdot's arithmetic, its product in tmp
            return torch.mul(a_CE, b_CE, out=tmp_SE[: a_CE.shape[0]]).sum(-1)

        for s in range(0, B, step):
            e = min(B, s + step)
            if xs_SD is None:
                x_CD = x_BD[s:e]
            elif shift_D is None:
                x_CD = xs_SD[: e - s].copy_(x_BD[s:e])
            else:  # added in W's dtype, rounded once to cd
                x_CD = torch.add(x_BD[s:e], shift_D, out=xs_SD[: e - s])
            z_CM = torch.addmm(be_M, x_CD, We_MD.t(), out=z_SM[: e - s])  # pre-activations, then codes
            for g in groups:
                # ReLU, then (unless every dead latent of the group is chosen) the top-k on
                # the bits, as ``DeadDecode`` does.
                bits_Cm = _bits(z_CM[:, g.start : g.stop]).clamp_(min=0)
                if g.k_aux < g.stop - g.start:
                    vals_CK, pos_CK = torch.topk(bits_Cm, g.k_aux, dim=1, sorted=False)
                    bits_Cm.zero_().scatter_(1, pos_CK, vals_CK)
            for i, g in enumerate(groups):
                z_Cm, Wd_mE = z_CM[:, g.start : g.stop], Wd_MD[g.start : g.stop]
                err_CE = g.err_BD[s:e].to(x_BD.dtype)
                # The fitted residual r = e − s·ê, s = clamp(⟨e, ê⟩/‖ê‖², 0, 1) (not differentiated).
                if cd == x_BD.dtype:
                    r_CE = torch.mm(z_Cm, Wd_mE, out=r_SE[: e - s])
                else:
                    r_CE = r_SE[: e - s].copy_(torch.mm(z_Cm, Wd_mE, out=rc_SE[: e - s]))
                fit_C1 = row_dot(err_CE, r_CE).unsqueeze(1)
                fit_C1 = (fit_C1 / row_dot(r_CE, r_CE).unsqueeze(1).clamp_min(1e-12)).clamp_(0, 1)
                r_CE = torch.addcmul(err_CE, r_CE, fit_C1, value=-1, out=r_CE)
                sq_GB[i, s:e] = row_dot(r_CE, r_CE)
                if grads:  # ∂loss/∂ê = c·r, c = −2·scale·s/B per row, through the decode and the ReLU
                    cr_CE = torch.mul(r_CE, fit_C1.mul_(-2 * g.scale / max(1, B)), out=cr_SE[: e - s])
                    _acc_mm(gWd_MD[g.start : g.stop], z_Cm.t(), cr_CE, s == 0)
                    torch.mul(_bits(torch.mm(cr_CE, Wd_mE.t())), _bits(z_Cm) > 0, out=_bits(gpre_SM[: e - s, g.start : g.stop]))
            if grads:
                _acc_mm(gWe_MD, gpre_SM[: e - s].t(), x_CD, s == 0)
                gb_M += gpre_SM[: e - s].sum(0)  # in cd: a slab's sum rounded once
        ctx.grads = (gWe_MD.to(x_BD.dtype), gb_M, gWd_MD.to(x_BD.dtype)) if grads else (None,) * 3
        ctx.dead_M, ctx.shapes = dead_M, (W_enc_ND, b_enc_N, W_dec_ND)
        loss = x_BD.new_zeros(())
        for i, g in enumerate(groups):  # as ``fitted_residual_loss`` sums them, group by group
            loss = loss + g.scale * sq_GB[i].mean()
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("grouped_auxk_loss's backward runs once: its gradients were computed in the forward")
        # Scaled in place and let go: the node outlives its backward until the whole
        # backward ends, and at 10% dead these blocks are 15 MB.
        (gWe_MD, gb_M, gWd_MD), ctx.grads = ctx.grads, None
        W_enc_ND, b_enc_N, W_dec_ND = ctx.shapes
        needs, dead_M = ctx.needs_input_grad, ctx.dead_M
        grad_b = torch.zeros_like(b_enc_N).index_add_(0, dead_M, gb_M.mul_(g)) if needs[2] else None
        grad_We = rows_grad(W_enc_ND, dead_M, gWe_MD.mul_(g), True) if needs[1] else None
        grad_Wd = rows_grad(W_dec_ND, dead_M, gWd_MD.mul_(g), True) if needs[3] else None
        return None, grad_We, grad_b, grad_Wd, None, None, None, None
