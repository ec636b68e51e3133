"""Collectives with byte counts, and the autograd functions that cross shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Bytes each rank contributes to collectives (payload, not the wire protocol)."""

    bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes = self.calls = 0


COMM = CommStats()


def _count(t: Tensor) -> None:
    COMM.bytes += t.numel() * t.element_size()
    COMM.calls += 1


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: Tensor, group: Any, op: Any = None) -> Tensor:
    """In-place all-reduce (sum unless ``op``) over ``group``; no-op for a group of one."""
    if _group_size(group) > 1:
        _count(t)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def all_gather_cat(t: Tensor, group: Any, dim: int = 0) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``t`` (equal shapes), in rank order."""
    n = _group_size(group)
    if n == 1:
        return t
    _count(t)
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def gather_rows_to_cpu(t: Tensor, group: Any, chunk_bytes: int = 64 * 2**20) -> Tensor:
    """Every rank's ``t`` stacked along dim 0 (rank order), assembled on the CPU.

    Gathered a slab of rows at a time, so the device never holds more than about
    ``chunk_bytes`` × ranks of it: a sharded SAE too large for one device can still be
    checkpointed and exported.
    """
    R = _group_size(group)
    if R == 1:
        return t.detach().cpu()
    n = t.shape[0]
    out = torch.empty((R * n, *t.shape[1:]), dtype=t.dtype)
    row_bytes = max(1, t[:1].numel() * t.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for a in range(0, max(n, 1), step):
        b = min(n, a + step)
        parts = [torch.empty_like(t[a:b]) for _ in range(R)]
        _count(t[a:b])
        dist.all_gather(parts, t[a:b].contiguous(), group=group)
        for r, part in enumerate(parts):
            out[r * n + a : r * n + b] = part.cpu()
    return out


class CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the shard group (Megatron's f)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return all_reduce_(g.contiguous().clone(), ctx.group), None


class SumShards(torch.autograd.Function):
    """All-reduce sum forward; identity backward (Megatron's g).

    The loss after it is computed identically on every rank of the group, so each
    rank's partial result already receives the whole gradient.
    """

    @staticmethod
    def forward(ctx, part: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        return all_reduce_(part.clone(), group)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None
