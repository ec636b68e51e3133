"""The bfloat16-screened TopK encoder gives the float32 answer, near-ties included."""

from __future__ import annotations

import pytest
import torch

from llm_sae.kernels import screen, screen_buffers, sparse_ops
from llm_sae.kernels.topk import dense_topk_decode, dense_topk_encode, topk_decode, topk_encode


@pytest.fixture
def screen_on(monkeypatch):
    monkeypatch.setenv("LLM_SAE_SCREEN", "1")
    screen.clear()
    screen.reset_stats()
    yield
    screen.clear()


def _params(B: int, D: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(B, D, generator=g)
    W_ND = torch.randn(N, D, generator=g) / D**0.5
    b_N = torch.randn(N, generator=g) * 0.1
    return x_BD, W_ND, b_N


def _by_index(vals_BK: torch.Tensor, idx_BK: torch.Tensor):
    idx_BK, order = idx_BK.sort(dim=1)
    return vals_BK.gather(1, order), idx_BK


def _assert_same_topk(got, want) -> None:
    v_got, i_got = _by_index(*got)
    v_want, i_want = _by_index(*want)
    assert torch.equal(i_got, i_want)
    torch.testing.assert_close(v_got, v_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "B,D,N,k",
    [
        (5, 16, 1000, 3),
        (64, 32, 2048, 8),
        (300, 96, 4096, 32),  # several slabs (the budget is shrunk below)
    ],
)
def test_screened_equals_dense(screen_on, B, D, N, k):
    x, W, b = _params(B, D, N)
    assert screen.use_screen(x, W, b, k)
    got = topk_encode(x, W, b, k, budget=sparse_ops.ChunkBudget(forward_bytes_cpu=2**20))
    _assert_same_topk(got, dense_topk_encode(x, W, b, k))
    assert screen.STATS["rows"] == B
    assert screen.STATS["fallback_rows"] < max(1, B // 10)  # the screen did the work
    assert B * k <= screen.STATS["exact"] < B * (k + screen.margin(k))  # not every candidate


def _near_ties(seed: int = 0, N: int = 1024, S: int = 256):
    """Rows r < D see x = e_r, so their pre-activations are column r of W: S latents at
    3.0039 + j·1e-5 (a random j per latent), all rounding to 3.0 in bfloat16, so the
    screen cannot order them, and the rest well below. N = 4096 selects through group
    maxima (``screen_select``), 1024 through a plain topk."""
    D, k = 16, 8
    g = torch.Generator().manual_seed(seed)
    W_ND = torch.randn(N, D, generator=g) * 0.5
    for r in range(D):
        cluster = torch.randperm(N, generator=g)[:S]
        steps = torch.randperm(S, generator=g).float()
        W_ND[cluster, r] = 3.0 + 2**-8 + steps * 1e-5
    x_BD = torch.cat([torch.eye(D), torch.randn(16, D, generator=g)])
    return x_BD, W_ND, torch.zeros(N), k


def test_empty_batch(screen_on):
    x, W, b = _params(0, 16, 1000)
    vals, idx = topk_encode(x, W, b, 3)
    assert vals.shape == idx.shape == (0, 3)


@pytest.mark.parametrize("N", [1024, 4096])
def test_near_ties_fall_back_and_stay_exact(screen_on, N):
    x, W, b, k = _near_ties(N=N)
    got = topk_encode(x, W, b, k)
    assert screen.STATS["fallback_rows"] >= 16  # every near-tie row was recomputed
    _assert_same_topk(got, dense_topk_encode(x, W, b, k))


@pytest.mark.parametrize("N", [1024, 4096])
def test_near_ties_need_the_bound(screen_on, monkeypatch, N):
    """With the error bound 64× too small the near-tie rows certify wrongly: the test above
    is sharp. (With none at all they fail: the cut-off for exact values is then the k-th
    value itself, which certifies nothing.)"""
    monkeypatch.setattr(screen, "_BOUND_SCALE", 2**-6)
    x, W, b, k = _near_ties(N=N)
    got = topk_encode(x, W, b, k)
    assert screen.STATS["fallback_rows"] < 16
    _, i_got = _by_index(*got)
    _, i_want = _by_index(*dense_topk_encode(x, W, b, k))
    assert not torch.equal(i_got[:16], i_want[:16])


def _spread_ties(N: int, S: int = 24, seed: int = 0):
    """32 rows, each with S latents whose real pre-activations are 3 + 2^-7 + j·5e-4 (a
    random j in 0 … S − 1 per latent) and whose weights have a large part orthogonal to every row,
    so x's and W's rounding moves their screened values by ~1e-2 apiece, more than their
    spread: the screen misorders them, not only rounds each (unlike ``_near_ties``). The
    other latents stay well below."""
    R, D, k = 32, 64, 8
    g = torch.Generator().manual_seed(seed)
    x_RD = torch.randn(R, D, generator=g, dtype=torch.float64)
    W_ND = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.02
    Q_DR = torch.linalg.qr(x_RD.t()).Q  # the rows' span
    clusters = torch.randperm(N, generator=g)[: R * S].view(R, S)
    for r in range(R):
        o_SD = torch.randn(S, D, generator=g, dtype=torch.float64)
        o_SD -= o_SD @ Q_DR @ Q_DR.t()
        level_S = 3 + 2**-7 + torch.randperm(S, generator=g).double() * 5e-4
        w_SD = level_S[:, None] * x_RD[r] / x_RD[r].square().sum() + 2 * o_SD / o_SD.norm(dim=1, keepdim=True)
        W_ND[clusters[r]] = w_SD
    return x_RD.float(), W_ND.float(), torch.zeros(N), k


@pytest.mark.parametrize("N", [1024, 4096])
def test_exact_values_widen_to_what_the_screen_misorders(screen_on, monkeypatch, N):
    """24 near ties, 8 to keep, in an order the screen gets wrong: the first round's 8
    exact values are not the top 8, and the second round must compute the others within
    the bound of its 8th: exact, without falling back. With the bound too small the second
    round skips some and the rows certify wrongly."""
    x, W, b, k = _spread_ties(N)
    want = dense_topk_encode(x, W, b, k)
    got = topk_encode(x, W, b, k)
    assert screen.STATS["fallback_rows"] == 0
    assert screen.STATS["exact"] >= 24 * 32
    _assert_same_topk(got, want)
    monkeypatch.setattr(screen, "_BOUND_SCALE", 2**-6)
    screen.reset_stats()
    _, i_got = _by_index(*topk_encode(x, W, b, k))
    assert screen.STATS["fallback_rows"] == 0
    assert not torch.equal(i_got, _by_index(*want)[1])


def test_non_finite_rows_fall_back(screen_on):
    x, W, b = _params(8, 32, 2048)
    x[3, 5] = float("nan")
    x[6, 0] = float("inf")
    got = topk_encode(x, W, b, 4)
    assert screen.STATS["fallback_rows"] >= 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_SAE_SCREEN", "0")
        ref = topk_encode(x, W, b, 4)
    for a, r in zip(_by_index(*got), _by_index(*ref), strict=True):
        torch.testing.assert_close(a, r, equal_nan=True)


def test_weight_copy_follows_in_place_updates(screen_on):
    """Fused Adam changes W without bumping its version counter: the bfloat16 copy must
    still follow it (it is remade each call, into the same buffer)."""
    x, W, b = _params(32, 32, 2048)
    W, b = torch.nn.Parameter(W), torch.nn.Parameter(b)
    topk_encode(x, W, b, 8)
    buf = screen_buffers.WEIGHTS.Wa_ND2.data_ptr()
    opt = torch.optim.Adam([W, b], lr=0.05, fused=True)
    W.grad, b.grad = torch.randn_like(W), torch.randn_like(b)
    version = W._version
    opt.step()
    assert W._version == version  # what makes a version-keyed cache unsafe
    _assert_same_topk(topk_encode(x, W, b, 8), dense_topk_encode(x, W, b, 8))
    assert screen_buffers.WEIGHTS.Wa_ND2.data_ptr() == buf
    assert screen.STATS["fallback_rows"] < 8


def test_gradients_match_dense(screen_on):
    x, W_enc, b_enc = _params(48, 32, 2048, seed=3)
    W_dec = torch.randn(2048, 32, generator=torch.Generator().manual_seed(4)) / 32**0.5
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec)]

    def grads(encode, decode):
        for t in leaves:
            t.grad = None
        x, W_enc, b_enc, W_dec = leaves
        vals, idx = encode(x, W_enc, b_enc, 8)
        loss = (decode(vals, idx, W_dec) - x.detach()).pow(2).sum() + vals.pow(3).sum()
        loss.backward()
        return [t.grad.clone() for t in leaves]

    fast = grads(topk_encode, topk_decode)
    assert screen.STATS["rows"] == 48
    ref = grads(dense_topk_encode, dense_topk_decode)
    for name, a, r in zip(["x", "W_enc", "b_enc", "W_dec"], fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)


