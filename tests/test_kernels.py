"""The sparse TopK kernels agree with plain autograd, and their backward stays sparse."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm_sae.kernels import sparse_ops
from llm_sae.kernels.topk import dense_topk_decode, dense_topk_encode, topk_decode, topk_encode

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _params(B: int, D: int, N: int, dtype: torch.dtype, seed: int = 0, b_shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_()
    W_enc = (torch.randn(N, D, generator=g, dtype=dtype) / D**0.5).requires_grad_()
    b_enc = (torch.randn(N, generator=g, dtype=dtype) * 0.1 + b_shift).requires_grad_()
    W_dec = (torch.randn(N, D, generator=g, dtype=dtype) / D**0.5).requires_grad_()
    return x, W_enc, b_enc, W_dec


def _dense(vals_BK: torch.Tensor, idx_BK: torch.Tensor, N: int) -> torch.Tensor:
    return vals_BK.new_zeros(vals_BK.shape[0], N).scatter(1, idx_BK, vals_BK)


def _sae_step(encode, decode, x, W_enc, b_enc, W_dec, k, R_BN):
    """Encode → decode → MSE plus a term on the latents, so every gradient path is used."""
    for t in (x, W_enc, b_enc, W_dec):
        t.grad = None
    vals, idx = encode(x, W_enc, b_enc, k)
    x_hat = decode(vals, idx, W_dec)
    z_BN = _dense(vals, idx, W_enc.shape[0])
    loss = (x_hat - x.detach()).pow(2).sum() + (z_BN * R_BN).sum()
    loss.backward()
    return z_BN.detach(), x_hat.detach(), [t.grad.clone() for t in (x, W_enc, b_enc, W_dec)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "B,D,N,k,b_shift",
    [
        (17, 12, 40, 5, 0.0),  # generic
        (1, 8, 30, 4, 0.0),  # batch of one
        (9, 6, 25, 20, -1.5),  # k larger than the number of positive pre-activations: zeros
        (5, 4, 16, 16, 0.0),  # k == N
    ],
)
def test_fast_matches_dense(dtype, B, D, N, k, b_shift):
    x, W_enc, b_enc, W_dec = _params(B, D, N, dtype, b_shift=b_shift)
    R_BN = torch.randn(B, N, dtype=dtype, generator=torch.Generator().manual_seed(1))
    z_f, xh_f, g_f = _sae_step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, k, R_BN)
    z_d, xh_d, g_d = _sae_step(
        dense_topk_encode, dense_topk_decode, x, W_enc, b_enc, W_dec, k, R_BN
    )
    tol = TOL[dtype]
    torch.testing.assert_close(z_f, z_d, **tol)
    torch.testing.assert_close(xh_f, xh_d, **tol)
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec"], g_f, g_d, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    if b_shift < 0:
        assert (z_f > 0).sum(1).min() < k, "the case meant to have zero winners has none"
    assert (z_f >= 0).all() and ((z_f > 0).sum(1) <= k).all()


def test_decode_grads_match_dense_for_given_indices():
    g = torch.Generator().manual_seed(3)
    B, D, N, K = 11, 7, 30, 6
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    vals = torch.randn(B, K, dtype=torch.float64, generator=g).requires_grad_()
    W_dec = torch.randn(N, D, dtype=torch.float64, generator=g).requires_grad_()
    R = torch.randn(B, D, dtype=torch.float64, generator=g)
    grads = []
    for decode in (topk_decode, dense_topk_decode):
        vals.grad = W_dec.grad = None
        (decode(vals, idx, W_dec) * R).sum().backward()
        grads.append((vals.grad.clone(), W_dec.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "chunk_bytes", [1, 3 * 4 * 8 * 5]
)  # chunks of 1 row; of 4 rows (13 % 4 ≠ 0)
def test_chunk_boundaries(chunk_bytes):
    # Forward slabs of 1 or 5 rows of pre-activations too.
    budget = sparse_ops.ChunkBudget(
        backward_bytes=chunk_bytes, forward_bytes_cpu=1 if chunk_bytes == 1 else 5 * 24 * 8
    )
    B, D, N, k = 13, 5, 24, 3
    assert sparse_ops.chunk_rows(k, D, 8, budget) in (1, 4)
    assert sparse_ops.fwd_chunk_rows(N, torch.zeros((), dtype=torch.float64), budget) in (1, 5)
    x, W_enc, b_enc, W_dec = _params(B, D, N, torch.float64, seed=5)
    R_BN = torch.randn(B, N, dtype=torch.float64)
    encode = functools.partial(topk_encode, budget=budget)
    decode = functools.partial(topk_decode, budget=budget)
    _, _, g_f = _sae_step(encode, decode, x, W_enc, b_enc, W_dec, k, R_BN)
    _, _, g_d = _sae_step(dense_topk_encode, dense_topk_decode, x, W_enc, b_enc, W_dec, k, R_BN)
    torch.testing.assert_close(g_f, g_d, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    x, W_enc, b_enc, W_dec = _params(4, 5, 12, torch.float64, seed=7)

    def f(x, W_enc, b_enc, W_dec):
        vals, idx = topk_encode(x, W_enc, b_enc, 3)
        return topk_decode(vals, idx, W_dec)

    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, W_dec), eps=1e-7, atol=1e-6)


def test_leading_dims_and_no_input_grad():
    x, W_enc, b_enc, W_dec = _params(6, 4, 10, torch.float64)
    x3 = x.detach().view(2, 3, 4)
    vals, idx = topk_encode(x3, W_enc, b_enc, 2)
    assert vals.shape == idx.shape == (2, 3, 2)
    out = topk_decode(vals, idx, W_dec)
    assert out.shape == (2, 3, 4)
    out.sum().backward()
    assert x.grad is None and W_enc.grad is not None and W_dec.grad is not None


def test_bad_k_raises():
    x, W_enc, b_enc, _ = _params(2, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="k=6"):
        topk_encode(x, W_enc, b_enc, 6)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                # A sparse tensor holds only its nonzeros, whatever its logical shape.
                self.numels.append(t._nnz() if t.layout != torch.strided else t.numel())
        return out


def test_backward_never_builds_a_dense_batch_by_latents_tensor():
    # N·D (the weight gradients) is legitimately allocated; B·N must never be.
    B, D, N, k = 64, 4, 1000, 4
    x, W_enc, b_enc, W_dec = _params(B, D, N, torch.float32)
    vals, idx = topk_encode(x, W_enc, b_enc, k)
    loss = (topk_decode(vals, idx, W_dec) - x.detach()).pow(2).sum()
    rec = _ShapeRecorder()
    with rec:
        loss.backward()
    assert rec.numels and max(rec.numels) <= N * D < B * N
    # …whereas the dense reference does: the recorder can see it.
    vals, idx = dense_topk_encode(x, W_enc, b_enc, k)
    loss = (dense_topk_decode(vals, idx, W_dec) - x.detach()).pow(2).sum()
    rec = _ShapeRecorder()
    with rec:
        loss.backward()
    assert max(rec.numels) >= B * N


@pytest.mark.parametrize("broken_ops", [("csr_t_dense",), ("csr_t_dense", "embedding_bag_weight_grad")])
def test_weight_gradient_fallback_matches(monkeypatch, broken_ops):
    """Without the CSR product (no kernel for the dtype), torch's embedding-bag gradient op,
    and without that too (its signature is internal) the row-update fallback, give the
    same gradients."""
    x, W_enc, b_enc, W_dec = _params(13, 5, 24, torch.float64, seed=11)
    R_BN = torch.randn(13, 24, dtype=torch.float64)
    _, _, g_fast = _sae_step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, 3, R_BN)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("op signature changed")

    for name in broken_ops:
        monkeypatch.setattr(sparse_ops, name, broken)
    _, _, g_fallback = _sae_step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, 3, R_BN)
    assert len(calls) == 2 * len(broken_ops)  # encoder and decoder gradients both fell back
    torch.testing.assert_close(g_fast, g_fallback, rtol=1e-12, atol=1e-12)
