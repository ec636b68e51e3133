"""Matryoshka on the sparse kernels: the dense path's losses, gradients and resume."""

from __future__ import annotations

import pytest
import torch

from llm_sae.kernels import batch_topk
from llm_sae.kernels.batch_topk import fold_pairs
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY

D, N, K, B = 24, 96, 4, 40
WIDTHS = [8, 20, 56]


@pytest.mark.parametrize("widths", [[N], [*WIDTHS, N]])
def test_fold_pairs_holds_each_kept_pair_once_in_its_rows_and_range(widths, monkeypatch):
    monkeypatch.setattr(batch_topk, "ROW_COST", 1)  # cheap rows: short virtual rows
    g = torch.Generator().manual_seed(0)
    idx_BK = torch.stack([torch.randperm(N, generator=g)[:11] for _ in range(B)])
    on_BK = (torch.rand(B, 11, generator=g) < 0.6).double()
    on_BK[:3] = 1  # long rows next to short ones
    rows_V, pos_VJ, on_VJ, sizes = fold_pairs(idx_BK, on_BK, widths)
    idx_VJ = idx_BK[rows_V].gather(1, pos_VJ)
    assert sum(sizes) == rows_V.numel() == idx_VJ.shape[0] and idx_VJ.shape[1] < 11
    want = sorted((b, int(i)) for b in range(B) for i, on in zip(idx_BK[b], on_BK[b], strict=True) if on)
    got = sorted((int(r), int(i)) for r, i_J, on_J in zip(rows_V, idx_VJ, on_VJ, strict=True)
                 for i, on in zip(i_J, on_J, strict=True) if on)
    assert got == want
    a, lo = 0, 0
    for size, w in zip(sizes, widths, strict=True):  # virtual rows of range i, in order
        assert all(lo <= int(i) < w for i_J, on_J in zip(idx_VJ[a : a + size], on_VJ[a : a + size], strict=True)
                   for i, on in zip(i_J, on_J, strict=True) if on)
        a, lo = a + size, w


def make(widths=WIDTHS, **kw):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=D, n_latents=N, k=K, aux_k=6, matryoshka_widths=widths, **kw)
    sae = REGISTRY["matryoshka"](cfg).double().train()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if kw.get("skip"):
            sae.W_skip.normal_(0, 0.1)
    return sae


def loss_and_grads(sae, x_BD, y_BE, dead_N, forward):
    params = [p for p in sae.parameters()]
    out = forward(x_BD, target_BE=y_BE, dead_mask_N=dead_N)
    return out, torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("case", ["clean", "dead in every level", "transcoder", "one level", "relative selection"])
