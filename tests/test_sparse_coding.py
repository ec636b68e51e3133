"""FISTA reaches known optima; the λ search hits a target L0."""

from __future__ import annotations

import pytest
import torch

from llm_sae.sae.sparse_coding import fista, fista_matched_l0, lipschitz_constant, soft_threshold

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def test_lipschitz_is_top_eigenvalue():
    g = torch.Generator().manual_seed(1)
    D_ND = torch.randn(40, 8, generator=g)
    expected = torch.linalg.eigvalsh((D_ND @ D_ND.T).double()).max().item()
    assert lipschitz_constant(D_ND) == pytest.approx(expected, rel=1e-4)
    assert lipschitz_constant(_orthonormal(8)) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_orthonormal_dictionary_gives_soft_threshold(nonnegative):
    # With orthonormal atoms the problem separates: z* = soft(x·Dᵀ, λ) exactly.
    D_ND = _orthonormal(16)
    g = torch.Generator().manual_seed(2)
    x_BD = torch.randn(10, 16, generator=g)
    b_D = torch.randn(16, generator=g) * 0.1
    z = fista(x_BD, D_ND, 0.3, bias_D=b_D, nonnegative=nonnegative, iters=500)
    corr = (x_BD - b_D) @ D_ND.T
    expected = (corr - 0.3).clamp_min(0) if nonnegative else corr.sign() * (corr.abs() - 0.3).clamp_min(0)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=0)
    assert (z == 0).any()  # the threshold really zeroes some codes


def test_overcomplete_solution_satisfies_kkt():
    # Optimality of the lasso: |Dᵀ r| ≤ λ everywhere, = λ·sign(z) on the support.
    g = torch.Generator().manual_seed(3)
    D_ND = torch.randn(48, 12, generator=g)
    D_ND /= D_ND.norm(dim=1, keepdim=True)
    x_BD = torch.randn(6, 12, generator=g)
    lam = 0.2
    z = fista(x_BD.double(), D_ND.double(), lam, nonnegative=False, iters=2000, tol=1e-10).double()
    grad = (x_BD.double() - z @ D_ND.double()) @ D_ND.double().T
    assert grad.abs().max() <= lam + 1e-3
    on = z != 0
    torch.testing.assert_close(grad[on], lam * z[on].sign(), atol=1e-3, rtol=0)


def test_mask_with_zero_lambda_is_least_squares_on_support():
    g = torch.Generator().manual_seed(4)
    D_ND = torch.randn(30, 10, generator=g)
    x_BD = torch.randn(1, 10, generator=g)
    mask = torch.zeros(1, 30)
    mask[0, [1, 5, 7]] = 1
    z = fista(x_BD, D_ND, 0.0, nonnegative=False, mask_BN=mask, iters=3000, tol=1e-10)
    sol = torch.linalg.lstsq(D_ND[[1, 5, 7]].T, x_BD[0]).solution
    torch.testing.assert_close(z[0, [1, 5, 7]], sol, atol=1e-3, rtol=1e-3)
    assert (z[0, mask[0] == 0] == 0).all()


def test_matched_l0_reaches_target():
    g = torch.Generator().manual_seed(5)
    D_ND = torch.randn(64, 16, generator=g)
    D_ND /= D_ND.norm(dim=1, keepdim=True)
    codes = torch.zeros(32, 64)
    for i in range(32):
        codes[i, torch.randperm(64, generator=g)[:4]] = torch.rand(4, generator=g) + 0.5
    x_BD = codes @ D_ND
    m = fista_matched_l0(x_BD, D_ND, 4.0, iters=200)
    assert m.l0 == pytest.approx(4.0, rel=0.1)
    assert float((m.z_BN != 0).sum(-1).float().mean()) == pytest.approx(m.l0)
    assert (m.z_BN >= 0).all()


def test_soft_threshold():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(soft_threshold(v, 1.0), torch.tensor([-1.0, 0, 0, 0, 1.0]))
    torch.testing.assert_close(soft_threshold(v, 1.0, nonnegative=True), torch.tensor([0, 0, 0, 0, 1.0]))
