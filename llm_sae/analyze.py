"""Per-feature analysis: one pass of an SAE over stored activations → the data a person
needs to understand each feature (statistics, examples, logit effects, neighbours).

The output directory is documented in ``docs/analysis-format.md``. The pass reads the
store in order and keeps only fixed-size state per feature (top-k buffer, reservoirs,
a fine histogram), so memory does not grow with the number of tokens; the context
windows' activations are captured from the neighbouring rows' encoder output during
the pass, so there is no second encoder pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.config import ConfigError, add_arguments, from_args, to_dict
from llm_sae.errors import LlmSaeError, StoreError

FORMAT_VERSION = 1
FINE_BINS = 256  # fine histogram cells per feature over [0, U); a power of two
SEQ_MUL = 1 << 24  # (sequence, position) → sequence·SEQ_MUL + position; positions < 2^24
_M32 = 0xFFFFFFFF


class AnalyzeError(LlmSaeError):
    """Inputs that cannot be analysed together (e.g. an SAE and a store of other widths)."""


@dataclass
class AnalyzeConfig:
    """Analyse an SAE over an activation store: per-feature statistics and examples."""

    sae: str
    """Directory of the saved SAE (cfg.json + sae.safetensors)."""
    store: str
    """Activation store directory to run the SAE over."""
    out: str
    """Output directory (see docs/analysis-format.md)."""
    tokens: int | None = None
    """Analyse only the first N rows of the store (default: all)."""
    top_k: int = 20
    """Top-activating examples kept per feature."""
    context_before: int = 10
    """Tokens of context shown before each example's token."""
    context_after: int = 5
    """Tokens of context shown after each example's token."""
    n_bins: int = 10
    """Equal-width activation bins (0..max) for the interval examples."""
    per_bin: int = 3
    """Random examples per interval bin."""
    hist_bins: int = 32
    """Bins of each feature's activation histogram."""
    exclude_bos: bool = False
    """Leave out rows whose token is a special token of the tokenizer (BOS/EOS/PAD)."""
    exclude_positions: list[int] = field(default_factory=list)
    """Leave out rows at these positions in their sequence, e.g. 0,1."""
    model: str | None = None
    """Model (hub name or directory) for token strings and logit effects; default: the store's model."""
    logits: bool = True
    """Compute logit effects (W_dec · W_U through the final norm); needs the model's weights."""
    n_logits: int = 10
    """Promoted and suppressed tokens listed per feature."""
    n_neighbours: int = 10
    """Nearest features by decoder cosine listed per feature."""
    dense_threshold: float = 0.1
    """A feature firing on more than this fraction of tokens is reported dense."""
    shard_size: int = 1000
    """Features per output shard file."""
    batch_size: int = 4096
    """Rows encoded at once."""
    device: str | None = None
    """torch device (default: cuda if available, else cpu)."""
    seed: int = 0
    """Seed of the interval-example sampling (a hash of row and feature: order-independent)."""
    progress: bool = True
    """Show progress bars."""


# ======================================================================================
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


# ======================================================================================
# The pass


@dataclass
class _Batch:
    """What later batches need of an encoded batch: rows' (seq, pos) and active pairs."""

    start: int
    seqpos: torch.Tensor  # [B] int64 (-1 where unknown)
    fkey: torch.Tensor  # sorted feature·2^40 + row of the active pairs
    fval: torch.Tensor  # their values


ROW_BITS = 40


