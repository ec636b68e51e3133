"""Picking candidates out of the bfloat16 screen's [C, N] slab (``screen.py``), cheaply.

``torch.topk`` on CPU keeps a heap of the m best (value, index) pairs per row and visits all
N entries one by one: at m = 256 of N = 24576 that is ~60 ms per 512 rows, as much as the
screen's matmul. Here the N columns are split into N/g strided groups {j, j + N/g, …} of g:
their maxima are one vectorised pass, the top m groups by maximum come from a topk over
N/g entries, and what follows looks only at the m·g entries of those groups (measured at
m = 256, N = 24576, g = 8, 1 thread: 36 ms against 62 for the same top m). Where m is
small the top m groups come the same way from groups of groups (16 against 27 ms at m = 64).

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


def group_top(s_CN: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """(gmax_CM, grp_CM, s_CP, G): the m groups of each row with the largest maxima (their
    maxima, unordered, and group numbers) and the values of their P = g·m members, where
    member i of the group at position q sits at p = i·m + q and is column grp[q] + i·G
    (``columns``). Every value outside these groups is ≤ the row's smallest ``gmax_CM``.
    g is ``GROUP``, or 1 (a plain ``topk``) where N is not a multiple of it or has too few
    groups; G = N / g."""
    C, N = s_CN.shape
    g = GROUP
    if N % g or N // g < _MIN_GROUPS_PER_PICK * m:
        gmax_CM, grp_CM = s_CN.topk(m, dim=1, sorted=False)
        return gmax_CM, grp_CM, gmax_CM, N
    G = N // g
    s_CgG = s_CN.view(C, g, G)
    gmax_CM, grp_CM = grouped_topk(s_CgG.amax(dim=1), m)  # groups of groups where m is small
    s_CgM = s_CgG.gather(2, grp_CM[:, None, :].expand(C, g, m))
    return gmax_CM, grp_CM, s_CgM.view(C, g * m), G


def columns(grp_CM: Tensor, pos_CX: Tensor, G: int) -> Tensor:
    """The columns of the members at positions pos (of ``group_top``'s s_CP)."""
    m = grp_CM.shape[1]
    return grp_CM.gather(1, pos_CX % m).add_(pos_CX.div(m, rounding_mode="floor").mul_(G))


def grouped_topk(s_CN: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``s_CN.topk(m, dim=1, sorted=False)`` (the same values; among equal values at the
    cut-off, possibly other columns), through ``group_top``."""
    gmax_CM, grp_CM, s_CP, G = group_top(s_CN, m)
    if s_CP.shape[1] == m:
        return gmax_CM, grp_CM
    vals_CM, pos_CM = s_CP.topk(m, dim=1, sorted=False)
    return vals_CM, columns(grp_CM, pos_CM, G)


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
