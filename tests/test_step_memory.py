"""The memory-saving training step: weight gradients deferred by the sparse kernels and
applied a slab of rows at a time must give the step that plain autograd gradients,
torch's clip_grad_norm_ and torch's Adam give, and never hold a whole [N, D] gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llm_sae.train.update as train_mod
from llm_sae.distributed.parallel import Parallel
from llm_sae.kernels.sparse_ops import DeferredWeightGrads, sparse_t_dense
from llm_sae.kernels.topk import topk_decode, topk_encode
from llm_sae.sae.registry import REGISTRY
from llm_sae.train.config import TrainConfig
from llm_sae.train.trainer import Trainer

D, N, K, B = 32, 200, 4, 128

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_step(sae, opt, x_BD, scale, dead_N, clip):
    """One step the plain way: autograd gradients, projection, torch's clip, torch's Adam."""
    out = sae(x_BD * scale, dead_mask_N=dead_N)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.constrain_grads()
    norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), clip) if clip > 0 else None
    opt.step()
    sae.constrain_weights()
    return norm


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_deferred_step_equals_plain_autograd_clip_and_adam(monkeypatch, clip):
    # Slabs of 48 rows: 200 latents take 5 slabs, the last one short.
    monkeypatch.setattr(train_mod, "GRAD_SLAB_BYTES", 48 * D * 4)
    torch.manual_seed(0)
    cfg = TrainConfig(store="-", out="-", d_in=D, n_latents=N, k=K, batch_size=B,
                      grad_clip=clip, dead_tokens=3 * B, lr=3e-3, lr_warmup=0.0)
    sae = REGISTRY["topk"](cfg)
    with torch.no_grad():
        sae.b_enc[:40] = -4.0  # latents that never win: dead after 3 steps, then AuxK runs
    ref = copy.deepcopy(sae)
    trainer = Trainer(sae, cfg, total_steps=100, input_scale=1.3)
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)
    clipped = []
    for _ in range(8):
        x_BD = torch.randn(B, D) * 2 + 0.5
        dead = trainer.dead_mask()
        norm = _reference_step(ref, opt, x_BD, 1.3, dead, clip)
        if norm is not None:
            clipped.append(float(norm) > clip)
        trainer.step(x_BD)
    if clip == 0.05:
        assert all(clipped)  # the clip coefficient was applied on every step
    assert bool(trainer.dead_mask().any())  # AuxK ran (the partly deferred path) too
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        if clip == 0.0:  # no norm to sum: bit for bit
            assert torch.equal(p, q), name
        else:  # the global norm is summed in another order
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(trainer.opt.state[p][key], opt.state[q][key], rtol=1e-4, atol=1e-9)


def test_deferred_step_is_bitwise_the_plain_trainer_step_without_clipping():
    class Plain(Parallel):
        defers_weight_grads = False

    torch.manual_seed(0)
    cfg = TrainConfig(store="-", out="-", d_in=D, n_latents=N, k=K, batch_size=B, grad_clip=0.0)
    sae = REGISTRY["topk"](cfg)
    a = Trainer(copy.deepcopy(sae), cfg, total_steps=50)
    b = Trainer(copy.deepcopy(sae), cfg, total_steps=50, parallel=Plain())
    for _ in range(3):
        x_BD = torch.randn(B, D)
        a.step(x_BD)
        b.step(x_BD)
    for p, q in zip(a.sae.parameters(), b.sae.parameters(), strict=True):
        assert torch.equal(p, q)


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {
            t.data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        out = func(*args, **kwargs)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            # New memory only: not views, not in-place results or out= arguments.
            if isinstance(o, torch.Tensor) and o.layout == torch.strided and not o._is_view():
                if o.data_ptr() not in seen:
                    self.shapes.append(tuple(o.shape))
        return out


def test_step_never_allocates_a_whole_weight_gradient(monkeypatch):
    monkeypatch.setattr(train_mod, "GRAD_SLAB_BYTES", 48 * D * 4)
    torch.manual_seed(0)
    cfg = TrainConfig(store="-", out="-", d_in=D, n_latents=N, k=K, batch_size=B)
    trainer = Trainer(REGISTRY["topk"](cfg), cfg, total_steps=50, input_scale=1.0)
    trainer.step(torch.randn(B, D))  # Adam's state is created here
    with _Shapes() as seen:
        trainer.step(torch.randn(B, D))
    assert trainer.sae.W_enc.grad is None and trainer.sae.W_dec.grad is None
    assert (N, D) not in seen.shapes
    assert max(r * c for r, c in (s for s in seen.shapes if len(s) == 2)) <= max(B, 48) * D


def test_deferred_weight_grads_match_autograd_with_two_decodes():
    """Two uses of W_dec (the main decode and AuxK's) are summed; garbage in the
    buffer does not leak in; slabs of rows equal the whole."""
    torch.manual_seed(0)
    x = torch.randn(B, D)
    W_enc, W_dec = (torch.nn.Parameter(torch.randn(N, D)) for _ in range(2))
    b_enc = torch.nn.Parameter(torch.zeros(N))

    def loss():
        v, i = topk_encode(x, W_enc, b_enc, K)
        x_hat = topk_decode(v, i, W_dec)
        v2, i2 = topk_encode(x * 0.5, W_enc.detach(), b_enc.detach(), 2 * K)
        return (x_hat - x).pow(2).sum() + topk_decode(v2, i2, W_dec).pow(2).sum()

    loss().backward()
    want = {"enc": W_enc.grad.clone(), "dec": W_dec.grad.clone()}
    W_enc.grad = W_dec.grad = None
    grads = DeferredWeightGrads([W_enc, W_dec])
    with grads.collecting():
        loss().backward()
    assert W_enc.grad is None and W_dec.grad is None and b_enc.grad is not None
    for name, p in (("enc", W_enc), ("dec", W_dec)):
        out = torch.full((N, D), float("nan"))
        torch.testing.assert_close(grads.materialize(p, out), want[name], rtol=1e-5, atol=1e-5)
        slab = torch.full((37, D), float("nan"))
        for s in range(0, N, 37):
            part = grads.materialize(p, slab[: min(37, N - s)], s)
            assert torch.equal(part, out[s : s + part.shape[0]])
    grads.flush()
    torch.testing.assert_close(W_dec.grad, want["dec"], rtol=1e-5, atol=1e-5)


def test_sparse_t_dense_into_a_reused_buffer():
    torch.manual_seed(0)
    idx = torch.rand(B, N).topk(K, dim=1).indices  # distinct latents per row, as TopK gives
    coef, rows = torch.randn(B, K), torch.randn(B, D)
    dense = torch.zeros(B, N).scatter(1, idx, coef).t() @ rows
    buf = torch.full((N, D), float("nan"))
    got = sparse_t_dense(idx, coef, rows, N, 8, out_ND=buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_t_dense(idx, coef, rows, N, 8, buf, accumulate=True), 2 * dense,
                               rtol=1e-5, atol=1e-5)


def test_matryoshka_step_keeps_no_level_stack_and_auxk_keeps_no_rows():
    """Matryoshka's step: its L level decodes are running sums both ways (no [L, B, E]
    tensor, forward or backward), and AuxK over the dead latents of every level keeps
    nothing of the batch's size for the backward (its gradients are [M, D] blocks)."""
    torch.manual_seed(0)
    widths = [20, 60, 120]
    cfg = TrainConfig(store="-", out="-", arch="matryoshka", d_in=D, n_latents=N, k=K, batch_size=B,
                      matryoshka_widths=widths, dead_tokens=2 * B)  # fmt: skip
    trainer = Trainer(REGISTRY["matryoshka"](cfg), cfg, total_steps=50, input_scale=1.0)
    with torch.no_grad():
        trainer.sae.b_enc[[*range(5, 15), *range(30, 40), *range(100, 110), *range(150, 160)]] = -4.0
    x_BD = torch.randn(B, D)
    for _ in range(3):
        trainer.step(x_BD)
    dead_N = trainer.dead_mask()
    assert all(bool(dead_N[lo:hi].any()) for lo, hi in zip([0, *widths], [*widths, N], strict=True))

    params = {p.data_ptr() for p in trainer.sae.parameters()}

    def saved_batch_sized(mask):  # the shapes of what the backward keeps, [B, D] and up
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append((t.data_ptr(), tuple(t.shape))) or t,
                                                      lambda t: t):  # fmt: skip
            trainer.sae(x_BD, dead_mask_N=mask)
        return sorted(s for p, s in shapes if p not in params and math.prod(s) >= B * D)

    kept = saved_batch_sized(dead_N)
    assert kept == saved_batch_sized(None) and (len(widths), B, D) in kept and (len(widths) + 1, B, D) not in kept
    with _Shapes() as seen:
        trainer.step(x_BD)
    assert float(trainer.sae(x_BD, dead_mask_N=dead_N).metrics["aux"]) > 0
    L = len(widths) + 1
    assert not [s for s in seen.shapes if s in ((L, B, D), (L * B, D))]