class _Span:
    """Lookup over a few consecutive encoded batches: (seq, pos) → row, and a feature's
    active pairs near a row."""

    def __init__(self, batches: list[_Batch], before: int, after: int) -> None:
        self.before, self.after = before, after
        self.batches = batches
        self.start = batches[0].start
        self.sp = torch.cat([b.seqpos for b in batches])  # row start + i has (seq, pos) sp[i]
        self.sp_sorted, self.sp_order = None, None

    def _rows(self, q: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        """Row of position q (seq·SEQ_MUL + pos), or -1. Rows of one sequence are nearly
        always consecutive, so row + d is tried first; a search only where that misses."""
        n = self.sp.numel()
        i = (guess - self.start).clamp(0, max(0, n - 1))
        ok = (guess - self.start >= 0) & (guess - self.start < n) & (self.sp[i] == q)
        rows = torch.where(ok, guess, -1)
        miss = (~ok & (q >= 0)).nonzero(as_tuple=True)
        if miss[0].numel() and n:
            if self.sp_sorted is None:
                self.sp_sorted, self.sp_order = torch.sort(self.sp)
            qm = q[miss]
            j = torch.searchsorted(self.sp_sorted, qm).clamp(max=n - 1)
            hit = self.sp_sorted[j] == qm
            rows[miss] = torch.where(hit, self.sp_order[j] + self.start, -1)
        return rows

    def windows(self, row_M: torch.Tensor, seqpos_M: torch.Tensor, f_M: torch.Tensor) -> torch.Tensor:
        """[M, W] activations of feature f_M at (seq, pos + d), d in [-before, after]:
        0 where it does not fire, NaN where no row of the span has that position."""
        dev = row_M.device
        B, A = self.before, self.after
        d = torch.arange(-B, A + 1, device=dev)
        q = seqpos_M[:, None] + d[None, :]
        valid = (seqpos_M[:, None] >= 0) & ((seqpos_M[:, None] % SEQ_MUL) + d[None, :] >= 0)
        rows = self._rows(torch.where(valid, q, -1), row_M[:, None] + d[None, :])
        win = torch.where(rows >= 0, 0.0, float("nan"))
        # The feature's pairs in rows [row - before, row + after] (a sequence's rows are
        # ordered by position, so its window lies there): two searches per batch, then
        # place each hit by its true position.
        lo_key = f_M << ROW_BITS | (row_M - B).clamp(min=0)
        hi_key = f_M << ROW_BITS | (row_M + A + 1)
        for b in self.batches:
            lo = torch.searchsorted(b.fkey, lo_key)
            cnt = torch.searchsorted(b.fkey, hi_key) - lo
            total = int(cnt.sum())
            if total == 0:
                continue
            owner = torch.repeat_interleave(torch.arange(row_M.numel(), device=dev), cnt)
            first = torch.cumsum(cnt, 0) - cnt
            idx = lo[owner] + torch.arange(total, device=dev) - first[owner]
            hit_row = b.fkey[idx] & ((1 << ROW_BITS) - 1)
            dd = self.sp[hit_row - self.start] - seqpos_M[owner]
            ok = (dd >= -B) & (dd <= A) & (seqpos_M[owner] >= 0)
            win[owner[ok], dd[ok] + B] = b.fval[idx[ok]]
        return win


class _threads:
    """Restore the torch thread count on exit, however the block ends."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.n)


def encode_pairs(sae: Any, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active (local row, feature, value) triples of a batch, in row order.

    Uses the TopK sparse form when the SAE has one (no dense [B, N] tensor); otherwise
    the dense encode and the SAE's own notion of firing.
    """
    if hasattr(sae, "encode_topk"):
        vals_BK, idx_BK = sae.encode_topk(x_BD)
        on = vals_BK > 0
        r = torch.arange(x_BD.shape[0], device=x_BD.device)[:, None].expand_as(idx_BK)[on]
        return r, idx_BK[on], vals_BK[on].float()
    z_BN = sae.encode(x_BD)
    nz = sae.fired(z_BN).nonzero()
    r, f = nz[:, 0], nz[:, 1]
    return r, f, z_BN[r, f].float()


def _resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_pass(
    sae: Any,
    store: Any,
    acc: FeatureAccumulator,
    *,
    n_rows: int,
    batch_size: int,
    exclude_ids: list[int] = (),  # type: ignore[assignment]
    exclude_positions: list[int] = (),  # type: ignore[assignment]
    device: torch.device,
    progress: bool = True,
    row_start: int = 0,
) -> dict[str, int]:
    """Encode rows [row_start, n_rows) (plus a few rows of look-behind and look-ahead for
    the windows at the ends) once, feeding ``acc``. Returns row counts."""
    from tqdm.auto import tqdm

    first = max(0, row_start - acc.before)
    read_to = min(store.n_rows, n_rows + acc.after + 1)
    ex_ids = torch.tensor(sorted(set(exclude_ids)), dtype=torch.int64, device=device)
    ex_pos = torch.tensor(sorted(set(exclude_positions)), dtype=torch.int64, device=device)
    batches: deque[_Batch] = deque(maxlen=3)
    pending: tuple | None = None
    excluded = 0
    bar = tqdm(total=read_to - first, unit="tok", unit_scale=True, desc="analyze", disable=not progress)

    def flush(p):
        r, f, v, sp = p
        span = _Span(list(batches), acc.before, acc.after)
        # Items entering both the top-k and a reservoir get their window computed once.
        cache = torch.empty(r.numel(), acc.before + acc.after + 1, device=r.device)
        have = torch.zeros(r.numel(), dtype=torch.bool, device=r.device)

        def windows(i):
            need = i[~have[i]]
            if need.numel():
                cache[need] = span.windows(r[need], sp[need], f[need])
                have[need] = True
            return cache[i]

        acc.add_examples(r, f, v, sp, windows)

    # The encoder gets all threads; the bookkeeping is many small ops, for which CPU
    # threads cost more than they give (10× slower with 2 threads on a busy 2-core machine:
    # every op waits for a descheduled worker).
    threads = torch.get_num_threads()
    small_threads = 1 if device.type == "cpu" else threads
    with torch.no_grad(), _threads(threads):
        for start in range(first, read_to, batch_size):
            stop = min(read_to, start + batch_size)
            x_BD = store.acts(start, stop).to(device=device, dtype=torch.float32, non_blocking=True)
            pos_B2 = store.positions(start, stop).to(device)
            torch.set_num_threads(threads)
            r, f, v = encode_pairs(sae, x_BD)
            torch.set_num_threads(small_threads)
            seqpos = torch.where(pos_B2[:, 0] >= 0, pos_B2[:, 0] * SEQ_MUL + pos_B2[:, 1], -1)
            rows = torch.arange(start, stop, device=device)
            in_range = (rows >= row_start) & (rows < n_rows)
            include = in_range.clone()
            if ex_ids.numel():
                tok = store.token_ids(start, stop).to(device)
                include &= ~torch.isin(tok, ex_ids)
            if ex_pos.numel():
                include &= ~torch.isin(pos_B2[:, 1], ex_pos)
            excluded += int((in_range & ~include).sum())
            fkey, o = torch.sort(f << ROW_BITS | (r + start))
            batches.append(_Batch(start, seqpos, fkey, v[o]))
            if pending is not None:
                flush(pending)
            m = include[r]
            ra, fa, va = r[m], f[m], v[m]
            l0_B = torch.bincount(r, minlength=stop - start)[include]
            acc.add_stats(fa, va, l0_B)
            pending = (ra + start, fa, va, seqpos[ra])
            bar.update(stop - start)
        if pending is not None:
            flush(pending)
    bar.close()
    return {"rows_read": read_to - first, "rows_excluded": excluded, "tokens_analysed": acc.rows_analysed}


# ======================================================================================
# Tokens, logits, neighbours


def token_strings(tokenizer: Any) -> list[str]:
    """Each vocabulary id decoded on its own, whitespace kept as real characters."""
    V = len(tokenizer)
    raw = tokenizer.convert_ids_to_tokens(list(range(V)))
    sentencepiece = sum(1 for t in raw if t and t.startswith("▁")) > 0.05 * max(1, V)
    out = []
    for i, t in enumerate(raw):
        if t is None:
            out.append(f"<id {i}>")
        elif sentencepiece and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            b = int(t[3:5], 16)
            out.append(chr(b) if b < 128 else "\ufffd")
        elif sentencepiece:
            out.append(t.replace("▁", " "))
        else:
            try:
                out.append(tokenizer.convert_tokens_to_string([t]))
            except Exception:  # a tokenizer without a byte-level decoder
                out.append(t)
    return out


def _load_tokenizer(name: str | None) -> Any:
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        from llm_sae.models import resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(name))
    except Exception as e:  # noqa: BLE001 - any failure means: no token strings
        warnings.warn(f"analyze: no tokenizer from {name!r} ({type(e).__name__}: {e}); "
                      "tokens are written as <id N>; pass --model to fix", stacklevel=2)
        return None


