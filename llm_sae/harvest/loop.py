"""The harvest loop: batches of contexts through the model, activations to the stores."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from llm_sae.common.threads import iter_in_background
from llm_sae.errors import DataError, ModelError
from llm_sae.lm.hooks import keep_mask, run_to_hooks
from llm_sae.lm.text import StreamPos, chat_renderer, iter_documents, pack_contexts
from llm_sae.store.norms import joint_outliers
from llm_sae.store.writer import NonFiniteError, StoreWriter


class Job:
    """One batch's rows for every hook that still needs it, and what to record with them."""

    def __init__(self, rows: dict[str, torch.Tensor], tok_N, pos_N2, progress, sequences, span) -> None:
        self.rows, self.tok_N, self.pos_N2 = rows, tok_N, pos_N2
        self.progress, self.sequences, self.span = progress, sequences, span
        self.ready: Any = None  # CUDA event recorded after the device→host copies


def _append_job(writers: dict[str, StoreWriter], job: Job) -> None:
    """The store appends of one batch (on the writer thread, or inline when synchronous)."""
    if job.ready is not None:
        job.ready.synchronize()  # the non_blocking copies into pinned memory have landed
    # An outlier at any hook is left out of every store, so they stay row-aligned. Without
    # --max-norm-multiple nothing is passed: any writer with append(x, tok, pos) will do.
    outliers_N = joint_outliers(writers, job.rows)
    for h, x_ND in job.rows.items():
        w = writers[h]
        try:
            # The writer checks finiteness after conversion to the store dtype.
            w.append(x_ND, job.tok_N, job.pos_N2, progress=job.progress, sequences=job.sequences,
                     **({} if outliers_N is None else {"outliers_N": outliers_N}))
        except NonFiniteError:
            c, c_end = job.span
            raise ModelError(
                f"hook {h!r} produced NaN/Inf activations in contexts {c}..{c_end - 1} "
                f"(or they overflowed {w.meta['dtype']}); the {len(w.shards)} shards "
                "already written are kept. Run the model in float32 (--model-dtype "
                "float32), store as float32, or check the model's weights"
            ) from None


class StoreSink:
    """Hands each batch's rows to the stores, in order, on a background writer thread.

    A ring of ``depth`` slots bounds what is in flight (the harvest loop waits for a free
    slot, so memory stays bounded when the disk is slower than the model). On CUDA each
    slot holds pinned host buffers: rows are converted to the store dtype on the device,
    copied with ``non_blocking=True`` and a CUDA event is recorded, so the forward pass
    never waits for the copy or the disk; the writer thread waits on the event, then
    appends. ``StoreWriter.append`` copies what it keeps, so a slot is reused as soon as
    its appends return. An exception on the writer thread is re-raised in the harvest loop
    at the next ``put`` or at ``close``; later batches are then never written, and since
    progress is saved with the rows, a rerun resumes exactly after the last one written.
    ``threaded=False`` appends inline (the reference the threaded path is tested against).
    """

    def __init__(self, writers: dict[str, StoreWriter], *, device: Any = "cpu", depth: int = 3,
                 threaded: bool = True) -> None:
        self.writers, self.threaded = writers, threaded
        self.pinned = torch.device(device).type == "cuda"
        self.seconds = 0.0  # time spent appending (on whichever thread does it)
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put({})  # a slot: hook → pinned buffer, grown on demand
        self._work: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="harvest-writer")
            self._thread.start()

    def put(self, job: Job) -> None:
        """Queue one batch (rows on any device); raises the writer thread's error, if any."""
        self._raise()
        if not self.threaded:
            t = time.perf_counter()
            _append_job(self.writers, job)
            self.seconds += time.perf_counter() - t
            return
        slot = self._take_slot()
        if self.pinned:
            self._copy_to_host(job, slot)
        self._work.put((job, slot))

    def close(self, *, drain: bool = True) -> None:
        """Stop the thread; with ``drain`` write everything queued first. Re-raises its error."""
        if self._thread is not None:
            if not drain and self.error is None:
                self.error = _Stop()
            self._work.put(None)
            self._thread.join()
            self._thread = None
        if drain:
            self._raise()

    def _take_slot(self) -> dict:
        while True:
            self._raise()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _copy_to_host(self, job: Job, slot: dict) -> None:
        for h, x_ND in job.rows.items():
            x_ND = x_ND.to(self.writers[h].torch_dtype)  # on the device: fewer bytes to copy
            buf = slot.get(h)
            if buf is None or buf.shape[0] < x_ND.shape[0] or buf.dtype != x_ND.dtype:
                buf = slot[h] = self._host_buffer(x_ND.shape, x_ND.dtype)
            host = buf[: x_ND.shape[0]]
            host.copy_(x_ND, non_blocking=True)
            job.rows[h] = host
        job.ready = self._event()
        job.ready.record()

    # Seams for the CPU tests of the copy path (pinned memory and events need CUDA).
    @staticmethod
    def _host_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    @staticmethod
    def _event() -> Any:
        return torch.cuda.Event()

    def _loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            job, slot = item
            try:
                if self.error is None:
                    t = time.perf_counter()
                    _append_job(self.writers, job)
                    self.seconds += time.perf_counter() - t
            except BaseException as e:  # re-raised in the harvest loop
                self.error = e
            finally:
                self._free.put(slot)

    def _raise(self) -> None:
        if self.error is not None and not isinstance(self.error, _Stop):
            raise self.error


