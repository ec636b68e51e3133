"""AuxK without dense work: the same loss and gradients as the dense AuxK it replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_sae.kernels import DeferredWeightGrads, auxk, pair_pre_acts
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY

D, N, K, B = 24, 96, 4, 40


def dense_aux_reconstruction(sae, x_BD, dead_mask_N):
    """The AuxK of before: pre-activations of W_enc[dead] under autograd (a dense [N, D]
    gradient for W_enc) and a dense decode."""
    dead_M = dead_mask_N.nonzero().squeeze(1)
    n_dead = dead_M.numel()
    k_aux = min(sae.cfg.aux_k or min(512, max(1, sae.d_in // 2)), n_dead)
    pre_BM = F.linear((x_BD - sae.b_dec).detach(), sae.W_enc[dead_M], sae.b_enc[dead_M])
    vals_BK, pos_BK = F.relu(pre_BM).topk(k_aux, dim=-1, sorted=False)
    z_BN = x_BD.new_zeros(x_BD.shape[0], sae.n_latents).scatter(-1, dead_M[pos_BK], vals_BK)
    return z_BN @ sae.W_dec, n_dead, k_aux


def make_sae(aux_k: int | None = None):
    torch.manual_seed(0)
    sae = REGISTRY["topk"](SAEConfig(d_in=D, n_latents=N, k=K, aux_k=aux_k)).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def loss_and_grads(sae, x_BD, dead_N, deferred: bool, **kw):
    params = [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec]
    for p in params:
        p.grad = None
    grads = DeferredWeightGrads([sae.W_enc, sae.W_dec] if deferred else [])
    out = sae(x_BD, dead_mask_N=dead_N, **kw)
    with grads.collecting():
        out.loss.backward()
    if deferred:  # the sparse kernels deferred both weight gradients, AuxK's included
        assert sae.W_enc.grad is None and grads.pending(sae.W_enc)
        for W in (sae.W_enc, sae.W_dec):  # as the trainer does: slabs of rows (here 7)
            W.grad = torch.cat([grads.materialize(W, torch.full((min(7, N - s), W.shape[1]), torch.nan, dtype=W.dtype), s)
                                for s in range(0, N, 7)])  # fmt: skip
        grads.clear()
    return out.loss.detach(), out.metrics["aux"], [p.grad.clone() for p in params]


@pytest.mark.parametrize("n_dead", [1, 7, 60])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("slab_rows", [None, 3])
def test_subspace_auxk_equals_dense_auxk_in_float64(n_dead, deferred, slab_rows, monkeypatch):
    if slab_rows:  # several slabs of batch rows in the forward and the backward
        monkeypatch.setattr(auxk, "SLAB_BYTES", 8 * n_dead * slab_rows)
    sae = make_sae(aux_k=12)
    x_BD = torch.randn(B, D, dtype=torch.float64)
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[torch.randperm(N)[:n_dead]] = True
    loss, aux, grads = loss_and_grads(sae, x_BD, dead_N, deferred)
    assert float(aux) > 0
    monkeypatch.setattr(sae, "aux_reconstruction", lambda x, m: dense_aux_reconstruction(sae, x, m))
    ref_loss, ref_aux, ref_grads = loss_and_grads(sae, x_BD, dead_N, False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-12, atol=1e-12)
    for name, g, ref in zip(("W_enc", "W_dec", "b_enc", "b_dec"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=name)


def test_pair_pre_acts_values_and_gradients_match_dense():
    torch.manual_seed(1)
    x_BD = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    W_ND = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    b_N = torch.randn(N, dtype=torch.float64, requires_grad=True)
    idx_BK = torch.randint(0, N, (B, 5))  # repeats within a row and across rows
    g_BK = torch.randn(B, 5, dtype=torch.float64)
    got = pair_pre_acts(x_BD, W_ND, b_N, idx_BK)
    ref = (x_BD @ W_ND.t() + b_N).gather(1, idx_BK)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, [x_BD, W_ND, b_N], g_BK)
    g_ref = torch.autograd.grad(ref, [x_BD, W_ND, b_N], g_BK)
    for a, r in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_fitted_residual_loss_equals_the_plain_expression():
    """AuxK's loss with the fitted scale s: the fused function gives the value and the ê
    gradient of the expression it replaced, at rows where s is clamped to 0 or 1 too."""
    from llm_sae.sae.ops import fitted_residual_loss

    g = torch.Generator().manual_seed(2)
    err_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    e_hat_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    e_hat_BD[:3] = -e_hat_BD[:3].abs() * err_BD[:3].sign()  # ⟨e, ê⟩ < 0: s = 0
    e_hat_BD[3:6] = 0.1 * err_BD[3:6]  # s = 10, clamped to 1
    e_hat_BD[6] = 0  # ‖ê‖ = 0
    e_hat_BD.requires_grad_()
    got = fitted_residual_loss(err_BD, e_hat_BD, 0.7)
    (g_got,) = torch.autograd.grad(got, e_hat_BD)
    with torch.no_grad():
        fit_B1 = (err_BD * e_hat_BD).sum(-1, keepdim=True)
        fit_B1 = (fit_B1 / e_hat_BD.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)).clamp_(0, 1)
    want = 0.7 * (err_BD - e_hat_BD * fit_B1).pow(2).sum(-1).mean()
    (g_want,) = torch.autograd.grad(want, e_hat_BD)
    assert int(((fit_B1 > 0) & (fit_B1 < 1)).sum()) > 5 and float(fit_B1[:3].max()) == 0 and float(fit_B1[3:6].min()) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def per_level_auxk(sae, x_BD, err_BD, dead_mask_N):
    """Matryoshka's AuxK as it was: ``SAE.auxk_loss`` once per level (four ``dead_decode``
    passes), each on that level's dead latents and the residual of its prefix."""
    from llm_sae.sae.base import SAE

    total = x_BD.new_zeros((), dtype=torch.float32)
    levels = [*sae._level_errs, (sae._level_errs[-1][1], sae.n_latents, err_BD)]
    for lo, hi, level_err_BD in levels:
        mask_N = torch.zeros_like(dead_mask_N)
        mask_N[lo:hi] = dead_mask_N[lo:hi]
        total = total + SAE.auxk_loss(sae, x_BD, level_err_BD, mask_N)
    return total


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("slab_rows", [None, 3])
@pytest.mark.parametrize("transcoder", [False, True])
def test_matryoshka_one_pass_auxk_equals_the_per_level_auxk_in_float64(deferred, slab_rows, transcoder, monkeypatch):
    """Levels [0, 8) [8, 20) [20, 56) [56, 96) with aux_k = 6: no dead latent in the first,
    fewer dead than k_aux in the second (all chosen, scale 1), a top-6 of 20 in the third,
    exactly k_aux in the last; and a transcoder's (16 outputs, another width than the input)."""
    if slab_rows:  # several slabs of a few batch rows
        monkeypatch.setattr(auxk, "SLAB_BYTES", 4 * D * slab_rows)
    torch.manual_seed(0)
    extra = {"d_out": 16} if transcoder else {}
    sae = REGISTRY["matryoshka"](SAEConfig(d_in=D, n_latents=N, k=K, aux_k=6, matryoshka_widths=[8, 20, 56], **extra)).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    sae.set_progress(1.0)
    x_BD = torch.randn(B, D, dtype=torch.float64)
    kw = {"target_BE": torch.randn(B, 16, dtype=torch.float64)} if transcoder else {}
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[[9, 12, 19]] = True
    dead_N[torch.randperm(36)[:20] + 20] = True
    dead_N[[60, 61, 70, 80, 90, 95]] = True
    loss, aux, grads = loss_and_grads(sae, x_BD, dead_N, deferred, **kw)
    assert float(aux) > 0
    monkeypatch.setattr(sae, "auxk_loss", lambda x, e, m: per_level_auxk(sae, x, e, m))
    ref_loss, ref_aux, ref_grads = loss_and_grads(sae, x_BD, dead_N, False, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-12, atol=1e-12)
    for name, g, ref in zip(("W_enc", "W_dec", "b_enc", "b_dec"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=name)
    # Only the dead rows of the weights get AuxK's gradient.
    _, _, no_aux = loss_and_grads(sae, x_BD, torch.zeros(N, dtype=torch.bool), False, **kw)
    for g, g0 in zip(grads[:3], no_aux[:3], strict=True):
        assert torch.equal(g[~dead_N], g0[~dead_N]) and not torch.equal(g[dead_N], g0[dead_N])


def separated_weights(n_dead: int, seed: int):
    """Float32 weights whose dead latents' pre-activations are c_j·(x·u − 0.3) + tiny
    noise with c_j = 1.1^j and |x·u − 0.3| ≥ 0.2: every row orders the dead latents by c
    (or its reverse), 10% apart, and none is near the ReLU's kink, so bfloat16's ~2⁻⁸
    error changes neither which k_aux are chosen nor which are positive; rows with
    x·u < 0.3 have only negative pre-activations (the ReLU's zeros)."""
    g = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(B, D, generator=g)
    u_D = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    a_B = 0.3 + torch.randn(B, generator=g).sign() * (0.2 + torch.rand(B, generator=g))
    x_BD += (a_B - x_BD @ u_D)[:, None] * u_D
    W_enc_ND = torch.randn(N, D, generator=g) * 0.3
    b_enc_N = torch.randn(N, generator=g) * 0.3
    dead_M = torch.randperm(N, generator=g)[:n_dead].sort().values
    c_M = 1.1 ** torch.arange(n_dead, dtype=torch.float32)[torch.randperm(n_dead, generator=g)]
    W_enc_ND[dead_M] = c_M[:, None] * (u_D + 1e-4 * torch.randn(n_dead, D, generator=g))
    b_enc_N[dead_M] = -0.3 * c_M
    W_dec_ND = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    return x_BD, W_enc_ND, b_enc_N, W_dec_ND, dead_M


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


# Relative error (in norm) of the bfloat16 path against the float32 one. bfloat16 rounds
# each operand and product to 2⁻⁹; sums over rows of terms of both signs, and AuxK's fit
# scale ⟨e, ê⟩/‖ê‖² for a residual e unrelated to ê, magnify that. Over 30 seeds of
# these tests the worst was 0.6% for ``dead_decode`` and 3.0% for ``grouped_auxk_loss``.
BF16_RTOL, BF16_RTOL_GROUPED = 2.0**-6, 2.0**-4


@pytest.mark.parametrize("slab_rows", [None, 7])
def test_bfloat16_dead_decode_agrees_with_float32(slab_rows, monkeypatch):
    """The bfloat16 products (``LLM_SAE_AUXK_BF16=1``; the default where the CPU has
    bfloat16 units) give ê and the dead rows' gradients of the float32 path to BF16_RTOL
    when the selection cannot differ; and differ from it, so the bf16 path did run."""
    if slab_rows:
        monkeypatch.setattr(auxk, "SLAB_BYTES", 4 * 40 * slab_rows)
    x_BD, W_enc_ND, b_enc_N, W_dec_ND, dead_M = separated_weights(40, 3)
    g_BD = torch.randn(B, D, generator=torch.Generator().manual_seed(4))
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LLM_SAE_AUXK_BF16", flag)
        params = [p.clone().requires_grad_() for p in (W_enc_ND, b_enc_N, W_dec_ND)]
        e_BD = auxk.dead_decode(x_BD, *params[:2], params[2], dead_M, 9)
        e_BD.backward(g_BD)
        out[flag] = [e_BD.detach(), *(p.grad[dead_M] for p in params)]
        assert e_BD.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in params)
    assert float((out["0"][0] == 0).all(1).sum()) > 3  # rows whose chosen values are all ≤ 0
    for name, got, ref in zip(("e_hat", "W_enc", "b_enc", "W_dec"), out["1"], out["0"], strict=True):
        assert 0 < rel_err(got, ref) < BF16_RTOL, name