def test_sparse_matryoshka_equals_dense_in_float64(case):
    transcoder = case == "transcoder"
    sae = make(d_out=16, skip=True) if transcoder else make([N]) if case == "one level" else make()
    relative = case == "relative selection"  # early training: ranked relative to the rows' norms
    sae.set_progress(0.0 if relative else 1.0)
    x_BD = torch.randn(B, D, dtype=torch.float64)
    x_BD[:2] *= 10  # rows that keep many latents
    y_BE = torch.randn(B, 16, dtype=torch.float64) if transcoder else None
    dead_N = torch.zeros(N, dtype=torch.bool)
    if case not in ("clean", "one level", "relative selection"):
        dead_N[[1, 5, 9, 13, 30, 40, 60, 70, 90]] = True  # 2 or 3 in each of the 4 levels
    out, grads = loss_and_grads(sae, x_BD, y_BE, dead_N, sae.forward)
    thr = sae.threshold.clone()
    sae.threshold.fill_(-1.0)
    ref, ref_grads = loss_and_grads(sae, x_BD, y_BE, dead_N, sae.forward_dense)
    if not relative:  # the relative phase reads its raw cut-off from the candidates
        torch.testing.assert_close(sae.threshold, thr, rtol=1e-12, atol=1e-12)
    assert set(out.metrics) == set(ref.metrics) >= {"l0", "aux"} | ({"mse_8", "mse_20", "mse_56"} if case != "one level" else set())
    for key, value in ref.metrics.items():
        torch.testing.assert_close(out.metrics[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert (float(ref.metrics["aux"]) > 0) == (case not in ("clean", "one level", "relative selection"))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_hat_BD, ref.x_hat_BD, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.fired_N, ref.fired_N)
    names = [n for n, _ in sae.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_training_takes_the_sparse_path_and_evaluation_the_dense_one(monkeypatch):
    sae = make()
    x_BD = torch.randn(B, D, dtype=torch.float64)
    calls = []
    real = type(sae).forward_dense
    monkeypatch.setattr(type(sae), "forward_dense", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    sae(x_BD)
    assert calls == []
    sae.eval()
    sae(x_BD)
    assert calls == [1]


def test_matryoshka_resumes_exactly(tmp_path):
    """A trainer restored from a checkpoint steps to the bytes of the uninterrupted one."""
    from llm_sae.sources.synthetic import SyntheticActivations, SyntheticConfig
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import build_sae
    from llm_sae.train.trainer import Trainer

    data = SyntheticActivations(SyntheticConfig(d_in=16, n_features=32, mean_active=3, seed=0))
    batches = list(data.batches(64, 12))
    cfg = TrainConfig(store="", out="", arch="matryoshka", n_latents=64, k=4, tokens=12 * 64,
                      batch_size=64, dead_tokens=2 * 64, matryoshka_widths=[8, 32])

    def trainer():
        torch.manual_seed(0)
        tr = Trainer(build_sae(cfg, 16), cfg, total_steps=12)
        tr.init_from_sample(data.batch(10**6, 512))
        with torch.no_grad():
            tr.sae.b_enc[4:8] = tr.sae.b_enc[40:44] = -100.0  # dead in two levels: AuxK acts
        return tr

    ref = trainer()
    for x_BD in batches:
        ref.step(x_BD)
    assert ref.dead_mask()[4:8].all() and ref.dead_mask()[40:44].all()
    first = trainer()
    for x_BD in batches[:6]:
        first.step(x_BD)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "ckpt")
    for x_BD in batches[6:]:
        resumed.step(x_BD)
    for key, value in ref.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[key], value), key


def test_under_autocast_kept_values_are_float32_dot_products():
    """Under autocast the candidate search runs in bfloat16: the kept pairs' values are
    then recomputed in float32 (pair_pre_acts), not taken from the search."""
    from llm_sae.kernels.batch_topk import batch_topk_decodes

    torch.manual_seed(0)
    x_BD, W_ND, b_N, Wd_ND = torch.randn(B, D), torch.randn(N, D), torch.randn(N) * 0.1, torch.randn(N, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, vals_VJ, idx_VJ, _ = batch_topk_decodes(x_BD, W_ND, b_N, Wd_ND, K, [N])
    assert vals_VJ.dtype == torch.float32 and int((vals_VJ > 0).sum()) > B
    kept = vals_VJ > 0
    pre_BN = x_BD @ W_ND.t() + b_N  # float32; bfloat16 values would be ~1e-2 off
    gap_P = (pre_BN[:, idx_VJ[kept]] - vals_VJ[kept]).abs().min(0).values  # its own row's
    assert float(gap_P.max()) < 1e-4


def test_a_one_row_batch_trains():
    """One row keeps k latents on average like any batch (the base class's loss needs a row)."""
    sae = make()
    out = sae(torch.randn(1, D, dtype=torch.float64), dead_mask_N=torch.ones(N, dtype=torch.bool))
    assert out.x_hat_BD.shape == (1, D)
    out.loss.backward()
    assert torch.isfinite(sae.W_enc.grad).all() and float(sae.W_dec.grad.abs().sum()) > 0
