"""The fused encoder + top-k kernel against torch.topk, under the Triton interpreter.

Not collected by itself (no test_ prefix): ``tests/test_fused_topk.py`` runs this file in
a fresh interpreter with ``TRITON_INTERPRET=1`` set before triton is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_fused_topk.py", allow_module_level=True)

from llm_sae.kernels.fused_topk import decode_keys, fused_topk_encode  # noqa: E402


def _problem(B, D, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype)
    W = (torch.randn(N, D, generator=g) / D**0.5).to(dtype)
    b = torch.randn(N, generator=g) * 0.1
    return x, W, b


def _reference(x, W, b):
    """The same products summed in float64: the kernel's float32 sums differ only by
    rounding, so only near-ties may pick other latents."""
    return x.double() @ W.double().T + b.double()


# Small blocks: the interpreter runs every program in Python. (B, D, N, k, dtype): several
# row blocks, spans of latents that end mid-tile, k not a power of two, k above a tile.
SMALL = dict(block_m=16, block_n=32, tiles=2)


@pytest.mark.parametrize("B,D,N,k,dtype", [
    (20, 40, 300, 5, torch.float32), (20, 32, 150, 8, torch.bfloat16), (9, 48, 200, 40, torch.float32),
])
def test_selects_the_top_k_of_the_pre_activations(B, D, N, k, dtype):
    x, W, b = _problem(B, D, N, dtype)
    vals, idx = fused_topk_encode(x, W, b, k, **SMALL)
    assert vals.shape == idx.shape == (B, k) and vals.dtype == torch.float32
    pre = _reference(x, W, b)
    ref_vals = pre.topk(k, dim=1).values
    kth, next_ = ref_vals[:, -1], pre.topk(k + 1, dim=1).values[:, -1] if k < N else None
    # Each chosen value is the pre-activation of the latent it names.
    torch.testing.assert_close(vals.double(), pre.gather(1, idx), rtol=1e-5, atol=1e-5)
    # The chosen set is the top k wherever the k-th and (k+1)-th are not a near-tie.
    clear = (kth - next_).abs() > 1e-4 if next_ is not None else torch.ones(B, dtype=torch.bool)
    assert bool(clear.float().mean() > 0.9)
    ref_sets = pre.topk(k, dim=1).indices
    for r in torch.nonzero(clear).squeeze(1).tolist():
        assert set(idx[r].tolist()) == set(ref_sets[r].tolist()), r
    assert len(set(idx[0].tolist())) == k  # no latent twice


def test_ties_go_to_the_lower_index_and_padding_is_never_chosen():
    x = torch.ones(3, 32)
    W = torch.ones(100, 32)  # every latent ties
    b = torch.zeros(100)
    vals, idx = fused_topk_encode(x, W, b, 4, **SMALL)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]
    assert torch.equal(vals, torch.full((3, 4), 32.0))


def test_keys_round_trip_negative_zero_and_extremes():
    v = torch.tensor([-3.5, -0.0, 0.0, 1e-38, 2.0, -1e30, float("inf")])
    i = torch.arange(v.numel(), dtype=torch.int64) * 1000
    bits = v.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    keys = (ordered << 32) | (0x7FFFFFFF - i)
    back_v, back_i = decode_keys(keys)
    assert torch.equal(back_v.view(torch.int32), v.view(torch.int32)) and torch.equal(back_i, i)
    # Key order is value order.
    assert torch.equal(keys.argsort(), v.argsort(stable=True))


def test_the_training_encoder_takes_the_fused_path_with_the_same_gradients(monkeypatch):
    """topk_encode under LLM_SAE_FUSED_TOPK=1: the same winners, values and gradients as
    the plain float32 path (the backward is the sparse one either way)."""
    from llm_sae.kernels.topk import dense_topk_encode, topk_encode

    x, W, b = _problem(20, 32, 150, torch.float32, seed=3)
    monkeypatch.setenv("LLM_SAE_FUSED_TOPK", "1")
    p1 = [t.clone().requires_grad_() for t in (x, W, b)]
    p2 = [t.clone().requires_grad_() for t in (x, W, b)]
    v1, i1 = topk_encode(*p1, 6)
    v2, i2 = dense_topk_encode(*p2, 6)
    o1, o2 = i1.sort(1), i2.sort(1)
    assert torch.equal(o1.values, o2.values)
    torch.testing.assert_close(v1.gather(1, o1.indices), v2.gather(1, o2.indices))
    g = torch.randn(20, 6)
    (v1.gather(1, o1.indices) * g).sum().backward()
    (v2.gather(1, o2.indices) * g).sum().backward()
    for a, c in zip(p1, p2, strict=True):
        torch.testing.assert_close(a.grad, c.grad)
