"""int8 rows with float32 scales: the compressed store's encoding.

Symmetric absmax quantisation: each row (or each block of ``block`` columns of a row)
keeps ``scale = max|x| / 127`` and ``q = round(x / scale)``, so a value is off by at most
half a step, ``scale / 254`` of the row's (block's) largest magnitude. Activations are
dense and roughly isotropic within a row, so this error is far below an SAE's own
reconstruction error, at half the bytes of bfloat16. Blocks help when a few channels are
much larger than the rest (massive activations): they then set the step only of their
own block.
"""

from __future__ import annotations

import numpy as np
import torch

from llm_sae.common.dtypes import quant_block
from llm_sae.errors import StoreError


def check_block(dtype: str, d_in: int) -> int | None:
    """The block of a store dtype (None: not quantised); StoreError if it cannot fit ``d_in``."""
    block = quant_block(dtype)
    if block and d_in % block:
        raise StoreError(
            f"--dtype {dtype}: blocks of {block} do not divide the width {d_in}; use a block "
            "size that divides it, or int8 (one scale per row)"
        )
    return block


def scale_bytes(d_in: int, block: int | None) -> int:
    """Bytes of scales per row (float32 each)."""
    return 0 if block is None else 4 * n_blocks(d_in, block)


def n_blocks(d_in: int, block: int) -> int:
    """Scales per row: 1 for per-row scales (``block`` 0), else d_in / block."""
    return 1 if block == 0 else d_in // block


def quantise(x_ND: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows → (int8 [N, D], float32 scales [N, blocks])."""
    N, D = x_ND.shape
    nb = n_blocks(D, block)
    x_NBd = x_ND.reshape(N, nb, D // nb)
    absmax_NB = np.abs(x_NBd).max(axis=2) if D else np.zeros((N, nb), np.float32)
    scale_NB = (absmax_NB / np.float32(127)).astype(np.float32)
    inv_NB = np.divide(np.float32(1), scale_NB, out=np.zeros_like(scale_NB), where=scale_NB > 0)
    q = np.rint(x_NBd * inv_NB[:, :, None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).reshape(N, D), scale_NB


def dequantise(q_ND: np.ndarray, scale_NB: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(int8 rows, their scales) → rows as a tensor of ``dtype`` (float32 arithmetic)."""
    N, D = q_ND.shape
    nb = scale_NB.shape[1]
    x = torch.from_numpy(np.ascontiguousarray(q_ND)).to(torch.float32)
    s = torch.from_numpy(np.ascontiguousarray(scale_NB, dtype=np.float32))
    x = x.view(N, nb, D // nb).mul_(s.unsqueeze(2)).view(N, D)
    return x if dtype == torch.float32 else x.to(dtype)