def unembedding(model_name: str, d_in: int) -> tuple[torch.Tensor | None, str | None, str]:
    """(W_U_eff [D, V] with the final norm's scale folded in, norm kind, reason if None).

    For LayerNorm models the rows are centred over D too (the norm centres the residual
    before scaling), so a decoder atom's component along the all-ones direction, which the
    norm removes, has no effect.
    """
    try:
        from transformers import AutoModelForCausalLM

        from llm_sae.models import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name))
    except Exception as e:  # noqa: BLE001
        return None, None, f"could not load model {model_name!r} ({type(e).__name__}: {e})"
    emb = model.get_output_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        return None, None, f"model {model_name!r} has no unembedding"
    W_U_VD = emb.weight.detach().float()
    if W_U_VD.shape[1] != d_in:
        return None, None, (f"the SAE's width {d_in} is not the model's d_model {W_U_VD.shape[1]} "
                            "(a hook outside the residual stream)")
    base = getattr(model, "base_model", model)
    norm = None
    for name in ("ln_f", "norm", "final_layer_norm", "final_norm", "ln_final"):
        norm = getattr(base, name, None) or getattr(model, name, None)
        if norm is not None:
            break
    kind = "none"
    W_U_DV = W_U_VD.T.clone()
    if norm is not None and getattr(norm, "weight", None) is not None:
        g_D = norm.weight.detach().float()
        cls = type(norm).__name__
        if "Gemma" in cls:
            g_D = g_D + 1.0  # Gemma's RMSNorm scales by (1 + weight)
        kind = "layernorm" if isinstance(norm, torch.nn.LayerNorm) else "rmsnorm"
        W_U_DV = g_D[:, None] * W_U_DV
        if kind == "layernorm":
            W_U_DV = W_U_DV - W_U_DV.mean(0, keepdim=True)
    del model
    return W_U_DV, kind, "ok"


def _chunk(n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, n_cols))


