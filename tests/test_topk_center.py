"""topk_encode with the centring inside the kernel: the gradients of x − c, through c."""

from __future__ import annotations

import pytest
import torch

from llm_sae.kernels.topk import dense_topk_decode, dense_topk_encode, topk_decode, topk_encode


@pytest.mark.parametrize("x_grad", [False, True])
def test_center_gradients_match_dense_float64(x_grad):
    g = torch.Generator().manual_seed(0)
    B, D, N, k = 40, 24, 300, 7
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W_enc = torch.randn(N, D, generator=g, dtype=torch.float64) / D**0.5
    b_enc = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    c = torch.randn(D, generator=g, dtype=torch.float64) * 0.3
    W_dec = torch.randn(N, D, generator=g, dtype=torch.float64) / D**0.5

    def grads(fast: bool):
        leaves = [t.clone().requires_grad_(x_grad or i > 0) for i, t in enumerate((x, W_enc, b_enc, c, W_dec))]
        x_, W_, b_, c_, Wd_ = leaves
        if fast:
            vals, idx = topk_encode(x_, W_, b_, k, center_D=c_)
            x_hat = topk_decode(vals, idx, Wd_)
        else:
            vals, idx = dense_topk_encode(x_ - c_, W_, b_, k)
            x_hat = dense_topk_decode(vals, idx, Wd_)
        ((x_hat + c_ - x_.detach()).pow(2).sum() + vals.pow(3).sum()).backward()
        return [t.grad for t in leaves]

    fast, ref = grads(True), grads(False)
    for name, a, r in zip(["x", "W_enc", "b_enc", "center", "W_dec"], fast, ref, strict=True):
        if name == "x" and not x_grad:
            assert a is None and r is None
            continue
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=name)


def test_center_is_x_minus_center():
    g = torch.Generator().manual_seed(1)
    x, W, b, c = torch.randn(8, 16, generator=g), torch.randn(200, 16, generator=g), torch.randn(200, generator=g), torch.randn(16, generator=g)
    got = topk_encode(x, W, b, 5, center_D=c)
    want = topk_encode(x - c, W, b, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_sae_b_dec_gradient_matches_dense_encoder(monkeypatch):
    """The TopK SAE passes b_dec to the kernel as the centre: its gradient (both paths)
    is the one of a dense encoder on x − b_dec."""
    from llm_sae.sae.config import SAEConfig
    from llm_sae.sae.registry import REGISTRY

    torch.manual_seed(0)
    sae = REGISTRY["topk"](SAEConfig(d_in=24, n_latents=96, k=5)).double()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(30, 24, dtype=torch.float64)

    def grads():
        sae.zero_grad(set_to_none=True)
        sae(x).loss.backward()
        return [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec)]

    fast = grads()
    monkeypatch.setattr(sae, "encode_topk", lambda x_: dense_topk_encode(sae.centered(x_), sae.W_enc, sae.b_enc, 5))
    for name, a, r in zip(["W_enc", "b_enc", "b_dec", "W_dec"], fast, grads(), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=name)