def test_dispatch(monkeypatch):
    x, W, b = _params(4, 16, 4096)
    monkeypatch.setenv("LLM_SAE_SCREEN", "0")
    assert not screen.use_screen(x, W, b, 8)
    monkeypatch.setenv("LLM_SAE_SCREEN", "1")
    assert screen.use_screen(x, W, b, 8)
    assert not screen.use_screen(x.double(), W.double(), b.double(), 8)  # float32 only
    assert not screen.use_screen(x, W[:40], b[:40], 8)  # k + margin must leave latents out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not screen.use_screen(x, W, b, 8)
    monkeypatch.delenv("LLM_SAE_SCREEN")
    assert screen.use_screen(x, W, b, 8) == screen.cpu_has_fast_bf16()
    assert not screen.use_screen(x, W[:200], b[:200], 8)  # too few latents to pay off


@pytest.mark.parametrize("k", [64, 128])
def test_margin_grows_with_k_so_a_fresh_sae_is_certified(screen_on, k):
    """At larger k the values near the k-th crowd together; with the margin growing with k
    the screen still certifies (nearly) every row of a fresh SAE, and stays exact."""
    g = torch.Generator().manual_seed(0)
    B, D, N = 64, 768, 8192
    W_ND = torch.randn(N, D, generator=g)
    W_ND /= W_ND.norm(dim=1, keepdim=True)  # a fresh SAE: unit rows, b_enc = 0
    x_BD, b_N = torch.randn(B, D, generator=g), torch.zeros(N)
    assert screen.use_screen(x_BD, W_ND, b_N, k)
    _assert_same_topk(topk_encode(x_BD, W_ND, b_N, k), dense_topk_encode(x_BD, W_ND, b_N, k))
    assert screen.STATS["fallback_rows"] <= B // 20


