"""Per-feature accumulators with bounded memory: statistics, top and sampled examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

FINE_BINS = 256  # fine histogram cells per feature over [0, U); a power of two


SEQ_MUL = 1 << 24  # (sequence, position) → sequence·SEQ_MUL + position; positions < 2^24


_M32 = 0xFFFFFFFF


# Streaming state: bottom-p buffers per bucket
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 in, values in [0, 2^32) out); no overflow in int64."""
    x = x & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def pair_hash(rows: torch.Tensor, feats: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random key in [0, 2^32) per (row, feature): the same in any batch order."""
    a = _hash32((rows & _M32) ^ _hash32((rows >> 32) + seed * 0x9E3779B + 0x51ED27))
    return _hash32(a ^ _hash32(feats + 0x3C6EF372))


class BottomSlots:
    """For each of ``n`` buckets, the ``p`` items with the smallest (prim, row) seen so far.

    This one structure is both the top-k buffer (prim = a key that falls as the activation
    rises, so equal activations are ordered by row) and the reservoirs (prim = a hash of
    (row, feature): the smallest p hashes are a uniform random sample of the bucket, and
    two such samples merge exactly). ``prim`` is an integer in [0, 2^32). Each item
    carries its activation, (sequence, position) and its window of activations.

    Items must be offered in increasing row order across calls (the pass reads the store
    in order): then one stable sort on (bucket, prim) also orders ties by row.
    """

    EMPTY = 1 << 32

    def __init__(self, n: int, p: int, W: int, device: torch.device | str) -> None:
        self.n, self.p, self.W = n, p, W
        self.prim = torch.full((n, p), self.EMPTY, dtype=torch.int64, device=device)
        self.row = torch.full((n, p), -1, dtype=torch.int64, device=device)
        self.val = torch.zeros((n, p), dtype=torch.float32, device=device)
        self.seqpos = torch.full((n, p), -1, dtype=torch.int64, device=device)
        self.win = torch.zeros((n, p, W), dtype=torch.float16, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prim, self.row, self.val, self.seqpos, self.win))

    def merge(
        self,
        bucket_M: torch.Tensor,
        prim_M: torch.Tensor,
        row_M: torch.Tensor,
        val_M: torch.Tensor,
        seqpos_M: torch.Tensor,
        windows: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Offer items; ``windows(i)`` gives the [len(i), W] windows of items ``i`` (only
        called for the items that actually enter, which after warm-up are few)."""
        if bucket_M.numel() == 0:
            return
        dev, p = bucket_M.device, self.p
        # Cheap pre-filter: an item can only enter if it beats its bucket's current last
        # (rows only grow, so an equal prim never beats an item already kept).
        item = (prim_M < self.prim[bucket_M, -1]).nonzero().squeeze(1)
        if item.numel() == 0:
            return
        # The best p new items per bucket: one stable sort of the survivors (ties stay in
        # row order), rank within bucket by a running max of bucket starts.
        key, o = torch.sort(bucket_M[item] << 32 | prim_M[item], stable=True)
        item = item[o]
        b = key >> 32
        start = torch.ones_like(b, dtype=torch.bool)
        start[1:] = b[1:] != b[:-1]
        ar = torch.arange(b.numel(), device=dev)
        rank = ar - torch.where(start, ar, 0).cummax(0).values
        keep = rank < p
        item, key, rank, start = item[keep], key[keep], rank[keep], start[keep]
        touched = (key >> 32)[start]
        t_of = start.cumsum(0) - 1
        # Merge with the p kept so far: a small sort of [old p | new ≤p] per touched bucket.
        T = touched.numel()
        cand = torch.full((T, 2 * p), self.EMPTY, dtype=torch.int64, device=dev)
        cand[:, :p] = self.prim[touched]
        cand[t_of, p + rank] = key & _M32
        src = torch.full((T, 2 * p), -1, dtype=torch.int64, device=dev)
        src[:, :p] = touched[:, None] * p + torch.arange(p, device=dev)
        src[t_of, p + rank] = -2 - torch.arange(item.numel(), device=dev)
        cand, oo = torch.sort(cand, dim=1, stable=True)
        src = src.gather(1, oo[:, :p])
        # Gather for every slot with clamped indices and pick with where: no masks to
        # compact. Windows are computed only for the new winners.
        is_old, is_new = src >= 0, src <= -2
        so = src.clamp(min=0)
        ni = item[(-2 - src).clamp(min=0)]
        row = torch.where(is_old, self.row.view(-1)[so], torch.where(is_new, row_M[ni], -1))
        val = torch.where(is_old, self.val.view(-1)[so], torch.where(is_new, val_M[ni], 0.0))
        sp = torch.where(is_old, self.seqpos.view(-1)[so], torch.where(is_new, seqpos_M[ni], -1))
        win = self.win.view(-1, self.W)[so]
        new_at = is_new.nonzero(as_tuple=True)
        if new_at[0].numel():
            win[new_at] = windows(ni[new_at]).to(self.win.dtype)
        self.prim[touched], self.row[touched], self.val[touched] = cand[:, :p], row, val
        self.seqpos[touched], self.win[touched] = sp, win

    def take(self, buckets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Remove and return the valid items of ``buckets`` (bucket, prim, row, val, seqpos,
        win), in row order."""
        p = self.p
        b = buckets.repeat_interleave(p)
        pr, rw = self.prim[buckets].reshape(-1), self.row[buckets].reshape(-1)
        val, sp = self.val[buckets].reshape(-1), self.seqpos[buckets].reshape(-1)
        win = self.win[buckets].reshape(-1, self.W)
        ok = (pr < self.EMPTY).nonzero().squeeze(1)
        ok = ok[torch.argsort(rw[ok], stable=True)]
        self.prim[buckets] = self.EMPTY
        return b[ok], pr[ok], rw[ok], val[ok], sp[ok], win[ok]


def act_key(v: torch.Tensor) -> torch.Tensor:
    """An integer in [0, 2^31) that falls as a positive float32 rises (IEEE bits are monotone)."""
    return (2**31 - 1) - v.float().contiguous().view(torch.int32).to(torch.int64)


def _pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """e with 2^(e-1) <= x < 2^e (x > 0): 2^e is the smallest power of two above x."""
    return torch.frexp(x.float()).exponent.to(torch.int64)


class FeatureAccumulator:
    """Everything the pass keeps per feature. Fed with active (row, feature, value) triples.

    Results do not depend on how the rows are cut into batches (up to float summation
    order of the means): every structure is a deterministic function of the set of
    triples seen.
    """

    def __init__(
        self, n: int, *, top_k: int, n_bins: int, per_bin: int, window: tuple[int, int],
        seed: int, device: torch.device | str,
    ) -> None:
        self.n, self.device, self.seed = n, torch.device(device), seed
        self.before, self.after = window
        W = self.before + self.after + 1
        self.G = FINE_BINS
        # Reservoir cells: a power of two, about 3 cells per final bin.
        self.R = min(self.G, 1 << max(1, math.ceil(math.log2(max(2, 3 * n_bins)))))
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, dtype=torch.float32, device=device)
        self.exp = torch.full((n,), -(1 << 20), dtype=torch.int64, device=device)  # U = 2^exp; unset
        self.fine = torch.zeros(n, self.G, dtype=torch.int32, device=device)
        self.l0_counts = torch.zeros(1, dtype=torch.int64, device=device)
        self.rows_analysed = 0
        self.top = BottomSlots(n, top_k, W, device) if top_k > 0 else None
        self.res = BottomSlots(n * self.R, per_bin, W, device) if per_bin > 0 and n_bins > 0 else None

    def nbytes(self) -> int:
        t = [self.count, self.sum, self.max, self.exp, self.fine]
        return sum(x.numel() * x.element_size() for x in t) + sum(
            s.nbytes() for s in (self.top, self.res) if s is not None)

    # -- statistics (at encode time) -----------------------------------------------------
    def add_stats(self, f_M: torch.Tensor, v_M: torch.Tensor, l0_B: torch.Tensor) -> None:
        n = self.n
        self.rows_analysed += int(l0_B.numel())
        self.count.index_add_(0, f_M, torch.ones_like(f_M))
        self.sum.index_add_(0, f_M, v_M.double())
        bmax = torch.zeros(n, dtype=torch.float32, device=self.device).scatter_reduce_(0, f_M, v_M, "amax")
        self.max = torch.maximum(self.max, bmax)
        l0 = torch.bincount(l0_B, minlength=1)
        if l0.numel() > self.l0_counts.numel():
            self.l0_counts = torch.nn.functional.pad(self.l0_counts, (0, l0.numel() - self.l0_counts.numel()))
        self.l0_counts[: l0.numel()] += l0
        # Grow U where the running max reached it; fine cells merge 2^s → 1 (exact).
        need = (bmax > 0) & (bmax >= torch.ldexp(torch.ones_like(bmax), self.exp))
        if bool(need.any()):
            fi = need.nonzero().squeeze(1)
            new_e = torch.maximum(_pow2_exponent(bmax[fi]), self.exp[fi])
            had = self.exp[fi] > -(1 << 20)
            shift = (new_e - self.exp[fi]).clamp(0, 62)
            if bool(had.any()):
                fh, sh = fi[had], shift[had]
                idx = torch.arange(self.G, device=self.device)[None, :] >> sh[:, None].clamp(max=30)
                merged = torch.zeros_like(self.fine[fh]).scatter_add_(1, idx, self.fine[fh])
                self.fine[fh] = merged
            self.exp[fi] = new_e
            if self.res is not None and bool(had.any()):
                self._rebin_reservoirs(fi[had])
        cell = self._cells(f_M, v_M, self.G)
        self.fine.view(-1).index_add_(0, f_M * self.G + cell, torch.ones_like(cell, dtype=torch.int32))

    def _cells(self, f_M: torch.Tensor, v_M: torch.Tensor, n_cells: int) -> torch.Tensor:
        # v / 2^e · n_cells is exact in float for power-of-two n_cells: the grid is the
        # one the final U would give, so merging cells when U doubles loses nothing.
        u = torch.ldexp(v_M.float(), -self.exp[f_M] + int(math.log2(n_cells)))
        return u.floor().to(torch.int64).clamp(0, n_cells - 1)

    def _rebin_reservoirs(self, feats: torch.Tensor) -> None:
        R = self.R
        buckets = (feats[:, None] * R + torch.arange(R, device=self.device)).reshape(-1)
        b, pr, rw, val, sp, win = self.res.take(buckets)
        f = b // R
        self.res.merge(f * R + self._cells(f, val, R), pr, rw, val, sp, lambda i: win[i])

    # -- merging (ranks under torchrun) ---------------------------------------------------
    def merge_from(self, other: FeatureAccumulator) -> None:
        """Fold in the state of a pass over later rows (every row of ``other`` comes after
        every row of this one): the result equals one pass over both, up to the float
        summation order of ``sum``. Top-k buffers and reservoirs keep the p smallest keys
        per bucket, so the union's are among the two parts' (exact)."""
        self.rows_analysed += other.rows_analysed
        self.count += other.count
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)
        n0, n1 = self.l0_counts.numel(), other.l0_counts.numel()
        self.l0_counts = torch.nn.functional.pad(self.l0_counts, (0, max(0, n1 - n0)))
        self.l0_counts[:n1] += other.l0_counts
        # One histogram scale U = 2^exp per feature: the larger; coarser cells merge exactly.
        new_e = torch.maximum(self.exp, other.exp)
        self.fine = _fine_at(self.fine, self.exp, new_e) + _fine_at(other.fine, other.exp, new_e)
        grew = ((new_e > self.exp) & (self.exp > -(1 << 20))).nonzero().squeeze(1)
        self.exp = new_e
        if self.res is not None and grew.numel():
            self._rebin_reservoirs(grew)
        if self.top is not None and other.top is not None:
            b, pr, rw, val, sp, win = other.top.take(torch.arange(other.n, device=self.device))
            self.top.merge(b, pr, rw, val, sp, lambda i: win[i])
        if self.res is not None and other.res is not None:
            R = self.R
            b, pr, rw, val, sp, win = other.res.take(torch.arange(other.n * R, device=self.device))
            f = b // R
            self.res.merge(f * R + self._cells(f, val, R), pr, rw, val, sp, lambda i: win[i])

    # -- examples (deferred until the neighbouring batch is encoded) ----------------------
    def add_examples(self, row_M, f_M, v_M, seqpos_M, windows: Callable) -> None:
        if self.top is not None:
            self.top.merge(f_M, act_key(v_M), row_M, v_M, seqpos_M, windows)
        if self.res is not None:
            key = pair_hash(row_M, f_M, self.seed)
            self.res.merge(f_M * self.R + self._cells(f_M, v_M, self.R), key, row_M, v_M, seqpos_M, windows)


def _fine_at(fine_NG: torch.Tensor, exp_N: torch.Tensor, new_N: torch.Tensor) -> torch.Tensor:
    """Fine histograms recounted on the grid of the larger scale 2^new (cells merge 2^s → 1)."""
    shift = (new_N - exp_N).clamp(0, 30)
    shift = torch.where(exp_N > -(1 << 20), shift, 0)  # unset: no counts to move
    G = fine_NG.shape[1]
    idx = torch.arange(G, device=fine_NG.device)[None, :] >> shift[:, None]
    return torch.zeros_like(fine_NG).scatter_add_(1, idx, fine_NG)


def _to_device(acc: FeatureAccumulator, device: torch.device) -> FeatureAccumulator:
    """Move an accumulator's tensors (in place) to ``device``; returns it."""
    for obj in (acc, acc.top, acc.res):
        if obj is None:
            continue
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                setattr(obj, k, v.to(device))
    acc.device = torch.device(device)
    return acc


def merge_ranks(acc: FeatureAccumulator, counts: dict[str, int]) -> dict[str, int] | None:
    """Under torchrun: gather every rank's accumulator to rank 0 and merge them in rank
    order (ranks hold consecutive row ranges). Rank 0 gets the merged counts, others None."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = acc.device
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((_to_device(acc, torch.device("cpu")), counts), parts, dst=0)
    if parts is None:
        return None
    merged, total = _to_device(parts[0][0], dev), dict(parts[0][1])
    for other, c in parts[1:]:
        merged.merge_from(_to_device(other, dev))
        for k in ("rows_read", "rows_excluded"):
            total[k] += c[k]
    _to_device(merged, dev)
    acc.__dict__.update(merged.__dict__)
    total["tokens_analysed"] = acc.rows_analysed
    return total
