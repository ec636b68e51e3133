"""Writing a store: shards appended atomically, a manifest that names exactly what is done."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.common.atomic import CHECKSUM_ALGO, fsync_dir, write_json_atomic
from llm_sae.common.dtypes import dtype_name, dtypes_of
from llm_sae.common.faults import maybe_kill
from llm_sae.errors import StoreError
from llm_sae.store.format import (
    DEFAULT_SHARD_BYTES,
    FORMAT,
    MANIFEST,
    VERSION,
    as_numpy,
    atomic_save_npy,
    settings_diff,
)
from llm_sae.store.norms import OutlierLog, RowStats, check_multiple, norm_limit, row_norms
from llm_sae.store.quant import check_block, n_blocks, quantise, scale_bytes


class NonFiniteError(StoreError):
    """Rows with NaN/Inf were refused; the store is intact."""


class StoreWriter:
    """Append activation rows to a store; shards are cut and written in the background.

    ``meta`` must hold ``d_in`` and ``dtype``; anything else (model, hook,
    context_length, tokenizer, dataset, harvest, ...) is copied into the manifest.

    ``mode``: ``"new"`` refuses a directory that already holds a manifest, ``"overwrite"``
    starts over, ``"resume"`` continues the store found there (its ``meta`` must agree,
    else StoreError names the differences) after deleting files its manifest does not
    list. A shard is cut at the first ``append`` boundary at which at least
    ``shard_rows`` rows are buffered, so appending in fixed units (whole batches of
    contexts) gives shard boundaries that a resumed run reproduces exactly.

    ``max_norm_multiple`` M leaves out rows whose norm exceeds M × the running median
    (see :mod:`llm_sae.store.norms`); ``append(outliers_N=...)`` decides for the caller
    instead (a harvest of several hooks drops a row from all its stores at once).

    ``prefix``/``manifest_name`` let the ranks of a distributed harvest write side by
    side into one directory.
    """

    def __init__(
        self,
        path: str | Path,
        meta: dict[str, Any],
        *,
        mode: str = "new",
        shard_rows: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        prefix: str = "shard",
        manifest_name: str = MANIFEST,
        background: bool = True,
        max_norm_multiple: float | None = None,
    ) -> None:
        if "d_in" not in meta or "dtype" not in meta:
            raise StoreError("StoreWriter meta must include 'd_in' and 'dtype'")
        self.path = Path(path)
        self.meta = dict(meta)
        self.meta["dtype"] = dtype_name(meta["dtype"])
        self.meta["d_in"] = int(meta["d_in"])
        self.d_in = self.meta["d_in"]
        self.np_dtype, self.torch_dtype = dtypes_of(self.meta["dtype"])
        self.block = check_block(self.meta["dtype"], self.d_in)
        self.max_norm_multiple = check_multiple(max_norm_multiple)
        row_bytes = self.d_in * self.np_dtype.itemsize + scale_bytes(self.d_in, self.block)
        self.shard_rows = int(shard_rows or max(1, shard_bytes // row_bytes))
        self.prefix = prefix
        self.manifest_path = self.path / manifest_name
        self.path.mkdir(parents=True, exist_ok=True)

        self.shards: list[dict[str, Any]] = []
        self.progress: dict[str, Any] = {}
        self.n_rows = 0
        self.n_sequences = 0
        self._next_seq_id = 0
        self.stats = RowStats(self.d_in)
        self.outliers = OutlierLog(max_norm_multiple)
        self.completed = False
        if self.manifest_path.exists():
            if mode == "new":
                raise StoreError(
                    f"{self.path} already holds a store; choose another output directory, "
                    "delete it, or resume it"
                )
            if mode == "resume":
                self._load_existing()
            elif mode == "overwrite":
                self.manifest_path.unlink()
            else:
                raise StoreError(f"unknown StoreWriter mode {mode!r}; use new, overwrite or resume")
        self._remove_unlisted()

        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._buf_rows = 0
        self._seq_buf: list[np.ndarray] = []
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store-writer") if background else None
        self._pending: list[Future] = []

    # -- resume ---------------------------------------------------------------------
    def _load_existing(self) -> None:
        m = json.loads(self.manifest_path.read_text())
        diffs = settings_diff(m, self.meta)
        if diffs:
            raise StoreError(
                f"{self.path} holds a store made with other settings ({'; '.join(diffs)}); "
                "rerun with the original settings, or write to another directory"
            )
        self.shards = list(m["shards"])
        self.progress = dict(m.get("progress", {}))
        self.n_rows = int(m["n_rows"])
        self.n_sequences = int(m.get("n_sequences", 0))
        self._next_seq_id = int(m.get("next_sequence_id", self.n_sequences))
        st = m["stats"]
        self.stats = RowStats.from_json(self.d_in, st)
        self.outliers = OutlierLog.from_json(m.get("outliers"), self.max_norm_multiple)
        self.completed = bool(m.get("complete"))

    def _remove_unlisted(self) -> None:
        """Delete our own shard files (and temp files) that the manifest does not list."""
        listed = {f["file"] for s in self.shards for f in s["files"].values()}
        for p in self.path.iterdir():
            name = p.name
            ours = name.startswith(self.prefix + "-") and (".npy" in name)
            ours = ours and name[len(self.prefix) + 1 : len(self.prefix) + 6].isdigit()
            if (ours and name not in listed) or name == self.manifest_path.name + ".tmp":
                p.unlink()

    # -- appending ------------------------------------------------------------------
    def append(
        self,
        acts_ND: torch.Tensor | np.ndarray,
        token_ids_N: torch.Tensor | np.ndarray | None = None,
        positions_N2: torch.Tensor | np.ndarray | None = None,
        *,
        progress: dict[str, Any] | None = None,
        sequences: tuple[Any, Any] | None = None,
        outliers_N: np.ndarray | None = None,
    ) -> None:
        """Add rows. Missing token ids / positions are stored as -1.

        ``outliers_N`` (bool [n]) marks rows to leave out, counted in the manifest with
        their token ids; by default the writer's own ``max_norm_multiple`` decides.

        ``progress`` (JSON-able) says how far into the input these rows go; it is saved
        with the shard that completes them, so a resumed run knows where to restart.
        ``sequences=(tokens_SL, seq_ids_S)`` records the contexts of these rows in the same
        shard (all or nothing with the rows).
        """
        self._check_open()
        given = torch.as_tensor(acts_ND)
        if given.ndim != 2 or given.shape[1] != self.d_in:
            raise StoreError(f"append expects acts of shape [rows, {self.d_in}], got {tuple(given.shape)}")
        x = given.detach().to("cpu", self.torch_dtype)
        if x.data_ptr() == given.data_ptr() and x.numel():
            x = x.clone()  # buffered until the shard is written: the caller may reuse its memory
        n = x.shape[0]
        # numpy for the checks and stats: single-threaded and several times faster than
        # torch's small CPU reductions, and it keeps torch's threads for the model.
        xf = (x if x.dtype == torch.float32 else x.float()).numpy()
        finite = np.isfinite(xf)
        if not finite.all():
            bad = int((~finite.all(axis=1)).sum())
            raise NonFiniteError(
                f"{bad} of {n} rows hold NaN/Inf (after conversion to {self.meta['dtype']}); "
                f"nothing was written for them; the {len(self.shards)} shards already in "
                f"{self.path} are intact. If the values overflowed float16, store as "
                "bfloat16 or float32"
            )
        if sequences is not None:
            self.add_sequences(*sequences)
        rows = np.full((n, 3), -1, np.int32)
        if token_ids_N is not None:
            rows[:, 0] = as_numpy(token_ids_N).reshape(n)
        if positions_N2 is not None:
            rows[:, 1:] = as_numpy(positions_N2).reshape(n, 2)
        norms_N = row_norms(xf)
        if outliers_N is None and self.max_norm_multiple:
            outliers_N = norms_N > norm_limit(self.stats.hist, norms_N, self.max_norm_multiple)
        self.stats.hist.add(norms_N)  # every row seen, the ones left out included
        if outliers_N is not None and outliers_N.any():
            keep = ~np.asarray(outliers_N, bool)
            self.outliers.record(rows[~keep, 0])
            x, xf, rows, norms_N = x[torch.from_numpy(keep)], xf[keep], rows[keep], norms_N[keep]
            n = len(rows)
        self.stats.add(xf, norms_N)
        # Buffer numpy views (bfloat16 as its raw uint16 bits): the writer thread streams
        # them straight to disk without concatenating. int8 rows carry their scales.
        if self.block is not None:
            q, scales = quantise(xf, self.block)
            self._buf.append((q, rows, scales))
        else:
            self._buf.append((x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy(), rows, None))
        self._buf_rows += n
        self.n_rows += n
        if progress is not None:
            self.progress = dict(progress)
        if self._buf_rows >= self.shard_rows:
            self.flush()

    def add_sequences(
        self, tokens_SL: torch.Tensor | np.ndarray, seq_ids_S: torch.Tensor | np.ndarray | None = None
    ) -> None:
        """Record whole contexts; ids default to consecutive numbers after the last ones."""
        self._check_open()
        t = as_numpy(tokens_SL).astype(np.int32)
        if t.ndim != 2:
            raise StoreError(f"add_sequences expects [sequences, length], got {t.shape}")
        if seq_ids_S is None:
            ids = np.arange(self._next_seq_id, self._next_seq_id + len(t), dtype=np.int64)
        else:
            ids = as_numpy(seq_ids_S).astype(np.int64).reshape(len(t))
        if len(ids):
            self._next_seq_id = max(self._next_seq_id, int(ids.max()) + 1)
        self._seq_buf.append(np.concatenate([ids[:, None].astype(np.int32), t], axis=1))
        self.n_sequences += len(t)

    def flush(self) -> None:
        """Cut a shard from everything buffered and write it (in the background)."""
        self._check_open()
        if not self._buf and not self._seq_buf:
            return
        self._raise_pending_errors()
        acts = [b[0] for b in self._buf] or [np.empty((0, self.d_in), self.np_dtype)]
        rows = [b[1] for b in self._buf] or [np.empty((0, 3), np.int32)]
        scales = None
        if self.block is not None:
            nb = n_blocks(self.d_in, self.block)
            scales = [b[2] for b in self._buf] or [np.empty((0, nb), np.float32)]
        seqs = self._seq_buf or None
        self._buf, self._buf_rows, self._seq_buf = [], 0, []
        name = f"{self.prefix}-{len(self.shards):05d}"
        entry: dict[str, Any] = {"name": name, "rows": int(sum(len(r) for r in rows)), "files": {}}
        self.shards.append(entry)
        manifest = self._manifest(complete=False)
        job = (name, entry, acts, rows, seqs, scales, manifest)
        if self._pool is None:
            self._write_shard(*job)
        else:
            # At most two shards in flight: bounded memory, and the writer still overlaps
            # the model's next batches.
            while len(self._pending) >= 2:
                self._pending.pop(0).result()
            self._pending.append(self._pool.submit(self._write_shard, *job))

    def _write_shard(self, name, entry, acts, rows, seqs, scales, manifest) -> None:
        files = {"acts": acts, "rows": rows}
        if scales is not None:
            files["scales"] = scales
        if seqs is not None:
            files["seqs"] = seqs
        for kind, pieces in files.items():
            fname = f"{name}.{kind}.npy"
            digest, shape = atomic_save_npy(self.path / fname, pieces)
            entry["files"][kind] = {"file": fname, CHECKSUM_ALGO: digest, "shape": list(shape)}
        if seqs is not None:
            entry["sequences"] = int(sum(len(q) for q in seqs))
        fsync_dir(self.path)
        maybe_kill("before_manifest")
        write_json_atomic(self.manifest_path, manifest)
        maybe_kill("after_manifest")

    def _manifest(self, complete: bool) -> dict[str, Any]:
        # A snapshot taken on the appending thread: the shard list is copied (later shards
        # must not appear early), while the newest entry's dict is shared so that the
        # writer thread fills in its files and checksums before serialising.
        shards = list(self.shards)
        extra: dict[str, Any] = {}
        if self.block is not None:
            extra["quantisation"] = {"scheme": "absmax", "bits": 8, "block": self.block}
        if self.max_norm_multiple or self.outliers.count:
            extra["outliers"] = self.outliers.to_json()
        return {
            **self.meta,
            "format": FORMAT,
            "version": VERSION,
            "complete": complete,
            "checksum_algo": CHECKSUM_ALGO,
            "n_rows": sum(s["rows"] for s in shards),
            "n_sequences": self.n_sequences,
            "next_sequence_id": self._next_seq_id,
            "progress": dict(self.progress),
            "shards": shards,
            "stats": self.stats.to_json(),
            **extra,
        }

    def close(self, complete: bool = True) -> None:
        """Write what is buffered, wait for the writer, and mark the store complete."""
        if self._closed:
            return
        self.flush()
        self._wait()
        write_json_atomic(self.manifest_path, self._manifest(complete=complete))
        self._closed = True

    def abort(self) -> None:
        """Stop without writing buffered rows; shards already committed stay valid."""
        self._buf, self._seq_buf = [], []
        try:
            self._wait()
        finally:
            self._closed = True

    def _wait(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _raise_pending_errors(self) -> None:
        for f in [f for f in self._pending if f.done()]:
            f.result()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("StoreWriter is closed")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
