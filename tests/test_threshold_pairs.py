"""JumpReLU's gate on the sparse kernels: the pairs above per-latent thresholds, found by the
bfloat16 screen (forced on here) or the dense pre-activations, and their virtual rows."""

from __future__ import annotations

import pytest
import torch

from llm_sae.kernels import threshold_pairs as tp
from llm_sae.sae.archs import jumprelu
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY

D, N, B = 48, 512, 96


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(B, D, generator=g) * torch.linspace(0.2, 3.0, B)[:, None]
    W_ND = torch.randn(N, D, generator=g) / D**0.5
    b_N = torch.randn(N, generator=g) * 0.1
    lo_N = torch.rand(N, generator=g) + 3.0
    s_B = torch.rand(B, generator=g) + 0.5
    return x_BD, W_ND, b_N, lo_N, s_B


def needed(x_BD, W_ND, b_N, lo_N, s_B):
    rel_BN = (x_BD @ W_ND.t() + b_N) / (1 if s_B is None else s_B[:, None])
    return {tuple(p) for p in (rel_BN > lo_N).nonzero().tolist()}


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("screen", ["1", "0"])
def test_pairs_hold_every_pair_above_its_threshold_with_float32_values(scaled, screen, monkeypatch):
    monkeypatch.setenv("LLM_SAE_SCREEN", screen)
    x_BD, W_ND, b_N, lo_N, s_B = data()
    s_B = s_B if scaled else None
    rows_P, cols_P, pre_P = tp.threshold_pairs(x_BD, W_ND, b_N, lo_N, s_B)
    got = list(zip(rows_P.tolist(), cols_P.tolist(), strict=True))
    want = needed(x_BD, W_ND, b_N, lo_N, s_B)
    assert 100 < len(want) < B * N // 8  # the thresholds select
    assert want <= set(got)
    assert len(got) == len(set(got)) and got == sorted(got)  # row-major, no pair twice
    assert len(got) < 1.5 * len(want)  # the screen's slack adds a few, not a dense block
    ref_P = (x_BD.double() @ W_ND.double().t() + b_N.double())[rows_P, cols_P]
    assert torch.allclose(pre_P.double(), ref_P, rtol=1e-5, atol=1e-5)


def test_the_screens_bound_is_what_keeps_pairs_just_above_their_thresholds(monkeypatch):
    """Thresholds a hair below row 0's pre-activations: every one of its pairs is needed,
    and bfloat16's rounding (~0.4%) hides about half of them unless the bound covers it."""
    monkeypatch.setenv("LLM_SAE_SCREEN", "1")
    x_BD, W_ND, b_N, _, _ = data(1)
    pre_N = x_BD[0] @ W_ND.t() + b_N
    lo_N = pre_N - 1e-4 * pre_N.abs() - 1e-6
    want = {(0, j) for j in range(N)}
    for scale, ok in ((1.0, True), (0.0, False)):
        monkeypatch.setattr(tp, "BOUND_SCALE", scale)
        rows_P, cols_P, _ = tp.threshold_pairs(x_BD, W_ND, b_N, lo_N)
        got = set(zip(rows_P.tolist(), cols_P.tolist(), strict=True))
        assert (want <= got) == ok


def test_fold_rows_puts_each_pair_in_its_own_slot_of_its_rows_virtual_rows():
    g = torch.Generator().manual_seed(0)
    count_B = torch.randint(0, 40, (B,), generator=g)
    count_B[3] = 300  # one long row
    rows_P = torch.repeat_interleave(torch.arange(B), count_B)
    rows_V, v_P, j_P, J = tp.fold_rows(rows_P, B)
    assert torch.equal(rows_V[v_P], rows_P)
    assert int(j_P.max()) < J and len(set(zip(v_P.tolist(), j_P.tolist(), strict=True))) == rows_P.numel()
    assert torch.equal(torch.bincount(rows_V, minlength=B), (count_B + J - 1) // J)  # no virtual row to spare
    assert J < 300  # the long row is cut, not the width of all


@pytest.mark.parametrize("relative", [False, True])
def test_jumprelu_trains_the_same_through_the_screen(relative, monkeypatch):
    """Float32 with the screen forced on against the dense forward: the same pairs fire,
    the same loss, and the same gradients up to float32 summation order (the dead
    latents' products in float32 too: in bfloat16 they revive other thresholds)."""
    monkeypatch.setenv("LLM_SAE_AUXK_BF16", "0")
    torch.manual_seed(0)
    sae = REGISTRY["jumprelu"](SAEConfig(arch="jumprelu", d_in=D, n_latents=N, k=8, jumprelu_sparsity="tanh",
                                         target_l0=8.0, bandwidth=0.4))
    x_BD = data()[0]
    sae.set_progress(0.0 if relative else 1.0)
    sae.init_from_sample(x_BD)  # θ on target through this gate
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[::7] = True
    names, params = zip(*sae.named_parameters(), strict=True)
    outs = []
    for fwd, env in ((sae.forward_dense, "0"), (sae.forward, "1")):
        monkeypatch.setenv("LLM_SAE_SCREEN", env)
        with torch.no_grad():
            sae.l0_control.zero_()
        out = fwd(x_BD, dead_mask_N=dead_N)
        outs.append((out, torch.autograd.grad(out.loss, params)))
    (dense, g_dense), (sparse, g_sparse) = outs
    assert 4 < float(dense.metrics["l0"]) < 16
    assert torch.equal(sparse.fired_N, dense.fired_N)
    assert torch.allclose(sparse.loss, dense.loss, rtol=1e-5)
    for name, a, b in zip(names, g_dense, g_sparse, strict=True):
        assert torch.allclose(b, a, rtol=1e-3, atol=1e-5 * float(a.abs().max())), name


def test_the_sparse_forward_falls_back_to_the_dense_one_when_rows_fill(monkeypatch):
    monkeypatch.setenv("LLM_SAE_SCREEN", "1")
    sae = REGISTRY["jumprelu"](SAEConfig(arch="jumprelu", d_in=D, n_latents=N, k=8, init_threshold=0.0))
    calls = []
    monkeypatch.setattr(sae, "forward_dense", lambda *a, **kw: calls.append(1))
    sae(data()[0])
    assert calls == [1]
    monkeypatch.setattr(jumprelu, "SPARSE_FRACTION", 1)
    assert sae(data()[0]) is not None and calls == [1]


def test_weights_too_large_for_the_screens_bound_take_the_dense_path(monkeypatch):
    monkeypatch.setenv("LLM_SAE_SCREEN", "1")
    x_BD, W_ND, b_N, lo_N, _ = data()
    big = 1e4  # rows of norm 1e4: γ·‖w̃a‖ > 0.1
    rows_P, cols_P, pre_P = tp.threshold_pairs(x_BD, W_ND * big, b_N * big, lo_N * big)
    assert set(zip(rows_P.tolist(), cols_P.tolist(), strict=True)) == needed(x_BD, W_ND * big, b_N * big, lo_N * big, None)


def test_clear_workspace_frees_the_gates_weight_copy(monkeypatch):
    from llm_sae import kernels

    monkeypatch.setenv("LLM_SAE_SCREEN", "1")
    x_BD, W_ND, b_N, lo_N, _ = data()
    tp.threshold_pairs(x_BD, W_ND, b_N, lo_N)
    assert tp._COPY.Wa is not None
    kernels.clear_workspace()
    assert tp._COPY.Wa is None