def test_bfloat16_grouped_auxk_agrees_with_float32(monkeypatch):
    """As above for Matryoshka's one-pass AuxK: two groups, one top-k, one all chosen."""
    monkeypatch.setattr(auxk, "SLAB_BYTES", 4 * D * 16)  # several slabs
    x_BD, W_enc_ND, b_enc_N, W_dec_ND, dead_M = separated_weights(30, 5)
    gen = torch.Generator().manual_seed(6)
    groups = [auxk.DeadGroup(0, 20, 6, torch.randn(B, D, generator=gen), 0.5),
              auxk.DeadGroup(20, 30, 10, torch.randn(B, D, generator=gen), 1.0)]  # fmt: skip
    shift_D = torch.randn(D, generator=gen) * 0.01
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LLM_SAE_AUXK_BF16", flag)
        params = [p.clone().requires_grad_() for p in (W_enc_ND, b_enc_N, W_dec_ND)]
        loss = auxk.grouped_auxk_loss(x_BD, *params, dead_M, groups, shift_D)
        loss.backward()
        out[flag] = [loss.detach(), *(p.grad[dead_M] for p in params)]
    for name, got, ref in zip(("loss", "W_enc", "b_enc", "W_dec"), out["1"], out["0"], strict=True):
        assert 0 < rel_err(got, ref) < BF16_RTOL_GROUPED, name
