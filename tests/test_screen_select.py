"""Candidate selection from the bfloat16 screen: group maxima and ragged dot products."""

from __future__ import annotations

import pytest
import torch

from llm_sae.kernels import screen_buffers, screen_select


@pytest.mark.parametrize("N,m", [(4096, 40), (4096, 256), (1000, 35), (24576, 256), (24576, 64), (16384, 40)])
def test_grouped_topk_equals_topk(N, m):
    """The same values as torch.topk, ties included (values on a coarse grid), whether
    through groups (N a multiple of 8 with many groups), groups of groups (m small: the
    last two) or the plain topk."""
    g = torch.Generator().manual_seed(N + m)
    s_CN = (torch.randn(64, N, generator=g) * 4).round().bfloat16()  # many equal values
    s_CN[3] = 1.0  # a row of one value
    vals_CM, idx_CM = screen_select.grouped_topk(s_CN, m)
    want_CM = s_CN.topk(m, dim=1).values
    assert torch.equal(vals_CM.sort(dim=1, descending=True).values, want_CM)
    assert torch.equal(s_CN.gather(1, idx_CM), vals_CM)
    assert all(len(set(r.tolist())) == m for r in idx_CM)  # distinct columns


def test_group_top_bounds_everything_outside():
    g = torch.Generator().manual_seed(1)
    C, N, m = 32, 8192, 64
    s_CN = torch.randn(C, N, generator=g).bfloat16()
    gmax_CM, grp_CM, s_CP, G = screen_select.group_top(s_CN, m)
    P = m * screen_select.GROUP
    assert s_CP.shape == (C, P) and G == N // screen_select.GROUP
    cols_CP = screen_select.columns(grp_CM, torch.arange(P).expand(C, P), G)
    assert torch.equal(s_CN.gather(1, cols_CP), s_CP)
    assert torch.equal(s_CP.view(C, -1, m).amax(dim=1), gmax_CM)
    outside_CN = torch.ones(C, N, dtype=torch.bool).scatter_(1, cols_CP, False)
    rest_C = s_CN.float().masked_fill(~outside_CN, float("-inf")).amax(dim=1)
    assert (rest_C <= gmax_CM.float().amin(dim=1)).all()
    assert (outside_CN.sum(dim=1) == N - P).all()  # P distinct columns


def test_ragged_dot_matches_float64():
    g = torch.Generator().manual_seed(2)
    C, N, D = 6, 500, 40
    W_ND, y_CD = torch.randn(N, D, generator=g), torch.randn(C, D, generator=g)
    n_C = torch.tensor([3, 0, 7, 1, 0, 12])
    cols_P = torch.randint(0, N, (int(n_C.sum()),), generator=g)
    got_P = screen_select.ragged_dot(W_ND, cols_P, n_C, y_CD)
    rows_P = torch.repeat_interleave(torch.arange(C), n_C)
    want_P = (W_ND.double()[cols_P] * y_CD.double()[rows_P]).sum(dim=1)
    torch.testing.assert_close(got_P.double(), want_P, rtol=1e-5, atol=1e-5)
    empty = screen_select.ragged_dot(W_ND, cols_P[:0], torch.zeros(C, dtype=torch.long), y_CD)
    assert empty.shape == (0,)


def test_weight_copy_and_its_constants_match_float64():
    """The bfloat16 copy [W | b_hi | b_lo] and the error bound's constants (dw, wa, wa + dw,
    max |b|), measured block by block, against the same quantities in float64."""
    g = torch.Generator().manual_seed(3)
    N, D = 1000, 40  # several row blocks
    W_ND, b_N = torch.randn(N, D, generator=g), torch.randn(N, generator=g)
    W_ND[17] *= 50  # one latent with the largest norms
    Wa_ND2, (dw, wa, w, b_max) = screen_buffers.WeightCopy().make(W_ND, b_N)
    assert torch.equal(Wa_ND2[:, :D], W_ND.bfloat16())
    assert ((Wa_ND2[:, D:].double().sum(dim=1) - b_N.double()).abs() <= 2**-16 * b_N.double().abs()).all()
    Wa64 = Wa_ND2.double()
    want_dw = float((W_ND.double() - Wa64[:, :D]).norm(dim=1).max())
    want_wa = float(Wa64.norm(dim=1).max())
    assert dw == pytest.approx(want_dw, rel=1e-6) and wa == pytest.approx(want_wa, rel=1e-6)
    assert w == pytest.approx(want_wa + want_dw, rel=1e-6)
    assert b_max == float(b_N.abs().max())
