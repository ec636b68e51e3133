"""Picking candidates out of the bfloat16 screen's [C, N] slab (``screen.py``), cheaply.

``torch.topk`` on CPU keeps a heap of the m best (value, index) pairs per row and visits all
N entries one by one: at m = 256 of N = 24576 that is ~60 ms per 512 rows, as much as the
screen's matmul. Here the N columns are split into N/g strided groups {j, j + N/g, …} of g:
their maxima are one vectorised pass, the top m groups by maximum come from a topk over
N/g entries, and what follows looks only at the m·g entries of those groups (measured at
m = 256, N = 24576, g = 8, 1 thread: 34 ms against 62 for the same top m).

Why m groups are enough: if v is the m-th largest of the N values, at most m groups have a
maximum ≥ v (each holds one of the m values ≥ v, ties aside), and every value ≥ v lies in
such a group; so the top m groups by maximum hold the top m values, and every value
outside them is ≤ the m-th largest group maximum.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

GROUP = 8
"""Columns per group. 4-16 measure the same at m = 256; 32 is slower (more to gather)."""

# Groups only pay when there are many more of them than the m to select.
_MIN_GROUPS_PER_PICK = 4


def group_top(s_CN: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(gmax_CM, cols_CMg, s_CMg): the m groups of each row with the largest maxima, their
    maxima (unordered), the columns of their g members, and those members' values. Every
    value outside these groups is ≤ the row's smallest ``gmax_CM``. g is ``GROUP``, or 1
    (plain ``topk``) where N is not a multiple of it or has too few groups."""
    C, N = s_CN.shape
    g = GROUP
    if N % g or N // g < _MIN_GROUPS_PER_PICK * m:
        gmax_CM, cols_CM = s_CN.topk(m, dim=1, sorted=False)
        return gmax_CM, cols_CM[:, :, None], gmax_CM[:, :, None]
    G = N // g
    gmax_CM, grp_CM = s_CN.view(C, g, G).amax(dim=1).topk(m, dim=1, sorted=False)
    cols_CMg = grp_CM[:, :, None] + torch.arange(0, N, G, device=s_CN.device)
    return gmax_CM, cols_CMg, s_CN.gather(1, cols_CMg.view(C, m * g)).view(C, m, g)


def grouped_topk(s_CN: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``s_CN.topk(m, dim=1, sorted=False)`` (the same values; among equal values at the
    cut-off, possibly other columns), through ``group_top``."""
    C = s_CN.shape[0]
    gmax_CM, cols_CMg, s_CMg = group_top(s_CN, m)
    if cols_CMg.shape[2] == 1:
        return gmax_CM, cols_CMg.view(C, m)
    vals_CM, pos_CM = s_CMg.view(C, -1).topk(m, dim=1, sorted=False)
    return vals_CM, cols_CMg.view(C, -1).gather(1, pos_CM)


def ragged_dot(W_ND: Tensor, cols_P: Tensor, n_C: Tensor, y_CD: Tensor) -> Tensor:
    """out[p] = W[cols[p]] · y[c] for the n_C[c] consecutive entries p of each row c: the
    sampled dense-dense product of ``sparse_ops.gathered_dot`` on a ragged pattern (CPU)."""
    C = y_CD.shape[0]
    crow_C1 = n_C.new_zeros(C + 1)
    torch.cumsum(n_C, 0, out=crow_C1[1:])
    with warnings.catch_warnings():  # "CSR support is in beta": it is tested here
        warnings.simplefilter("ignore", UserWarning)
        pattern_CN = torch.sparse_csr_tensor(
            crow_C1, cols_P, y_CD.new_zeros(cols_P.numel()), (C, W_ND.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern_CN, y_CD, W_ND.t(), beta=0.0).values()
