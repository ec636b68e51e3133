"""Reading a store in shuffled batches with bounded memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm_sae.common.threads import iter_in_background
from llm_sae.errors import StoreError
from llm_sae.store.format import DEFAULT_MEMORY_BUDGET
from llm_sae.store.quant import n_blocks

if TYPE_CHECKING:
    from llm_sae.store.store import Store


class StoreReader:
    """Shuffled batches from a store, with bounded memory and background prefetch.

    The store is cut into chunks of consecutive rows (within shards), which are dealt to
    ranks round-robin from one seeded permutation, so ranks read disjoint rows. Each epoch
    a rank permutes its chunks (seeded by ``seed``, the epoch and the rank) and loads them
    a group at a time — as many chunks as fit in a third of
    ``memory_budget_bytes`` (one group in use, one ready, one loading) — and permutes the
    rows within the group. The rank's epoch is the concatenation of its groups, cut into
    batches; every rank yields the same number of batches per epoch (the smallest rank's
    ``rows // batch_size``), so data-parallel training never waits on a missing batch.
    With one rank every row appears exactly once per epoch up to the last partial batch.

    The order is a pure function of (seed, epoch, rank, world_size, batch_size,
    memory_budget_bytes), so ``start_batch=n`` resumes exactly after batch n without
    reading the skipped rows.

    ``batch_slice=(i, n)`` yields only the i-th of n equal parts of every batch, the same
    rows in the same order as slicing the full batch, and reads only those rows (gathered
    from the memory maps; no whole groups are loaded). Data-parallel training uses it: all
    ranks follow one batch order, so a run is the same for any number of ranks, and each
    rank reads just its share of the bytes.
    """

    def __init__(
        self,
        store: Store,
        batch_size: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
        start_batch: int = 0,
        with_rows: bool = False,
        loop: bool = False,
        shuffle: bool = True,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        device: str | torch.device | None = None,
        prefetch: int = 4,
        batch_slice: tuple[int, int] | None = None,
    ) -> None:
        if rank is None or world_size is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist_on else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist_on else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        self.store, self.batch_size, self.seed, self.dtype = store, int(batch_size), int(seed), dtype
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch, self.with_rows, self.loop, self.shuffle = int(start_batch), with_rows, loop, shuffle
        self.device, self.prefetch = device, max(1, prefetch)
        if batch_slice is not None:
            i, n = (int(v) for v in batch_slice)
            if not 0 <= i < n or batch_size % n:
                raise StoreError(
                    f"batch_slice {batch_slice} must be (i, n) with 0 <= i < n and n dividing "
                    f"the batch size {batch_size}"
                )
            batch_slice = (i, n)
        self.batch_slice = batch_slice

        group_bytes = max(store.row_bytes, memory_budget_bytes // 3)
        self.chunk_rows = int(max(1, min(8192, group_bytes // (8 * store.row_bytes))))
        self.group_chunks = int(max(1, group_bytes // (self.chunk_rows * store.row_bytes)))
        # (shard, start, stop) for every chunk, in store order.
        self.chunks = [
            (s, a, min(a + self.chunk_rows, sh["rows"]))
            for s, sh in enumerate(store.shards)
            for a in range(0, sh["rows"], self.chunk_rows)
        ]
        if self.batches_per_epoch == 0:
            raise StoreError(
                f"the store at {store.path} has {store.n_rows} rows, fewer than one batch of "
                f"{batch_size} per rank (world_size {world_size}); use a smaller batch or a bigger store"
            )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the plan (indices only; cheap) ---------------------------------------------------
    def _rank_chunks(self, rank: int) -> list[tuple[int, int, int]]:
        """The chunks a rank owns: dealt round-robin from one seeded permutation."""
        order = np.arange(len(self.chunks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0xC0FFEE]).permutation(len(self.chunks))
        return [self.chunks[i] for i in order[rank :: self.world_size]]

    def _epoch_chunks(self, epoch: int) -> list[tuple[int, int, int]]:
        ch = self._rank_chunks(self.rank)
        if not self.shuffle:
            return ch
        perm = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(ch))
        return [ch[i] for i in perm]

    @property
    def batches_per_epoch(self) -> int:
        if not hasattr(self, "_bpe"):
            per_rank = [sum(c[2] - c[1] for c in self._rank_chunks(r)) for r in range(self.world_size)]
            self._bpe = min(per_rank) // self.batch_size
        return self._bpe

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("a looping reader has no length")
        return max(0, self.batches_per_epoch - self.start_batch)

    def _groups(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        ch = self._epoch_chunks(epoch)
        g = self.group_chunks
        return [ch[i : i + g] for i in range(0, len(ch), g)]

    def _group_perm(self, epoch: int, gi: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, self.rank, gi, 1]).permutation(n)

    # -- threads ------------------------------------------------------------------------
    def _scales_buffer(self, n: int) -> np.ndarray | None:
        """Room for ``n`` rows' scales (int8 stores), else None."""
        block = self.store.quant_block
        return None if block is None else np.empty((n, n_blocks(self.store.d_in, block)), np.float32)

    def _load_group(self, chunks: list[tuple[int, int, int]]) -> tuple[tuple, np.ndarray]:
        """((acts, scales or None), store rows) of a group of chunks, as on disk."""
        n = sum(c[2] - c[1] for c in chunks)
        buf = np.empty((n, self.store.d_in), self.store._np_dtype)
        scales = self._scales_buffer(n)
        rows = np.empty(n, np.int64)
        o = 0
        for s, a, b in chunks:
            buf[o : o + b - a] = self.store._mmap(s, "acts")[a:b]
            if scales is not None:
                scales[o : o + b - a] = self.store._mmap(s, "scales")[a:b]
            rows[o : o + b - a] = np.arange(a, b) + self.store._offsets[s]
            o += b - a
        return (buf, scales), rows

    def _plan(self) -> Iterator[tuple[int, int]]:
        """Yield (epoch, batch number within the epoch) for every batch to produce."""
        bpe = self.batches_per_epoch
        epoch, b = divmod(self.start_batch, bpe)
        if not self.loop and epoch > 0:
            return
        while True:
            yield epoch, b
            b += 1
            if b == bpe:
                if not self.loop:
                    return
                epoch, b = epoch + 1, 0

    def _epoch_groups(self, epoch: int) -> tuple[list, np.ndarray]:
        """The epoch's groups and the cumulative row counts at their starts (and end)."""
        gs = self._groups(epoch)
        return gs, np.cumsum([0] + [sum(c[2] - c[1] for c in g) for g in gs])

    def _batch_pieces(self, sizes: np.ndarray, b: int) -> Iterator[tuple[int, int, int]]:
        """(group, start, stop) of each run of batch ``b`` within a group, in order."""
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        gi = int(np.searchsorted(sizes, lo, side="right") - 1)
        while lo < hi:
            a, z = int(lo - sizes[gi]), int(min(hi, sizes[gi + 1]) - sizes[gi])
            yield gi, a, z
            lo, gi = int(sizes[gi] + z), gi + 1

    def _batches(self) -> Iterator[Any]:
        """Synchronous batch generator (run on the prefetch thread)."""
        cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        loader: dict[tuple[int, int], Future] = {}
        pool = ThreadPoolExecutor(1, thread_name_prefix="store-loader")
        sizes_cache: dict[int, tuple[list, np.ndarray]] = {}

        def groups_of(epoch):
            if epoch not in sizes_cache:
                sizes_cache.clear()
                sizes_cache[epoch] = self._epoch_groups(epoch)
            return sizes_cache[epoch]

        def request(epoch, gi):
            gs, _ = groups_of(epoch)
            if gi < len(gs) and (epoch, gi) not in loader and (epoch, gi) not in cache:
                loader[(epoch, gi)] = pool.submit(self._load_group, gs[gi])

        def get(epoch, gi):
            if (epoch, gi) not in cache:
                request(epoch, gi)
                x, rows = loader.pop((epoch, gi)).result()
                cache[(epoch, gi)] = (x, rows, self._group_perm(epoch, gi, len(rows)))
            return cache[(epoch, gi)]

        try:
            for epoch, b in self._plan():
                gs, sizes = groups_of(epoch)
                xs, ss, rs = [], [], []
                for gi, a, z in self._batch_pieces(sizes, b):
                    (x, sc), rows, perm = get(epoch, gi)
                    # Sorted, so the gather walks memory forwards (the batch's membership is
                    # what is random; order within it does not matter), and np.take rather
                    # than index_select: several times faster for row gathers on CPU.
                    pick = np.sort(perm[a:z])
                    xs.append(np.take(x, pick, axis=0))
                    if sc is not None:
                        ss.append(np.take(sc, pick, axis=0))
                    rs.append(rows[pick])
                # Drop groups behind us and start loading the next one.
                for key in [k for k in cache if k != (epoch, gi)]:
                    del cache[key]
                nxt = (epoch, gi + 1) if gi + 1 < len(gs) else (epoch + 1, 0)
                if nxt[0] == epoch or self.loop:
                    request(*nxt)
                x_BD = self.store._to_torch(xs[0] if len(xs) == 1 else np.concatenate(xs),
                                            np.concatenate(ss) if ss else None)
                x_BD = x_BD.to(self.dtype)
                if self.device is not None:
                    x_BD = x_BD.to(self.device, non_blocking=True)
                yield (x_BD, torch.from_numpy(np.concatenate(rs))) if self.with_rows else x_BD
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _group_rows(self, chunks: list[tuple[int, int, int]]) -> np.ndarray:
        """The store rows a group holds, in the order ``_load_group`` loads them."""
        return np.concatenate([np.arange(a, b) + self.store._offsets[s] for s, a, b in chunks])

    def _sliced_batches(self) -> Iterator[Any]:
        """``batch_slice`` mode: the same batches' rows, cut and read row by row."""
        B = self.batch_size
        i, n = self.batch_slice  # type: ignore[misc]
        groups: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        epoch_groups: dict[int, tuple[list, np.ndarray]] = {}
        for epoch, b in self._plan():
            if epoch not in epoch_groups:
                epoch_groups.clear()
                epoch_groups[epoch] = self._epoch_groups(epoch)
            gs, sizes = epoch_groups[epoch]
            picked = []
            for gi, a, z in self._batch_pieces(sizes, b):
                if (epoch, gi) not in groups:
                    if len(groups) > 1:
                        groups.clear()
                    rows = self._group_rows(gs[gi])
                    groups[(epoch, gi)] = (rows, self._group_perm(epoch, gi, len(rows)))
                rows, perm = groups[(epoch, gi)]
                picked.append(rows[np.sort(perm[a:z])])  # as _batches orders them
            rows_B = np.concatenate(picked)[i * B // n : (i + 1) * B // n]
            x_BD = self.store._to_torch(*self.store.gather_rows(rows_B)).to(self.dtype)
            if self.device is not None:
                x_BD = x_BD.to(self.device, non_blocking=True)
            yield (x_BD, torch.from_numpy(rows_B)) if self.with_rows else x_BD

    def __iter__(self) -> Iterator[Any]:
        gen = self._batches() if self.batch_slice is None else self._sliced_batches()
        return iter_in_background(gen, self.prefetch, name="store-prefetch")