def _batch_selection(x_BD, W_ND, b_N, k):
    """The dense BatchTopK selection in float64: {(row, latent)} of the k·B largest."""
    z_BN = torch.relu(x_BD.double() @ W_ND.double().t() + b_N.double())
    keep = z_BN.flatten().topk(k * x_BD.shape[0]).indices
    return {(int(i) // z_BN.shape[1], int(i) % z_BN.shape[1]) for i in keep if z_BN.flatten()[i] > 0}


def _kept(idx_BK, on_BK):
    return {(b, int(i)) for b in range(idx_BK.shape[0]) for i, on in zip(idx_BK[b], on_BK[b], strict=True) if on}


def test_screened_batch_topk_selection_equals_dense(screen_on, monkeypatch):
    """BatchTopK's candidates come from the screen (top 2k, no margin) and rows whose bound
    reaches the batch's cut-off are widened, through the screen again."""
    from llm_sae.kernels import batch_topk

    x, W, b = _params(300, 96, 4096, seed=5)
    x[:5] *= 6  # rows that keep far more than 2k latents
    calls = []
    real = screen.screened_candidates
    monkeypatch.setattr(screen, "screened_candidates", lambda x_, *a, **kw: calls.append(x_.shape[0]) or real(x_, *a, **kw))
    idx_BK, on_BK = batch_topk.batch_topk_pairs(x, W, b, 8)
    assert _kept(idx_BK, on_BK) == _batch_selection(x, W, b, 8)
    assert calls[0] == 300 and len(calls) > 1
    assert 5 <= calls[1] < 300  # only the rows that needed it were widened


def test_screened_batch_topk_needs_the_bound(screen_on, monkeypatch):
    """Near ties the screen cannot order: with the bound the selection is exact, without
    it rows are cleared that hold latents of the selection."""
    from llm_sae.kernels import batch_topk

    x, W, b, k = _near_ties()
    x = x[:16]  # the rows of near ties only: the batch's cut-off falls among them
    assert _kept(*batch_topk.batch_topk_pairs(x, W, b, k)) == _batch_selection(x, W, b, k)
    monkeypatch.setattr(screen, "_BOUND_SCALE", 0.0)
    assert _kept(*batch_topk.batch_topk_pairs(x, W, b, k)) != _batch_selection(x, W, b, k)
