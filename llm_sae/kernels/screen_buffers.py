"""The bfloat16 screen's buffers, kept across calls: the weight copy and the slab.

Apart from ``screen.py`` so that module holds the algorithm and its error bound only.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class WeightCopy(threading.local):
    """bf16 [W_enc | b_hi | b_lo] and its error constants, in one buffer kept across calls.

    The bias rides in the matmul as two extra columns (its bfloat16 head and the bfloat16
    rounding of the rest) against two ones in x, so the screen includes it to ~2^-16
    relative without a pass over the [B, N] output; 770 columns cost what 768 do.

    The copy is remade on every call (~35 ms at n=24576, d=768, 1 thread, against ~280 ms
    for the forward at B=1024): keying it on (data_ptr, _version) is not safe, because
    fused and foreach optimisers and writes through ``.data`` change W without bumping its
    version counter, and a stale copy would void the error bound.
    """

    def __init__(self) -> None:
        self.Wa_ND2: Tensor | None = None
        self.last: tuple[Tensor, Tensor, tuple[float, float, float, float]] | None = None

    def make(self, W_ND: Tensor, b_N: Tensor, *, again: bool = False) -> tuple[Tensor, tuple[float, float, float, float]]:
        """The copy of (W, b); ``again``: the caller knows W and b are unchanged since the
        last call (the same tensors, within one function), so the copy is reused."""
        last = self.last
        if again and last is not None and last[0] is W_ND and last[1] is b_N and self.Wa_ND2 is not None:
            return self.Wa_ND2, last[2]
        Wa, consts = self._make(W_ND, b_N)
        self.last = (W_ND, b_N, consts)
        return Wa, consts

    def _make(self, W_ND: Tensor, b_N: Tensor) -> tuple[Tensor, tuple[float, float, float, float]]:
        N, D = W_ND.shape
        Wa = self.Wa_ND2
        if Wa is None or Wa.shape != (N, D + 2):
            self.Wa_ND2 = None  # free the old copy before making the new one
            Wa = self.Wa_ND2 = torch.empty(N, D + 2, dtype=torch.bfloat16)
        Wa[:, D].copy_(b_N)
        Wa[:, D + 1].copy_(b_N - Wa[:, D].float())
        # The max over latents of ‖w_j − bf16(w_j)‖ and of ‖[bf16(w_j), b_hi, b_lo]‖ (so
        # ‖w_j‖ ≤ wa + dw).
        wa_N, dw_N = cast_rows(W_ND, Wa)
        if not N:
            return Wa, (0.0, 0.0, 0.0, 0.0)
        wa = float(wa_N.square_().add_(Wa[:, D:].float().square().sum(dim=1)).max().sqrt())
        dw = float(dw_N.max())
        return Wa, (dw, wa, wa + dw, float(b_N.abs().max()))


def cast_rows(W_ND: Tensor, Wa_NX: Tensor) -> tuple[Tensor, Tensor]:
    """Write bf16(W) into Wa's first D columns; return per row ‖bf16(w_j)‖ and
    ‖w_j − bf16(w_j)‖ (float32, [N] each), measured in cache-sized row blocks through one
    reused float32 block."""
    N, D = W_ND.shape
    Wa_NX[:, :D].copy_(W_ND)  # one op: ~2x faster than the same cast block by block
    w_N, dw_N = W_ND.new_empty(N), W_ND.new_empty(N)
    step = max(1, 2**18 // max(1, D))
    blk_RD = W_ND.new_empty(min(N, step), D)
    for s in range(0, N, step):
        e = min(N, s + step)
        f_RD = blk_RD[: e - s].copy_(Wa_NX[s:e, :D])
        torch.linalg.vector_norm(f_RD, dim=1, out=w_N[s:e])
        torch.linalg.vector_norm(f_RD.sub_(W_ND[s:e]), dim=1, out=dw_N[s:e])
    return w_N, dw_N


WEIGHTS = WeightCopy()


class Slab(threading.local):
    """One reusable byte buffer per thread for the bfloat16 screen slab (and, viewed as
    float32, the rows that fall back)."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def get(self, nbytes: int) -> Tensor:
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = None
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf


SLAB = Slab()