class _Stop(Exception):
    """Marks a sink closed without draining: queued batches are dropped, not written."""


def run_loop(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say) -> None:
    sink = StoreSink(writers, device=device, threaded=cfg.async_write)
    try:
        _harvest_loop(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say, sink)
    except BaseException:
        sink.close(drain=False)  # stop the writer thread before the stores are closed
        raise


def _harvest_loop(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say, sink) -> None:
    B, L, N = int(cfg.batch_size), int(cfg.context_length), int(cfg.tokens)
    # Where each store stands; restart from the one furthest behind. Stores ahead skip
    # batches they already hold (shard ends fall on batch ends, so this lines up exactly).
    prog = {h: w.progress or {"contexts": 0, "doc": 0, "offset": 0, "rows": 0} for h, w in writers.items()}
    if all(w.completed for w in writers.values()):
        say("harvest: already complete; nothing to do")
        return
    start_h = min(prog, key=lambda h: prog[h]["contexts"])
    p0 = prog[start_h]
    if p0["contexts"] % B:
        # Only an interrupted run with another batch size gets here; correct, just realigned.
        say(f"harvest: resuming at context {p0['contexts']}, not a multiple of --batch-size {B}")
    if p0["contexts"]:
        say(f"harvest: resuming after {p0['contexts']:,} contexts ({min(p['rows'] for p in prog.values()):,} tokens)")

    docs = iter_documents(cfg.dataset, config=cfg.dataset_config, split=cfg.split,
                          text_column=cfg.column, streaming=cfg.streaming,
                          render=chat_renderer(tok) if cfg.chat_template else None)
    contexts = pack_contexts(docs, tok, L, start=StreamPos(p0["doc"], p0["offset"]))
    c, rows_total = int(p0["contexts"]), int(p0["rows"])
    own_rows = sum(w.n_rows for w in writers.values()) // len(writers)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=N if world == 1 else None, initial=rows_total, unit="tok", unit_scale=True,
                   desc="harvest", dynamic_ncols=True, file=sys.stderr)
    produced_any = c > 0
    t0 = time.perf_counter()
    store_s = 0.0  # time the harvesting thread spends on the store (benchmarks report it)
    # Tokenizing ahead on a thread keeps a GPU busy; on CPU the thread would only compete
    # with the model's own threads for the same cores.
    if str(device).startswith("cpu"):
        batches = iter(lambda: _take(contexts, B) or None, None)
    else:
        batches = _batches_ahead(contexts, B)
    while rows_total < N:
        batch = next(batches, None)
        if batch is None:
            break
        produced_any = True
        tokens_BL = torch.from_numpy(np.stack([t for t, _ in batch]))
        after = batch[-1][1]
        keep_BL = keep_mask(tokens_BL, special) if cfg.skip_special else torch.ones_like(tokens_BL, dtype=torch.bool)
        # Cut the last batch exactly at the requested number of rows.
        cum = torch.cumsum(keep_BL.reshape(-1).long(), 0).reshape(keep_BL.shape)
        keep_BL &= cum <= N - rows_total
        n_keep = int(keep_BL.sum())
        c_end = c + len(batch)
        new_prog = {"contexts": c_end, "doc": after.doc, "offset": after.offset, "rows": rows_total + n_keep}
        mine = (c // B) % world == rank if c % B == 0 else rank == 0
        if mine and any(prog[h]["contexts"] < c_end for h in hooks):
            acts = run_to_hooks(model, tokens_BL.to(device), hooks, stop)
            t_store = time.perf_counter()
            b_idx, p_idx = keep_BL.nonzero(as_tuple=True)
            pos_N2 = torch.stack([b_idx + c, p_idx], 1)
            tok_N = tokens_BL[b_idx, p_idx]
            # Row indices rather than a boolean mask: a mask on the device would make the
            # host wait for the forward to finish just to learn how many rows it selects.
            flat_dev = (b_idx * L + p_idx).to(device, non_blocking=True)
            rows = {
                h: acts[h].reshape(-1, acts[h].shape[-1]).index_select(0, flat_dev)
                for h in hooks if prog[h]["contexts"] < c_end
            }
            seqs = (tokens_BL, torch.arange(c, c_end))
            sink.put(Job(rows, tok_N, pos_N2, new_prog, seqs, (c, c_end)))
            own_rows += n_keep
            store_s += time.perf_counter() - t_store
        c, rows_total = c_end, rows_total + n_keep
        if bar is not None:
            bar.update(n_keep if world == 1 else 0)
            if world > 1:
                bar.set_postfix_str(f"rank0 {own_rows:,} tok")
    sink.close()  # every queued batch is written; re-raises a writer-thread error
    getattr(batches, "close", lambda: None)()
    if bar is not None:
        bar.close()
    if not produced_any:
        raise DataError(
            f"dataset {cfg.dataset!r} gave no complete context of {L} tokens; it is empty or "
            "too short: give more text or a smaller --context-length"
        )
    if rows_total < N:
        say(f"harvest: the dataset ran out after {rows_total:,} of {N:,} tokens; the stores hold what there was")
    t_close = time.perf_counter()
    for h, w in writers.items():
        final = dict(w.progress or prog[h])
        final["exhausted"] = rows_total < N
        w.progress = final
        w.close(complete=True)
    dt = time.perf_counter() - t0
    LAST_RUN.update(seconds=dt, rows=rows_total, hooks=len(hooks), close_seconds=time.perf_counter() - t_close,
                    store_seconds=store_s + time.perf_counter() - t_close, write_seconds=sink.seconds)
    say(f"harvest: wrote {rows_total:,} tokens per hook for {len(hooks)} hook(s) in {dt:.1f}s")


def _batches_ahead(contexts: Iterable, n: int, depth: int = 4) -> Iterator[list]:
    """Batches of ``n`` contexts, tokenized on a background thread (tokenizers release the
    GIL), so the model never waits on text; order is unchanged."""

    def batches() -> Iterator[list]:
        it = iter(contexts)
        while batch := _take(it, n):
            yield batch

    return iter_in_background(batches(), depth, name="harvest-text")


def _take(it: Iterable, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


# Timing of the last harvest loop in this process (model loading excluded), for benchmarks.
LAST_RUN: dict[str, float] = {}
