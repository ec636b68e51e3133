"""SlicedAdam is torch's Adam: the same updates and state, whole or a slab of rows at a time."""

from __future__ import annotations

import pytest
import torch

from llm_sae.train.optim import SlicedAdam


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(37, 11, generator=g, dtype=torch.float64)
    b = torch.randn(37, generator=g, dtype=torch.float64)
    grads = [(torch.randn(37, 11, generator=g, dtype=torch.float64),
              torch.randn(37, generator=g, dtype=torch.float64)) for _ in range(6)]
    return W, b, grads


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_sliced_adam_equals_torch_adam(fused, amsgrad):
    W, b, grads = _problem()
    ref = [torch.nn.Parameter(W.clone()), torch.nn.Parameter(b.clone())]
    mine = [torch.nn.Parameter(W.clone()), torch.nn.Parameter(b.clone())]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, amsgrad=amsgrad, fused=fused)
    opt_ref, opt = torch.optim.Adam(ref, **kw), SlicedAdam(mine, **kw)
    for i, (gW, gb) in enumerate(grads):
        for p, g in zip(ref, (gW, gb), strict=True):
            p.grad = g.clone()
        opt_ref.step()
        mine[1].grad = gb.clone()
        if i % 2:  # whole, through step
            mine[0].grad = gW.clone()
            opt.step()
        else:  # W in uneven slabs of rows, b whole
            mine[0].grad = None
            opt.step()
            opt.step_rows(mine[0], [(s, gW[s:s + 10]) for s in range(0, 37, 10)])
        for a, r in zip(mine, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=0, atol=1e-15)
    # The state is Adam's, key for key: a checkpoint of either loads into the other.
    sd_ref, sd = opt_ref.state_dict(), opt.state_dict()
    assert sd["param_groups"] == sd_ref["param_groups"]
    for i in sd_ref["state"]:
        for key, v in sd_ref["state"][i].items():
            torch.testing.assert_close(sd["state"][i][key], v, rtol=0, atol=1e-15)


def test_found_inf_skips_the_update_on_the_device():
    W, b, grads = _problem(1)
    p = torch.nn.Parameter(W.clone())
    opt = SlicedAdam([p], lr=1e-2, fused=True)
    p.grad = grads[0][0].clone()
    opt.step(found_inf=torch.ones(()))
    opt.step_rows(p, [(0, grads[0][0])], found_inf=torch.ones(()))
    torch.testing.assert_close(p.detach(), W, rtol=0, atol=0)
    opt.step(found_inf=torch.zeros(()))
    assert not torch.equal(p.detach(), W)
