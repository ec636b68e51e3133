"""One streaming pass of the store through the SAE, feeding the accumulators."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from llm_sae.analyze.accumulate import SEQ_MUL, FeatureAccumulator
from llm_sae.common.threads import num_threads


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
    with torch.no_grad(), num_threads(threads):
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
