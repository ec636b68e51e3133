"""Triton kernels against the pure-torch reference, under the interpreter on CPU.

Not collected by itself (no test_ prefix): ``tests/test_triton_kernels.py`` runs this file
in a fresh interpreter with ``TRITON_INTERPRET=1`` set before triton is first imported
(triton builds its own library functions at import, for the mode it finds then), and
``LLM_SAE_TRITON=1`` so the dispatch in ``llm_sae.kernels`` takes the Triton path. The
interpreter is slow: shapes stay tiny.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from llm_sae.kernels import topk as kernels_topk
from llm_sae.kernels import triton as triton_kernels
from llm_sae.kernels.topk import dense_topk_decode, dense_topk_encode, topk_decode, topk_encode

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

B, K, N, D = 16, 4, 64, 32


if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LLM_SAE_TRITON") != "1":
    pytest.skip("run through tests/test_triton_kernels.py", allow_module_level=True)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sparse(B: int, K: int, N: int, D: int, dtype=torch.float32, seed: int = 0):
    g = _gen(seed)
    W_ND = torch.randn(N, D, generator=g).to(dtype)
    # Distinct latents per row, as TopK gives; only the first half of the latents is used,
    # so some rows of the weight gradient must come out exactly zero.
    idx_BK = torch.stack([torch.randperm(N // 2, generator=g)[:K] for _ in range(B)])
    v_BK = torch.randn(B, K, generator=g).to(dtype)
    y_BD = torch.randn(B, D, generator=g).to(dtype)
    return W_ND, idx_BK, v_BK, y_BD


def _ref_outer(idx_BK, coef_BK, rows_BD, N):
    out = torch.zeros(N, rows_BD.shape[1], dtype=torch.float64)
    return out.index_add_(
        0,
        idx_BK.reshape(-1),
        (coef_BK.double()[:, :, None] * rows_BD.double()[:, None, :]).reshape(-1, rows_BD.shape[1]),
    )


def test_usable_only_when_forced_on_cpu(monkeypatch):
    t = torch.zeros(1)
    assert triton_kernels.usable_for(t)
    monkeypatch.setenv("LLM_SAE_TRITON", "0")
    assert not triton_kernels.usable_for(t)
    monkeypatch.delenv("LLM_SAE_TRITON")
    assert not triton_kernels.usable_for(t)  # CPU without the explicit flag: torch path
    monkeypatch.setenv("LLM_SAE_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_kernels.usable_for(t)


@pytest.mark.parametrize("d", [D, 40, 160])  # power of two, masked tail, several D blocks
def test_weighted_row_sum(d):
    W_ND, idx_BK, v_BK, _ = _sparse(B, K, N, d)
    out = triton_kernels.weighted_row_sum(W_ND, idx_BK, v_BK)
    ref = dense_topk_decode(v_BK.double(), idx_BK, W_ND.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d,k", [(D, K), (40, 3), (160, 5)])
def test_gathered_dot(d, k):
    W_ND, idx_BK, _, y_BD = _sparse(B, k, N, d)
    out = triton_kernels.gathered_dot(W_ND, idx_BK, y_BD)
    ref = (W_ND.double()[idx_BK] * y_BD.double()[:, None, :]).sum(-1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [D, 40, 160])
def test_sparse_t_dense_and_bias(d):
    _, idx_BK, v_BK, y_BD = _sparse(B, K, N, d)
    out_ND, bias_N = triton_kernels.sparse_t_dense(idx_BK, v_BK, y_BD, N, with_bias=True)
    torch.testing.assert_close(
        out_ND.double(), _ref_outer(idx_BK, v_BK, y_BD, N), rtol=1e-5, atol=1e-5
    )
    ref_b = torch.zeros(N, dtype=torch.float64).index_add_(
        0, idx_BK.reshape(-1), v_BK.double().reshape(-1)
    )
    torch.testing.assert_close(bias_N.double(), ref_b, rtol=1e-5, atol=1e-5)
    unused = torch.ones(N, dtype=torch.bool)
    unused[idx_BK.reshape(-1)] = False
    assert unused.any() and bool((out_ND[unused] == 0).all())


def test_sparse_t_dense_long_segments_are_deterministic():
    # Every pair on 3 latents: segments far longer than one block of pairs.
    g = _gen(3)
    idx_BK = torch.randint(0, 3, (40, 2), generator=g)
    v_BK, y_BD = torch.randn(40, 2, generator=g), torch.randn(40, 24, generator=g)
    a, _ = triton_kernels.sparse_t_dense(idx_BK, v_BK, y_BD, 8)
    b, _ = triton_kernels.sparse_t_dense(idx_BK, v_BK, y_BD, 8)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.double(), _ref_outer(idx_BK, v_BK, y_BD, 8), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_float32():
    W_ND, idx_BK, v_BK, y_BD = _sparse(B, K, N, D, dtype=torch.bfloat16)
    out = triton_kernels.weighted_row_sum(W_ND, idx_BK, v_BK, out_dtype=torch.float32)
    ref = dense_topk_decode(v_BK.double(), idx_BK, W_ND.double())
    # Exact products of bf16 inputs summed in float32: far tighter than bf16 rounding.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    dot = triton_kernels.gathered_dot(W_ND, idx_BK, y_BD, out_dtype=torch.float32)
    torch.testing.assert_close(
        dot.double(), (W_ND.double()[idx_BK] * y_BD.double()[:, None]).sum(-1), rtol=1e-5, atol=1e-5
    )
    outer, _ = triton_kernels.sparse_t_dense(idx_BK, v_BK, y_BD, N, out_dtype=torch.float32)
    torch.testing.assert_close(
        outer.double(), _ref_outer(idx_BK, v_BK, y_BD, N), rtol=1e-5, atol=1e-5
    )
    assert triton_kernels.weighted_row_sum(W_ND, idx_BK, v_BK).dtype == torch.bfloat16


def _step(encode, decode, params, k):
    for t in params:
        t.grad = None
    x, W_enc, b_enc, W_dec = params
    vals, idx = encode(x, W_enc, b_enc, k)
    x_hat = decode(vals, idx, W_dec)
    loss = (x_hat - x.detach()).pow(2).sum() + vals.sum()
    loss.backward()
    return x_hat.detach(), [t.grad.clone() for t in params]


def _params(seed: int = 0):
    g = _gen(seed)
    return [
        torch.randn(B, D, generator=g).requires_grad_(),
        (torch.randn(N, D, generator=g) / D**0.5).requires_grad_(),
        (torch.randn(N, generator=g) * 0.1).requires_grad_(),
        (torch.randn(N, D, generator=g) / D**0.5).requires_grad_(),
    ]


def test_dispatch_gives_the_reference_gradients(monkeypatch):
    calls = []
    for name in ("decode_forward", "decode_backward", "encode_backward"):
        real = getattr(triton_kernels, name)
        monkeypatch.setattr(
            triton_kernels, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a)
        )
    params = _params()
    xh_t, g_t = _step(topk_encode, topk_decode, params, K)
    assert sorted(set(calls)) == ["decode_backward", "decode_forward", "encode_backward"]
    xh_d, g_d = _step(dense_topk_encode, dense_topk_decode, params, K)
    torch.testing.assert_close(xh_t, xh_d, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec"], g_t, g_d, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


def test_dispatch_under_bf16_autocast_keeps_float32_master_grads():
    params = _params(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, idx = topk_encode(params[0], params[1], params[2], K)
        assert vals.dtype == torch.bfloat16
    _, g_ref = _step(topk_encode, topk_decode, params, K)  # float32 Triton path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, g_amp = _step(topk_encode, topk_decode, params, K)
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec"], g_amp, g_ref, strict=True):
        assert a.dtype == torch.float32, name
        # bf16 encoder: a few bf16 ulps of the gradient's scale (latent choice can flip at
        # near-ties, so compare in norm rather than elementwise).
        assert float((a - b).norm() / b.norm()) < 0.05, name


def test_torch_path_unchanged_without_the_flag(monkeypatch):
    monkeypatch.setenv("LLM_SAE_TRITON", "0")
    monkeypatch.setattr(triton_kernels, "decode_forward", None)  # would raise if called
    params = _params(2)
    xh, _ = _step(topk_encode, topk_decode, params, K)
    assert not kernels_topk.use_triton(params[3])
    torch.testing.assert_close(
        xh,
        dense_topk_decode(
            *dense_topk_encode(*[p.detach() for p in params[:3]], K), params[3].detach()
        ),
    )


def test_latent_segments_are_reused_only_for_the_same_unchanged_indices():
    N = 12
    idx = torch.tensor([[3, 1], [3, 7], [0, 1]])
    seg, perm = triton_kernels.latent_segments(idx, N)
    assert seg.tolist() == [0, 1, 3, 3, 5, 5, 5, 5, 6, 6, 6, 6, 6]
    assert idx.reshape(-1)[perm].tolist() == [0, 1, 1, 3, 3, 7]
    assert triton_kernels.latent_segments(idx, N)[0] is seg  # the decoder's backward reuses it
    idx[0, 0] = 11  # an in-place change bumps the version: recomputed
    seg2, perm2 = triton_kernels.latent_segments(idx, N)
    assert idx.reshape(-1)[perm2].tolist() == [0, 1, 1, 3, 7, 11]
    assert seg2[-2:].tolist() == [5, 6]
    other = idx.clone()  # another tensor with the same values: its own segments
    assert triton_kernels.latent_segments(other, N)[0] is not seg2