def logit_effects(W_dec_ND: torch.Tensor, W_U_DV: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Top-n promoted / suppressed (values, ids) per feature, centred over the vocabulary."""
    N, V = W_dec_ND.shape[0], W_U_DV.shape[1]
    n = min(n, V)
    pv, pi, sv, si = [], [], [], []
    c = _chunk(V)
    for a in range(0, N, c):
        l_CV = W_dec_ND[a : a + c].float() @ W_U_DV
        l_CV -= l_CV.mean(1, keepdim=True)
        t = l_CV.topk(n, dim=1)
        b = (-l_CV).topk(n, dim=1)
        pv.append(t.values), pi.append(t.indices), sv.append(-b.values), si.append(b.indices)
    return torch.cat(pv), torch.cat(pi), torch.cat(sv), torch.cat(si)


def decoder_neighbours(W_dec_ND: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n other features by decoder cosine, in blocks (never an N×N matrix)."""
    N = W_dec_ND.shape[0]
    n = min(n, N - 1)
    if n <= 0:
        return torch.zeros(N, 0), torch.zeros(N, 0, dtype=torch.long)
    U_ND = W_dec_ND.float() / W_dec_ND.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    vals, idx = [], []
    c = _chunk(N)
    for a in range(0, N, c):
        s_CN = U_ND[a : a + c] @ U_ND.T
        ar = torch.arange(a, min(N, a + c), device=s_CN.device)
        s_CN[ar - a, ar] = -math.inf
        t = s_CN.topk(n, dim=1)
        vals.append(t.values), idx.append(t.indices)
    return torch.cat(vals), torch.cat(idx)


# ======================================================================================
# Turning state into records


def _r(x: float) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def round4(a: Any) -> np.ndarray:
    """Round to 4 significant digits, vectorised; the results print as short decimals
    (an integer divided by a power of ten is the double nearest that decimal)."""
    a = np.array(a, dtype=np.float64)
    nz = np.isfinite(a) & (a != 0)
    x = a[nz]
    e = np.floor(np.log10(np.abs(x))).astype(np.int64) - 3
    r = np.empty_like(x)
    neg = e < 0
    r[neg] = np.round(x[neg] * 10.0 ** (-e[neg])) / 10.0 ** (-e[neg])
    r[~neg] = np.round(x[~neg] / 10.0 ** e[~neg]) * 10.0 ** e[~neg]
    a[nz] = r
    return a


def _lst(a: Any) -> list[float | None]:
    """A rounded JSON list; NaN/Inf (no value) become null."""
    return [v if math.isfinite(v) else None for v in round4(a).tolist()]


def _round_windows(w: np.ndarray) -> np.ndarray:
    w = round4(w)
    w[~np.isfinite(w)] = np.nan  # float16 overflow or "no row": both written as null
    return w


def _edge_cells(max_N: torch.Tensor, exp_N: torch.Tensor, n_bins: int, G: int = FINE_BINS) -> torch.Tensor:
    """[N, n_bins+1] fine-cell indices of n_bins near-equal bins covering [0, max]:
    c_0 = 0 < c_1 < ... < c_n = the cell holding max, plus one. Since max ≥ U/2, at least
    G/2 + 1 cells are in use, so n_bins ≤ G/2 bins are never empty of cells."""
    scale = torch.exp2((-exp_N).double().clamp(max=1000) + math.log2(G))
    used = (max_N.double() * scale).floor().long().add(1).clamp(1, G)
    j = torch.arange(n_bins + 1, dtype=torch.float64)
    return torch.floor(j[None, :] * used[:, None].double() / n_bins + 0.5).long()


def _density_histogram(dens: np.ndarray) -> dict[str, Any]:
    live = dens[dens > 0]
    lo = min(-1.0, math.floor(float(np.log10(live.min())) * 4) / 4) if live.size else -1.0
    edges = np.arange(lo, 0.0001, 0.25)
    counts = np.histogram(np.log10(live), bins=edges)[0] if live.size else np.zeros(len(edges) - 1, int)
    return {"log10_edges": [round(float(x), 3) for x in edges], "counts": counts.tolist(),
            "n_dead": int((dens == 0).sum())}


def _l0_summary(l0_counts: np.ndarray) -> dict[str, Any]:
    total = int(l0_counts.sum())
    if total == 0:
        return {"mean": None, "median": None, "p10": None, "p90": None, "max": None,
                "histogram": {"edges": [], "counts": []}}
    vals = np.arange(len(l0_counts))
    cdf = np.cumsum(l0_counts) / total
    q = lambda p: int(np.searchsorted(cdf, p))  # noqa: E731
    mx = int(vals[l0_counts > 0].max())
    if mx < 64:
        edges = np.arange(mx + 2)
    else:
        edges = np.unique(np.linspace(0, mx + 1, 51).round().astype(int))
    counts = np.add.reduceat(l0_counts[: edges[-1]], edges[:-1]) if len(edges) > 1 else l0_counts
    return {"mean": _r(float((vals * l0_counts).sum() / total)), "median": q(0.5), "p10": q(0.1),
            "p90": q(0.9), "max": mx, "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


class _Tokens:
    """Token ids → display strings, and windows of tokens from the store's sequences."""

    def __init__(self, strings: list[str] | None, store: Any) -> None:
        self.strings, self.store = strings, store
        self.has_seqs = any("seqs" in sh["files"] for sh in store.shards)

    def s(self, i: int) -> str:
        if self.strings is not None and 0 <= i < len(self.strings):
            return self.strings[i]
        return f"<id {i}>"

    def many(self, ids: list[int]) -> list[str]:
        S = self.strings
        if S is None:
            return [f"<id {i}>" for i in ids]
        n = len(S)
        return [S[i] if 0 <= i < n else f"<id {i}>" for i in ids]

    def contexts(self, seqs: list[int]) -> dict[int, np.ndarray]:
        seqs = sorted({s for s in seqs if s >= 0})
        if not seqs or not self.has_seqs:
            return {}
        try:
            toks = self.store.sequence_tokens(seqs).numpy()
        except StoreError:
            return {}
        return dict(zip(seqs, toks.tolist(), strict=True))


def _example(row: int, seqpos: int, act: float, win: list, before: int, ctx: dict, tk: _Tokens) -> dict:
    """One example; ``act`` and ``win`` (a list with NaN for "no row") are already rounded."""
    seq, pos = divmod(seqpos, SEQ_MUL) if seqpos >= 0 else (-1, -1)
    full = ctx.get(seq)
    if full is not None:
        a, b = max(0, pos - before), min(len(full), pos - before + len(win))
        ids, acts, peak = full[a:b], win[a - (pos - before) : b - (pos - before)], pos - a
    else:  # no stored contexts: show the token alone
        ids, acts, peak = [int(tk.store.token_ids(row, row + 1)[0])], win[before : before + 1], 0
    acts = [None if v != v else (v or 0) for v in acts]  # zeros as 0: shorter JSON
    if 0 <= peak < len(acts):
        acts[peak] = act
    return {"row": row, "seq": seq, "pos": pos, "act": act, "peak": peak, "tokens": tk.many(ids), "acts": acts}


def interval_selection(acc: FeatureAccumulator, n_bins: int, per_bin: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Choose the interval examples of every feature at once.

    Returns (edges [N, n_bins+1] in fine cells, pick_bin [N, R·p]: the bin each reservoir
    entry was chosen for, or -1). A final bin draws from the reservoir entries whose value
    lies in it; each entry stands for (its cell's count / samples kept in that cell)
    activations, and ``per_bin`` are drawn by weighted sampling without replacement
    (Efraimidis–Spirakis: the largest log(u)/w, u a hash of (row, feature)).
    """
    assert acc.res is not None
    N, G, R, res = acc.n, acc.G, acc.R, acc.res
    P = R * res.p
    dev = acc.device
    val = res.val.view(N, P).double()
    row = res.row.view(N, P)
    valid = res.prim.view(N, P) < res.EMPTY
    scale = torch.exp2((-acc.exp).double().clamp(max=1000) + math.log2(G))
    cell = (val * scale[:, None]).floor().clamp(0, G - 1).long()
    cell_r = cell // (G // R)
    n_r = acc.fine.view(N, R, G // R).sum(-1).double()
    s_r = torch.zeros(N, R, dtype=torch.float64, device=dev).scatter_add_(1, cell_r, valid.double())
    w = n_r.gather(1, cell_r) / s_r.gather(1, cell_r).clamp_min(1)
    f_NP = torch.arange(N, device=dev)[:, None].expand(N, P)
    u = (pair_hash(row.clamp_min(0), f_NP, seed + 1).double() + 0.5) / 2.0**32
    score = torch.where(valid, u.log() / w.clamp_min(1e-300), -math.inf)
    edges = _edge_cells(acc.max, acc.exp, n_bins, G)
    bin_ = torch.searchsorted(edges, cell, right=True) - 1
    bin_ = torch.where(valid, bin_.clamp(0, n_bins - 1), n_bins)
    # Per feature: order by (bin, score desc, row); rank within bin; keep the first per_bin.
    o = torch.argsort(row, dim=1, stable=True)
    o = o.gather(1, torch.argsort(-score.gather(1, o), dim=1, stable=True))
    o = o.gather(1, torch.argsort(bin_.gather(1, o), dim=1, stable=True))
    b_sorted = bin_.gather(1, o)
    start = torch.ones_like(b_sorted, dtype=torch.bool)
    start[:, 1:] = b_sorted[:, 1:] != b_sorted[:, :-1]
    ar = torch.arange(P, device=dev)[None, :].expand(N, P)
    rank = ar - torch.where(start, ar, 0).cummax(1).values
    chosen = (rank < per_bin) & (b_sorted < n_bins)
    pick = torch.full((N, P), -1, dtype=torch.int64, device=dev)
    pick.scatter_(1, o, torch.where(chosen, b_sorted, -1))
    return edges, pick


# ======================================================================================
# Entry points


def analyze(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Run the analysis and write ``cfg.out``; returns the summary dict.

    Under ``torchrun`` the ranks split the rows into consecutive ranges, and rank 0
    merges their per-feature state exactly and writes the output (others return {}).
    """
    from llm_sae.distributed import init_from_env, report_rank_failure

    rank, world = init_from_env()
    if world == 1:
        return _analyze(cfg, 0, 1)
    with report_rank_failure("analysis"):
        return _analyze(cfg, rank, world)


def _analyze(cfg: AnalyzeConfig, rank: int, world: int) -> dict[str, Any]:
    from llm_sae.sae import load_sae
    from llm_sae.store import open_store

    t0, c0 = time.perf_counter(), time.process_time()
    _check_config(cfg)
    device = _resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    store = open_store(cfg.store)
    sae = load_sae(cfg.sae, device=device)
    if sae.d_in != store.d_in:
        raise AnalyzeError(
            f"the SAE at {cfg.sae} takes d_in={sae.d_in} but the store at {cfg.store} holds "
            f"d_in={store.d_in} rows (hook {store.hook!r}); analyse the SAE with a store of the "
            "hook it was trained on"
        )
    if store.n_rows == 0:
        raise StoreError(f"the store at {cfg.store} has no rows; harvest some activations into it first")
    N = sae.n_latents
    n_rows = store.n_rows if cfg.tokens is None else min(cfg.tokens, store.n_rows)
    batch_size = max(cfg.batch_size, 2 * (cfg.context_before + cfg.context_after + 1))

    model_name = cfg.model or store.model
    tok = _load_tokenizer(cfg.model or store.manifest.get("tokenizer") or store.model)
    strings = token_strings(tok) if tok is not None else None
    exclude_ids = []
    if cfg.exclude_bos:
        if tok is None:
            raise AnalyzeError("--exclude-bos needs the tokenizer to know the special tokens; pass --model")
        exclude_ids = [int(i) for i in tok.all_special_ids]

    acc = FeatureAccumulator(
        N, top_k=cfg.top_k, n_bins=cfg.n_bins, per_bin=cfg.per_bin,
        window=(cfg.context_before, cfg.context_after), seed=cfg.seed, device=device,
    )
    counts = run_pass(
        sae, store, acc, n_rows=(rank + 1) * n_rows // world, batch_size=batch_size,
        exclude_ids=exclude_ids, exclude_positions=cfg.exclude_positions, device=device,
        progress=cfg.progress and rank == 0, row_start=rank * n_rows // world,
    )
    if world > 1:
        merged = merge_ranks(acc, counts)
        if merged is None:
            return {}
        counts = merged
    t_pass, c_pass = time.perf_counter() - t0, time.process_time() - c0

    W_dec_ND = sae.W_dec.detach()
    logits, logit_info = None, {"available": False, "reason": "disabled (--no-logits)", "norm": None}
    if cfg.logits and model_name:
        W_U_DV, kind, reason = unembedding(model_name, sae.d_in)
        if W_U_DV is not None:
            logits = [t.cpu() for t in logit_effects(W_dec_ND, W_U_DV.to(W_dec_ND.device), cfg.n_logits)]
            logit_info = {"available": True, "reason": None, "norm": kind}
        else:
            logit_info = {"available": False, "reason": reason, "norm": None}
    elif cfg.logits:
        logit_info["reason"] = "the store names no model; pass --model"
    nb_vals, nb_idx = (t.cpu() for t in decoder_neighbours(W_dec_ND, cfg.n_neighbours))

    with _threads(torch.get_num_threads()):
        if device.type == "cpu":
            torch.set_num_threads(1)  # small ops and Python: threads only add waiting
        summary = write_output(
            cfg, store, sae, acc, counts, strings, tok, logits, logit_info, (nb_vals, nb_idx), model_name,
        )
    summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
    summary["pass_s"] = round(t_pass, 3)
    summary["pass_cpu_s"] = round(c_pass, 3)
    _write_json(Path(cfg.out) / "summary.json", summary)
    return summary


def _check_config(cfg: AnalyzeConfig) -> None:
    if cfg.tokens is not None and cfg.tokens <= 0:
        raise ConfigError(f"--tokens must be positive, got {cfg.tokens}")
    for name in ("top_k", "context_before", "context_after", "per_bin", "n_logits", "n_neighbours"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    if not 1 <= cfg.n_bins <= FINE_BINS // 2 or not 1 <= cfg.hist_bins <= FINE_BINS // 2:
        raise ConfigError(f"--n-bins and --hist-bins must be between 1 and {FINE_BINS // 2}")
    if cfg.batch_size <= 0 or cfg.shard_size <= 0:
        raise ConfigError("--batch-size and --shard-size must be positive")
    if not Path(cfg.sae).exists():
        from llm_sae.errors import CheckpointError

        raise CheckpointError(f"no SAE at {cfg.sae}; train one with `llm-sae train` or fix --sae")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_output(cfg, store, sae, acc, counts, strings, tok, logits, logit_info, neighbours, model_name) -> dict:
    """Write vocab.json, features.jsonl and the shards; returns the summary (not yet written)."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    N, T, G = acc.n, max(1, counts["tokens_analysed"]), acc.G
    if strings is not None:
        special = sorted(int(i) for i in getattr(tok, "all_special_ids", []))
        _write_json(out / "vocab.json", {"tokens": strings, "special_ids": special})
    tk = _Tokens(strings, store)
    cnt = acc.count.cpu().numpy()
    mean = round4((acc.sum.cpu() / acc.count.cpu().clamp_min(1)).numpy())
    mx = round4(acc.max.cpu().numpy())
    dens = cnt / T
    log_dens = round4(np.log10(np.maximum(dens, 1e-300)))
    dens_r = round4(dens)
    # Histograms and interval bins of every feature at once, exact from the fine cells.
    width = torch.exp2(acc.exp.double().clamp(min=-1000)) / G
    cum = torch.cat([torch.zeros(N, 1, dtype=torch.int64, device=acc.device), acc.fine.long().cumsum(1)], 1)
    h_cells = _edge_cells(acc.max, acc.exp, cfg.hist_bins, G)
    h_edges = round4((h_cells * width[:, None]).cpu().numpy())
    h_counts = cum.gather(1, h_cells).diff(dim=1).cpu().numpy()
    if acc.res is not None:
        i_cells, pick = interval_selection(acc, cfg.n_bins, cfg.per_bin, cfg.seed)
        pick = pick.cpu().numpy()
        P = acc.R * acc.res.p
        res = [t.view(N, P, *t.shape[2:]) for t in (acc.res.row, acc.res.val, acc.res.seqpos, acc.res.win)]
    else:
        i_cells = _edge_cells(acc.max, acc.exp, cfg.n_bins, G)
        pick, res = None, None
    i_edges = round4((i_cells * width[:, None]).cpu().numpy())
    i_counts = cum.gather(1, i_cells).diff(dim=1).cpu().numpy()
    i_share = round4(i_counts / np.maximum(cnt, 1)[:, None])
    top = None
    if acc.top is not None:
        top = [acc.top.row, acc.top.val, acc.top.seqpos, acc.top.win]
        top_n = (acc.top.prim < acc.top.EMPTY).sum(1).cpu().numpy()
    nb_vals, nb_idx = neighbours[0].numpy(), neighbours[1].numpy()
    nb_vals = round4(nb_vals)
    if logits is not None:
        pv, pi, sv, si = (t.numpy() for t in logits)
        pv, sv = round4(pv), round4(sv)
    S = cfg.shard_size
    n_shards = (N + S - 1) // S
    index_lines = []
    def shard_np(arrs, a, b):
        # One shard's slice on the host, rounded: transient memory is per shard, not per SAE.
        out = [t[a:b].cpu().numpy() for t in arrs[:3]]
        return [out[0], round4(out[1]), out[2], _round_windows(arrs[3][a:b].float().cpu().numpy())]

    for s in tqdm(range(n_shards), desc="write", unit="shard", disable=not cfg.progress):
        a0 = s * S
        feats = range(a0, min(N, (s + 1) * S))
        tp = shard_np(top, a0, feats.stop) if top is not None else None
        rs = shard_np(res, a0, feats.stop) if res is not None else None
        # The contexts of this shard's examples are read in one go.
        seqs: list[int] = []
        for f in feats:
            if tp is not None:
                seqs += (tp[2][f - a0][: top_n[f]] // SEQ_MUL).tolist()
            if rs is not None:
                seqs += (rs[2][f - a0][pick[f] >= 0] // SEQ_MUL).tolist()
        ctx = tk.contexts(seqs)
        lines, offsets = [], [0]
        for f in feats:
            dead = bool(cnt[f] == 0)
            rec: dict[str, Any] = {
                "id": f, "dead": dead, "dense": bool(dens[f] > cfg.dense_threshold),
                "count": int(cnt[f]), "density": float(dens_r[f]),
                "log10_density": None if dead else float(log_dens[f]),
                "mean_act": float(mean[f]), "max_act": float(mx[f]),
            }
            tops = []
            if top is not None:
                rows, vals, sps, wins = (tp[j][f - a0][: top_n[f]].tolist() for j in range(4))
                tops = [_example(*z, cfg.context_before, ctx, tk) for z in zip(rows, sps, vals, wins, strict=True)]
            seen: list[str] = []
            for e in tops:
                t = e["tokens"][e["peak"]] if 0 <= e["peak"] < len(e["tokens"]) else None
                if t is not None and t not in seen and len(seen) < 5:
                    seen.append(t)
            rec["top_tokens"] = seen
            if dead:
                rec["histogram"] = {"edges": [], "counts": []}
                rec["interval_examples"] = []
            else:
                rec["histogram"] = {"edges": h_edges[f].tolist(), "counts": h_counts[f].tolist()}
                bins = []
                for j in range(cfg.n_bins):
                    exs = []
                    if pick is not None:
                        idx = np.nonzero(pick[f] == j)[0]
                        g = f - a0
                        idx = idx[np.lexsort((rs[0][g][idx], -rs[1][g][idx]))]
                        exs = [_example(int(rs[0][g][i]), int(rs[2][g][i]), float(rs[1][g][i]),
                                        rs[3][g][i].tolist(), cfg.context_before, ctx, tk) for i in idx]
                    bins.append({"lo": float(i_edges[f][j]), "hi": float(i_edges[f][j + 1]),
                                 "count": int(i_counts[f][j]), "share": float(i_share[f][j]), "examples": exs})
                rec["interval_examples"] = bins
            rec["top_examples"] = tops
            if logits is not None:
                rec["logits"] = {
                    "promoted": [{"token": tk.s(int(i)), "id": int(i), "value": float(v)}
                                 for v, i in zip(pv[f], pi[f], strict=True)],
                    "suppressed": [{"token": tk.s(int(i)), "id": int(i), "value": float(v)}
                                   for v, i in zip(sv[f], si[f], strict=True)],
                }
            else:
                rec["logits"] = None
            rec["neighbours"] = {
                "decoder_cosine": [{"id": int(i), "value": float(v)}
                                   for v, i in zip(nb_vals[f], nb_idx[f], strict=True)],
                "cooccurrence": None,
            }
            b = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            lines.append(b)
            offsets.append(offsets[-1] + len(b))
            index_lines.append(json.dumps(
                {k: rec[k] for k in ("id", "dead", "dense", "count", "log10_density", "max_act",
                                     "mean_act", "top_tokens")}, ensure_ascii=False, separators=(",", ":")))
        shard = out / "features" / f"shard_{s:05d}.jsonl"
        tmp = shard.with_name(shard.name + ".tmp")
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, shard)
        (out / "features" / f"shard_{s:05d}.idx.json").write_text(json.dumps(offsets))
    (out / "features.jsonl.tmp").write_text("\n".join(index_lines) + "\n", encoding="utf-8")
    os.replace(out / "features.jsonl.tmp", out / "features.jsonl")

    l0 = _l0_summary(acc.l0_counts.cpu().numpy())
    return {
        "format_version": FORMAT_VERSION,
        "n_features": N,
        "d_in": sae.d_in,
        "sae": {"path": str(cfg.sae), "cfg": to_dict(sae.cfg)},
        "store": {"path": str(cfg.store), "model": store.model, "hook": store.hook,
                  "n_rows": store.n_rows, "context_length": store.context_length},
        "model": model_name,
        **counts,
        "dead_threshold": 0,
        "dense_threshold": cfg.dense_threshold,
        "n_dead": int((cnt == 0).sum()),
        "n_dense": int((dens > cfg.dense_threshold).sum()),
        "density_histogram": _density_histogram(dens),
        "l0": l0,
        "logits": logit_info,
        "shard_size": S,
        "n_shards": n_shards,
        "state_bytes": acc.nbytes(),
        "options": to_dict(cfg),
    }


# ======================================================================================
# Reading the output back


def load_summary(out_dir: str | Path) -> dict[str, Any]:
    """The analysis summary (summary.json)."""
    p = Path(out_dir) / "summary.json"
    if not p.is_file():
        raise AnalyzeError(f"no analysis at {out_dir} (no summary.json); run `llm-sae analyze` first")
    return json.loads(p.read_text(encoding="utf-8"))


def load_index(out_dir: str | Path) -> list[dict[str, Any]]:
    """The per-feature index (features.jsonl): a list where element i is feature i."""
    load_summary(out_dir)
    with open(Path(out_dir) / "features.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_feature(out_dir: str | Path, feature_id: int) -> dict[str, Any]:
    """One feature's full record, read by byte range (never parses a whole shard)."""
    summary = load_summary(out_dir)
    N, S = summary["n_features"], summary["shard_size"]
    if not 0 <= feature_id < N:
        raise AnalyzeError(f"feature {feature_id} is out of range: this analysis has features 0..{N - 1}")
    s, i = divmod(int(feature_id), S)
    d = Path(out_dir) / "features"
    offsets = json.loads((d / f"shard_{s:05d}.idx.json").read_text())
    with open(d / f"shard_{s:05d}.jsonl", "rb") as f:
        f.seek(offsets[i])
        return json.loads(f.read(offsets[i + 1] - offsets[i]).decode("utf-8"))


# ======================================================================================
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, AnalyzeConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(AnalyzeConfig, args)
    s = analyze(cfg)
    if not s:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(f"analysed {s['tokens_analysed']:,} tokens × {s['n_features']:,} features in {s['elapsed_s']:.1f}s: "
          f"{s['n_dead']} dead, {s['n_dense']} dense, mean L0 {s['l0']['mean']}; wrote {cfg.out}")
    return 0


__all__ = ["AnalyzeConfig", "AnalyzeError", "analyze", "load_summary", "load_index", "load_feature",
           "BottomSlots", "FeatureAccumulator", "run_pass", "encode_pairs", "token_strings"]
