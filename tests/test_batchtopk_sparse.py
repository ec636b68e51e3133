"""BatchTopK on the sparse kernels: the dense BatchTopK's selection, loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_sae.kernels import batch_topk as bt
from llm_sae.sae.base import SAE
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY

D, N, K, B = 24, 96, 4, 40


def dense_selection(xin_BD, W_ND, b_N, k, row_scale_B=None):
    z_BN = F.relu(xin_BD @ W_ND.t() + b_N)
    rank_BN = z_BN if row_scale_B is None else z_BN / row_scale_B[:, None]
    keep = rank_BN.flatten().topk(k * xin_BD.shape[0]).indices
    return {(int(i) // z_BN.shape[1], int(i) % z_BN.shape[1]) for i in keep if z_BN.flatten()[i] > 0}


def pairs_set(idx_BK, on_BK, vals_BK=None):
    return {
        (b, int(idx_BK[b, j]))
        for b in range(idx_BK.shape[0])
        for j in range(idx_BK.shape[1])
        if on_BK[b, j] > 0 and (vals_BK is None or vals_BK[b, j] > 0)
    }


@pytest.mark.parametrize("huge_rows", [0, 3])
def test_batch_topk_pairs_equal_the_dense_selection(huge_rows, monkeypatch):
    """Rows with 30x the norm take far more than their c = 4k candidates: the pass widens."""
    g = torch.Generator().manual_seed(0)
    x_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    x_BD[:huge_rows] *= 30
    W_ND = torch.randn(N, D, generator=g, dtype=torch.float64)
    b_N = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    monkeypatch.setattr(bt, "CANDIDATES_PER_K", 4)  # c = 16: only the huge rows need more
    calls = []
    real = bt.topk_encode
    monkeypatch.setattr(bt, "topk_encode", lambda *a: calls.append(a[0]) or real(*a))
    idx_BK, on_BK = bt.batch_topk_pairs(x_BD, W_ND, b_N, K)
    assert on_BK.sum() == K * B
    pre_BK = (x_BD @ W_ND.t() + b_N).gather(1, idx_BK)
    assert pairs_set(idx_BK, on_BK, pre_BK) == dense_selection(x_BD, W_ND, b_N, K)
    assert (len(calls) > 1) == (huge_rows > 0)  # widened only when a row needed it
    assert all(len(rows) <= huge_rows for rows in calls[1:])  # and only for those rows


def test_relative_selection_ranks_by_row_scale_exactly(monkeypatch):
    """Ranked relative to each row's scale: rows with a tiny scale take far more than their
    candidates (the pass widens for them alone), the huge-norm rows no more than their
    share; the raw cut-off is the batch's k·B-th largest activation."""
    g = torch.Generator().manual_seed(1)
    x_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    x_BD[:3] *= 30
    W_ND = torch.randn(N, D, generator=g, dtype=torch.float64)
    b_N = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    scale_B = x_BD.norm(dim=1)
    scale_B[5:7] *= 0.02  # two rows ranked as if 50x larger
    monkeypatch.setattr(bt, "CANDIDATES_PER_K", 4)
    calls = []
    real = bt.topk_encode
    monkeypatch.setattr(bt, "topk_encode", lambda *a: calls.append(a[0]) or real(*a))
    idx_BK, on_BK, vals_BK, cut = bt._select(x_BD, W_ND, b_N, K, scale_B)
    pre_BK = (x_BD @ W_ND.t() + b_N).gather(1, idx_BK)
    assert pairs_set(idx_BK, on_BK, pre_BK) == dense_selection(x_BD, W_ND, b_N, K, scale_B)
    assert pairs_set(idx_BK, on_BK, pre_BK) != dense_selection(x_BD, W_ND, b_N, K)
    assert len(calls) > 1 and all(len(rows) <= 2 for rows in calls[1:])
    # The raw cut-off is read from the candidates: exact where no row holds more of the
    # batch's k·B largest raw values than it has candidates, a lower bound otherwise.
    z = F.relu(x_BD @ W_ND.t() + b_N)
    assert 0 < float(cut) <= float(z.flatten().topk(K * B).values.min())
    idx, on, _, cut_small = bt._select(x_BD[3:], W_ND, b_N, K, scale_B[3:])  # no huge rows
    assert float(cut_small) == float(z[3:].flatten().topk(K * (B - 3)).values.min())
    torch.testing.assert_close(vals_BK, F.relu(pre_BK) * on_BK)


def loss_and_grads(sae, x_BD, dead_N, forward):
    params = [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec]
    out = forward(sae, x_BD, dead_mask_N=dead_N)
    grads = torch.autograd.grad(out.loss, params)
    return out, grads


@pytest.mark.parametrize("progress", [1.0, 0.0, 0.9])
@pytest.mark.parametrize("n_dead", [0, 9])
def test_sparse_batchtopk_equals_dense_in_float64(n_dead, progress):
    """Every phase: the selection relative to the rows' norms (progress 0), half-way
    through the fade to plain (0.9: the norm to the power 0.5), then plain."""
    torch.manual_seed(0)
    sae = REGISTRY["batchtopk"](SAEConfig(d_in=D, n_latents=N, k=K, aux_k=8)).double().train()
    sae.set_progress(progress)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    x_BD = torch.randn(B, D, dtype=torch.float64)
    x_BD[:2] *= 10  # rows that keep many latents
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[torch.randperm(N)[:n_dead]] = True
    out, grads = loss_and_grads(sae, x_BD, dead_N, type(sae).forward)
    thr = sae.threshold.clone()
    sae.threshold.fill_(-1.0)
    ref, ref_grads = loss_and_grads(sae, x_BD, dead_N, type(sae).forward_dense)  # the dense path
    if progress >= 1.0:  # the plain selection is the base class's dense forward, unchanged
        base, _ = loss_and_grads(sae, x_BD, dead_N, SAE.forward)
        torch.testing.assert_close(base.loss, ref.loss, rtol=0, atol=0)
    if progress >= 1.0:  # the relative phase reads its raw cut-off from the candidates
        torch.testing.assert_close(sae.threshold, thr, rtol=1e-12, atol=1e-12)
    for key in ("mse", "l0", "aux"):
        torch.testing.assert_close(out.metrics[key], ref.metrics[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.fired_N, ref.fired_N)
    for name, g, r in zip(("W_enc", "W_dec", "b_enc", "b_dec"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
