"""One optimiser update from the gradients backward left, with weight gradients that are
never whole.

In one process the sparse kernels defer the [N, D] weight gradients
(``DeferredWeightGrads``): they hand over their sparse factors, and this writes each
gradient GRAD_SLAB_BYTES of rows at a time into one reused buffer, twice (for the global
clip norm, then for Adam on those rows). Peak memory stays within 1.5x of weights + Adam +
batch (BENCHMARKS.md); ``tests/test_step_memory.py`` pins it to plain autograd, torch's
``clip_grad_norm_`` and torch's Adam.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from llm_sae.distributed.parallel import Parallel
from llm_sae.kernels.sparse_ops import DeferredWeightGrads
from llm_sae.sae.base import SAE
from llm_sae.train.optim import SlicedAdam

# Rows of a deferred weight gradient held at once: 8 MB, where a whole gradient is 72 MB at
# n=24576, d=768 (written twice, in slabs, it costs ~30 ms a step more than once whole).
GRAD_SLAB_BYTES = 8 * 2**20


class GradientUpdate:
    """Backward, gradient projection, global-norm clipping and Adam for one SAE."""

    def __init__(self, sae: SAE, opt: SlicedAdam, par: Parallel, clip: float) -> None:
        self.sae, self.opt, self.par, self.clip = sae, opt, par, clip
        self.grads = DeferredWeightGrads([sae.W_enc, sae.W_dec] if par.defers_weight_grads else [])
        self._grad_buf: Tensor | None = None

    def backward_and_step(self, loss: Tensor, found_inf: Tensor | None = None) -> None:
        """``loss.backward()`` with the kernels deferring weight gradients, then ``step``."""
        self.opt.zero_grad(set_to_none=True)
        try:
            with self.grads.collecting():
                loss.backward()
            self.step(found_inf)
        finally:
            self.grads.clear()

    def step(self, found_inf: Tensor | None) -> None:
        """Gradient projection, global-norm clipping and Adam, from the gradients backward left.

        A weight gradient the sparse kernels deferred (one process) is never whole: it is
        written a slab of rows at a time into one small buffer, twice, first for the clip
        coefficient (projected decoder rows, the norm over every parameter) and then for
        Adam on those rows (``SlicedAdam.step_rows``). Same arithmetic as the plain path but
        for the order in which the global norm is summed (the tests pin it); it holds 8 MB
        where the plain path holds both gradients (150 MB at n=24576, d=768). AuxK's
        gradients are deferred too (``SAE.dead_topk``); a weight that also has an ordinary
        gradient (reached some other way) takes the plain path alone.
        """
        sae, grads, clip = self.sae, self.grads, self.clip
        slabbed = [p for p in (sae.W_dec, sae.W_enc) if grads.pending(p) and p.grad is None]
        grads.flush(keep=slabbed)
        if not slabbed:
            self.par.after_backward(sae)
            sae.constrain_grads()
            if clip > 0:
                self.par.clip_grad_norm_(sae, clip)
            self.opt.step(found_inf=found_inf)
            return
        sae.constrain_grads()  # W_dec.grad, if the decoder took the plain path
        rest = [p for p in sae.parameters() if p.grad is not None]
        coef = None
        if clip > 0:
            # torch.nn.utils.clip_grad_norm_'s formula: every gradient times
            # min(1, max_norm / (‖all gradients‖ + 1e-6)); the squares summed in float64.
            sq = torch.zeros((), dtype=torch.float64, device=sae.W_enc.device)
            for p in slabbed:
                for _, g_RD in self._grad_slabs(p):
                    sq += torch.linalg.vector_norm(g_RD).double().square()
            for p in rest:
                sq += torch.linalg.vector_norm(p.grad).double().square()
            total = sq.sqrt().to(sae.W_enc.dtype)
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in rest], coef)
        self.opt.step(found_inf=found_inf)  # the slabbed weights have no .grad: skipped here
        for p in slabbed:
            self.opt.step_rows(p, self._grad_slabs(p, coef), found_inf=found_inf)

    def _grad_slabs(self, p: Tensor, coef: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        """``p``'s deferred gradient as (first row, rows) slabs of GRAD_SLAB_BYTES, projected
        for W_dec and scaled by the clip coefficient; each slab reuses one buffer."""
        rows = max(1, GRAD_SLAB_BYTES // max(1, p[0].numel() * p.element_size()))
        buf = self._grad_buf
        if buf is None or buf.numel() < rows * p.shape[1] or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._grad_buf = torch.empty(rows * p.shape[1], dtype=p.dtype, device=p.device)
        for start in range(0, p.shape[0], rows):
            g_RD = buf[: min(rows, p.shape[0] - start) * p.shape[1]].view(-1, p.shape[1])
            self.grads.materialize(p, g_RD, start)
            if p is self.sae.W_dec:
                self.sae.constrain_grads(g_RD, start)
            if coef is not None:
                g_RD.mul_(coef)
            yield start, g_RD

