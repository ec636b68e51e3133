"""The GPU path on a real CUDA device: Triton kernels against the torch reference at
realistic shapes, in float32 and under bf16 autocast, and a bf16 training run that learns.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

import llm_sae.kernels.triton as triton_kernels
from llm_sae.kernels.topk import dense_topk_decode, dense_topk_encode, topk_decode, topk_encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def _params(B: int, D: int, N: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(B, D, generator=g, device=DEV) * 3
    W_enc = (torch.randn(N, D, generator=g, device=DEV) / D**0.5).requires_grad_()
    b_enc = (torch.randn(N, generator=g, device=DEV) * 0.1).requires_grad_()
    W_dec = (torch.randn(N, D, generator=g, device=DEV) / D**0.5).requires_grad_()
    return x, W_enc, b_enc, W_dec


def _step(encode, decode, x, W_enc, b_enc, W_dec, k, amp: bool):
    for t in (W_enc, b_enc, W_dec):
        t.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        vals, idx = encode(x, W_enc, b_enc, k)
        x_hat = decode(vals, idx, W_dec)
    loss = (x_hat.float() - x).pow(2).sum() + vals.float().pow(3).sum()
    loss.backward()
    order = idx.argsort(dim=1)
    return (
        idx.gather(1, order),
        vals.float().gather(1, order),
        x_hat.float(),
        [t.grad.clone() for t in (W_enc, b_enc, W_dec)],
    )


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_triton_kernels_match_the_torch_path_on_cuda(amp, monkeypatch):
    assert triton_kernels.available(), "CUDA torch builds ship triton"
    B, D, N, k = 1024, 768, 16384, 32
    x, W_enc, b_enc, W_dec = _params(B, D, N)
    monkeypatch.setenv("LLM_SAE_TRITON", "1")
    assert triton_kernels.usable_for(W_dec)
    tri = _step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, k, amp)
    monkeypatch.setenv("LLM_SAE_TRITON", "0")
    ref = _step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, k, amp)
    # The same top-k (the encoder matmul is the same op on both paths).
    assert torch.equal(tri[0], ref[0])
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(tri[1:3], ref[1:3], strict=True):
        torch.testing.assert_close(a, b, **tol)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec"], tri[3], ref[3], strict=True):
        assert a.dtype == torch.float32, name  # master gradients stay float32
        scale = b.abs().max().clamp_min(1e-6)
        err = (a - b).abs().max() / scale
        assert err < (2e-2 if amp else 1e-5), f"{name}: relative error {err:.2e}"


def test_sparse_path_matches_dense_autograd_on_cuda(monkeypatch):
    monkeypatch.setenv("LLM_SAE_TRITON", "1")
    B, D, N, k = 256, 256, 4096, 16
    x, W_enc, b_enc, W_dec = _params(B, D, N, seed=1)
    fast = _step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, k, amp=False)
    dense = _step(dense_topk_encode, dense_topk_decode, x, W_enc, b_enc, W_dec, k, amp=False)
    assert torch.equal(fast[0], dense[0])
    torch.testing.assert_close(fast[2], dense[2], rtol=1e-4, atol=1e-4)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec"], fast[3], dense[3], strict=True):
        err = (a - b).abs().max() / b.abs().max().clamp_min(1e-6)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_sparse_backward_never_builds_a_dense_gradient_on_cuda(monkeypatch):
    """Peak memory of the sparse step stays far below one dense [B, N] float32 tensor."""
    monkeypatch.setenv("LLM_SAE_TRITON", "1")
    B, D, N, k = 4096, 256, 65536, 32
    x, W_enc, b_enc, W_dec = _params(B, D, N, seed=2)
    _step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, k, amp=True)  # warm the kernels
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(topk_encode, topk_decode, x, W_enc, b_enc, W_dec, k, amp=True)
    extra = torch.cuda.max_memory_allocated() - base
    dense_BN = B * N * 4
    # The bf16 pre-activations (B·N·2 bytes) and the gradients (3 × weights) are the
    # floor; a dense float32 gradient would add B·N·4 more.
    weights = (2 * N * D + N) * 4
    assert extra < B * N * 2 + 3 * weights + dense_BN // 4, (extra, dense_BN)


@pytest.mark.slow
def test_bf16_training_on_cuda_recovers_the_dictionary_as_well_as_fp32():
    """The ground-truth benchmark's default shape, fp32 against bf16 autocast on the GPU."""
    from llm_sae.bench.recovery import RecoveryConfig, make_data, score_sae, train_one

    cfg = RecoveryConfig(archs=["topk"], tokens=2_000_000, device="cuda", progress=False)
    data = make_data(cfg)
    dev = torch.device("cuda")
    scores = {
        p: score_sae(train_one("topk", data, cfg, dev, precision=p)[0], data, cfg, dev)
        for p in ("fp32", "bf16")
    }
    print(scores)
    assert scores["bf16"]["frac_recovered"] >= 0.85, scores
    assert scores["bf16"]["dead_frac"] < 0.01, scores
    assert scores["bf16"]["frac_recovered"] >= scores["fp32"]["frac_recovered"] - 0.03, scores


def _cuda_trainer(**kw):
    from llm_sae.sae.registry import REGISTRY
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.trainer import Trainer

    cfg = TrainConfig(store="-", out="-", d_in=64, n_latents=512, k=8, batch_size=256, **kw)
    sae = REGISTRY["topk"](cfg).to(DEV)
    return Trainer(sae, cfg, total_steps=1000, input_scale=1.0)


def test_gpu_step_checks_the_loss_one_step_late_and_skips_the_update():
    from llm_sae.train.config import TrainingError

    tr = _cuda_trainer()
    x = torch.randn(256, 64, device=DEV)
    for _ in range(3):
        tr.step(x)
    before = {k: v.clone() for k, v in tr.sae.state_dict().items()}
    tr.step(x * 1e30)  # finite input, overflowing loss: fused Adam must skip the update
    for k, v in tr.sae.state_dict().items():
        # (the decoder's renormalisation may move last bits; an Adam step moves ~lr)
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
    with pytest.raises(TrainingError, match="loss became inf"):
        tr.step(x)


def test_auxk_from_the_host_mask_equals_the_device_mask():
    tr = _cuda_trainer()
    x = torch.randn(256, 64, device=DEV)
    dead = torch.zeros(512, dtype=torch.bool, device=DEV)
    dead[::7] = True
    outs = [tr.sae(x, dead_mask_N=m) for m in (dead, dead.cpu())]
    assert outs[0].metrics["aux"] > 0
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_topk_selects_the_top_k_on_cuda(dtype):
    """The fused encoder + top-k kernel at a realistic shape: each value is the named
    latent's pre-activation, and the chosen set is the float64 top k except at near-ties."""
    from llm_sae.kernels.fused_topk import fused_topk_encode

    B, D, N, k = 2048, 768, 24576, 32
    x, W_enc, b_enc, _ = _params(B, D, N)
    x, W = x.to(dtype), W_enc.detach().to(dtype)
    vals, idx = fused_topk_encode(x, W, b_enc.detach(), k)
    pre = x.double() @ W.double().T + b_enc.detach().double()
    torch.testing.assert_close(vals.double(), pre.gather(1, idx), rtol=1e-4, atol=1e-4)
    top = pre.topk(k + 1, dim=1).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-3
    assert clear.float().mean() > 0.9
    ref = pre.topk(k, dim=1).indices
    same = (idx.sort(1).values == ref.sort(1).values).all(1)
    assert bool(same[clear].all())
