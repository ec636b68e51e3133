"""NaN/Inf in a batch: found without reading back to the host, and the rows to keep."""

from __future__ import annotations

import torch
from torch import Tensor


def finite_flag(x_BD: Tensor) -> Tensor:
    """Whether every value is finite, as a bool tensor on x's device (nothing is read
    back): one pass and no [B, D] temporary, as min and max propagate NaN
    (``isfinite(x).all()`` allocates two [B, D] tensors per step)."""
    if x_BD.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x_BD.device)
    lo, hi = torch.aminmax(x_BD)
    return torch.isfinite(lo) & torch.isfinite(hi)


def finite_rows(x_BD: Tensor, y_BE: Tensor | None = None) -> Tensor:
    """[B] bool: rows whose inputs (and a transcoder's targets) are all finite. Only
    called for a batch ``finite_flag`` found bad, so its temporaries cost nothing usually."""
    ok_B = torch.isfinite(x_BD).all(-1)
    if y_BE is not None:
        ok_B &= torch.isfinite(y_BE).all(-1)
    return ok_B
