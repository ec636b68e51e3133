"""The activation store: what harvest writes and train/analyze read.

A store is a directory of memory-mappable shards plus one JSON manifest::

    STORE/
      manifest.json              what is in the store; written last, atomically
      shard-00000.acts.npy       [rows, d_in] activations (float32 | float16 | bfloat16*)
      shard-00000.rows.npy       [rows, 3] int32: token id, sequence index, position
      shard-00000.seqs.npy       [S, 1 + context_length] int32: sequence index, then its
                                 tokens (optional; the contexts the rows came from)
      shard-00001.acts.npy ...

    * numpy has no bfloat16, so bfloat16 shards hold the raw 16-bit patterns as uint16
      and are viewed as torch.bfloat16 on read.

Why ``.npy``: one fixed, tiny header and then the raw array, so ``np.load(mmap_mode="r")``
maps a shard with zero copies and any language can read it; a shard is written once and
never appended to, so nothing more elaborate (safetensors, zarr) buys anything here.

Row ``i`` of the store is row ``i - offset(shard)`` of the shard that holds it, shards in
manifest order. Every row carries the token it was computed at and its
``(sequence, position)``, so analysis can show the context around any activation.

``manifest.json`` holds: ``format``/``version``; ``complete`` (false while a harvest is
still running or was killed); ``d_in``, ``dtype``, ``model``, ``hook``,
``context_length``, ``tokenizer``, ``dataset`` (the dataset spec) and ``harvest`` (the
settings that made the store); ``progress`` (how far into the dataset the rows go: for a
harvest, ``contexts`` consumed, the ``doc``/``offset`` where the next context starts, and
``rows``); ``n_rows``; ``shards``, each with its row count and one checksum per
file (``checksum_algo``: xxh3_128 where the ``xxhash`` package is installed, else
sha256); and ``stats``: the running ``mean_norm`` E‖x‖ and ``mean`` E[x] (plus the exact
float64 sums they come from, so a resumed harvest continues them bit for bit).

Crash safety: each shard file is written under a temporary name, fsynced and renamed;
only then is the manifest rewritten (temp + fsync + rename). A store killed at any
moment therefore shows exactly the shards its manifest lists; files beyond it are
leftovers that a resumed writer deletes. Use ``llm-sae store verify DIR`` to check the
checksums, row counts and finiteness of every shard.

A distributed harvest writes ``shard-r{RANK}-NNNNN.*`` and ``manifest.rank{RANK}.json``
per rank; rank 0 merges them into ``manifest.json`` at the end.

Reading: ``open_store(path)`` gives row ranges (``acts``, ``token_ids``, ``positions``),
whole contexts (``sequence_tokens``) and ``reader(...)``, shuffled batches under a memory
budget with background prefetch (see :class:`StoreReader`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.errors import StoreError

FORMAT = "llm_sae.store"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 256 * 2**20
DEFAULT_MEMORY_BUDGET = 2**30

# On-disk numpy dtype and torch dtype for each store dtype name.
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise ``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` etc. to a store dtype name."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                "float": "float32"}.get(str(dtype), str(dtype))
    if name not in _DTYPES:
        raise StoreError(f"unsupported store dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[dtype_name(name)][1]


# ---------------------------------------------------------------------------------------
# Files: atomic writes and checksums


def _hasher():
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128
    except ImportError:  # pragma: no cover - xxhash comes with `datasets`
        return "sha256", hashlib.sha256


CHECKSUM_ALGO, _HASH = _hasher()


def file_checksum(path: str | Path, algo: str = CHECKSUM_ALGO) -> str:
    """Checksum of a file, read in 16 MiB blocks so memory stays flat."""
    h = _HASH() if algo == CHECKSUM_ALGO else hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse O_RDONLY on dirs
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_save_npy(path: Path, pieces: list[np.ndarray]) -> tuple[str, tuple[int, ...]]:
    """Write the row-wise concatenation of ``pieces`` as one .npy under a temp name, fsync,
    rename; return its checksum and shape.

    Pieces are written one after another (no concatenated copy), and the checksum is
    computed from the bytes as they are written, so the file is never read back.
    """
    tmp = path.with_name(path.name + ".tmp")
    h = _HASH()
    pieces = [np.ascontiguousarray(p) for p in pieces]
    shape = (sum(len(p) for p in pieces), *pieces[0].shape[1:])
    with open(tmp, "wb") as f:
        header = _npy_header(shape, pieces[0].dtype)
        f.write(header)
        h.update(header)
        for arr in pieces:
            if not arr.size:
                continue
            mv = memoryview(arr.reshape(-1).view(np.uint8))
            step = 64 * 2**20
            for i in range(0, len(mv), step):
                f.write(mv[i : i + step])
                h.update(mv[i : i + step])
            _maybe_kill("mid_file")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return h.hexdigest(), shape


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys) and atomically."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _maybe_kill(point: str) -> None:
    """Test hook: SIGKILL this process at a named point of the write path.

    ``LLM_SAE_TEST_KILL=POINT:N`` kills at the N-th time (1-based) ``POINT`` is reached,
    POINT in {mid_file, before_manifest, after_manifest}. Used by the crash tests only.
    """
    spec = os.environ.get("LLM_SAE_TEST_KILL")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != point:
        return
    _KILL_COUNTS[point] = _KILL_COUNTS.get(point, 0) + 1
    if _KILL_COUNTS[point] >= int(n or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_KILL_COUNTS: dict[str, int] = {}


# ---------------------------------------------------------------------------------------
# Writing


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
    ) -> None:
        if "d_in" not in meta or "dtype" not in meta:
            raise StoreError("StoreWriter meta must include 'd_in' and 'dtype'")
        self.path = Path(path)
        self.meta = dict(meta)
        self.meta["dtype"] = dtype_name(meta["dtype"])
        self.meta["d_in"] = int(meta["d_in"])
        self.d_in = self.meta["d_in"]
        self.np_dtype, self.torch_dtype = _DTYPES[self.meta["dtype"]]
        row_bytes = self.d_in * self.np_dtype.itemsize
        self.shard_rows = int(shard_rows or max(1, shard_bytes // row_bytes))
        self.prefix = prefix
        self.manifest_path = self.path / manifest_name
        self.path.mkdir(parents=True, exist_ok=True)

        self.shards: list[dict[str, Any]] = []
        self.progress: dict[str, Any] = {}
        self.n_rows = 0
        self.n_sequences = 0
        self._next_seq_id = 0
        self._sum_norm = 0.0
        self._sum_x = np.zeros(self.d_in, np.float64)
        self._count = 0
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

        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
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
        self._count = int(st["count"])
        self._sum_norm = float(st["sum_norm"])
        self._sum_x = np.asarray(st["sum"], np.float64)
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
    ) -> None:
        """Add rows. Missing token ids / positions are stored as -1.

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
            rows[:, 0] = _np(token_ids_N).reshape(n)
        if positions_N2 is not None:
            rows[:, 1:] = _np(positions_N2).reshape(n, 2)
        # Stats in float64 summed in a fixed order, so a resumed run reproduces them.
        self._sum_norm += float(np.sqrt(np.einsum("nd,nd->n", xf, xf)).sum(dtype=np.float64))
        self._sum_x += xf.sum(0, dtype=np.float64)
        self._count += n
        # Buffer numpy views (bfloat16 as its raw uint16 bits): the writer thread streams
        # them straight to disk without concatenating.
        self._buf.append((x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy(), rows))
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
        t = _np(tokens_SL).astype(np.int32)
        if t.ndim != 2:
            raise StoreError(f"add_sequences expects [sequences, length], got {t.shape}")
        if seq_ids_S is None:
            ids = np.arange(self._next_seq_id, self._next_seq_id + len(t), dtype=np.int64)
        else:
            ids = _np(seq_ids_S).astype(np.int64).reshape(len(t))
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
        seqs = self._seq_buf or None
        self._buf, self._buf_rows, self._seq_buf = [], 0, []
        name = f"{self.prefix}-{len(self.shards):05d}"
        entry: dict[str, Any] = {"name": name, "rows": int(sum(len(r) for r in rows)), "files": {}}
        self.shards.append(entry)
        manifest = self._manifest(complete=False)
        job = (name, entry, acts, rows, seqs, manifest)
        if self._pool is None:
            self._write_shard(*job)
        else:
            # At most two shards in flight: bounded memory, and the writer still overlaps
            # the model's next batches.
            while len(self._pending) >= 2:
                self._pending.pop(0).result()
            self._pending.append(self._pool.submit(self._write_shard, *job))

    def _write_shard(self, name, entry, acts, rows, seqs, manifest) -> None:
        files = {"acts": acts, "rows": rows}
        if seqs is not None:
            files["seqs"] = seqs
        for kind, pieces in files.items():
            fname = f"{name}.{kind}.npy"
            digest, shape = _atomic_save_npy(self.path / fname, pieces)
            entry["files"][kind] = {"file": fname, CHECKSUM_ALGO: digest, "shape": list(shape)}
        if seqs is not None:
            entry["sequences"] = int(sum(len(q) for q in seqs))
        _fsync_dir(self.path)
        _maybe_kill("before_manifest")
        write_json_atomic(self.manifest_path, manifest)
        _maybe_kill("after_manifest")

    def _manifest(self, complete: bool) -> dict[str, Any]:
        # A snapshot taken on the appending thread: the shard list is copied (later shards
        # must not appear early), while the newest entry's dict is shared so that the
        # writer thread fills in its files and checksums before serialising.
        count = max(self._count, 1)
        shards = list(self.shards)
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
            "stats": {
                "count": self._count,
                "sum_norm": self._sum_norm,
                "sum": self._sum_x.tolist(),
                "mean_norm": self._sum_norm / count,
                "mean": (self._sum_x / count).tolist(),
            },
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


# The manifest fields that must agree for a store to be resumed or extended.
IDENTITY_KEYS = ("d_in", "dtype", "model", "hook", "context_length", "tokenizer", "dataset", "harvest")


def settings_diff(manifest: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Human-readable differences between a store's settings and the requested ones."""
    out = []
    for k in IDENTITY_KEYS:
        if k not in meta:
            continue
        a, b = manifest.get(k), meta.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            for kk in sorted(set(a) | set(b)):
                if a.get(kk) != b.get(kk):
                    out.append(f"{k}.{kk}: store has {a.get(kk)!r}, requested {b.get(kk)!r}")
        elif a != b:
            out.append(f"{k}: store has {a!r}, requested {b!r}")
    return out


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------
# Reading


def open_store(path: str | Path, *, allow_incomplete: bool = False) -> Store:
    """Open a store for reading. StoreError if it is missing or (by default) incomplete."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        hint = ""
        if path.is_dir():
            subs = sorted(p.parent.name for p in path.glob(f"*/{MANIFEST}"))
            if subs:
                hint = f"; it holds stores in subdirectories: {', '.join(subs)}"
        raise StoreError(f"no activation store at {path} (no {MANIFEST}){hint}; run `llm-sae harvest` first")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{mpath} is not valid JSON ({e}); the store is damaged, harvest it again") from None
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{mpath} is not an llm_sae activation store manifest")
    if not manifest.get("complete") and not allow_incomplete:
        raise StoreError(
            f"the store at {path} is incomplete (its harvest stopped early): rerun the same "
            "`llm-sae harvest` command to finish it, or open it with allow_incomplete=True"
        )
    return Store(path, manifest)


class Store:
    """Read access to a store; arrays are memory-mapped, nothing is loaded up front."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.shards = manifest["shards"]
        self._offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self._np_dtype, self._torch_dtype = _DTYPES[manifest["dtype"]]
        self._mmaps: dict[tuple[int, str], np.ndarray] = {}
        self._seq_index: dict[int, tuple[int, int]] | None = None

    # -- properties -------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def n_rows(self) -> int:
        return int(self._offsets[-1])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def dtype(self) -> torch.dtype:
        return self._torch_dtype

    @property
    def hook(self) -> str | None:
        return self.manifest.get("hook")

    @property
    def model(self) -> str | None:
        return self.manifest.get("model")

    @property
    def context_length(self) -> int | None:
        c = self.manifest.get("context_length")
        return None if c is None else int(c)

    @property
    def mean_norm(self) -> float:
        return float(self.manifest["stats"]["mean_norm"])

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.manifest["stats"]["mean"], dtype=torch.float32)

    @property
    def row_bytes(self) -> int:
        return self.d_in * self._np_dtype.itemsize

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, rows={self.n_rows}, d_in={self.d_in}, "
                f"dtype={self.manifest['dtype']}, hook={self.hook!r})")

    # -- raw access -------------------------------------------------------------------
    def _mmap(self, shard: int, kind: str) -> np.ndarray:
        key = (shard, kind)
        if key not in self._mmaps:
            f = self.shards[shard]["files"][kind]["file"]
            if len(self._mmaps) >= 256:
                # Bounded: a big store has thousands of shards and a process only gets
                # ~65k memory maps (vm.max_map_count). Arrays handed out stay valid.
                self._mmaps.pop(next(iter(self._mmaps)))
            try:
                self._mmaps[key] = np.load(self.path / f, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise StoreError(
                    f"cannot read shard file {f} of {self.path} ({e}); run `llm-sae store verify {self.path}`"
                ) from None
        return self._mmaps[key]

    def _gather(self, start: int, stop: int, kind: str) -> np.ndarray:
        start, stop = max(0, int(start)), min(self.n_rows, int(stop))
        if stop <= start:
            width = self.d_in if kind == "acts" else 3
            dt = self._np_dtype if kind == "acts" else np.int32
            return np.empty((0, width), dt)
        first = int(np.searchsorted(self._offsets, start, side="right") - 1)
        parts = []
        s = first
        while start < stop:
            lo = start - self._offsets[s]
            hi = min(stop, self._offsets[s + 1]) - self._offsets[s]
            if hi > lo:
                parts.append(np.array(self._mmap(s, kind)[lo:hi]))
            start = int(self._offsets[s] + hi)
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.view(torch.bfloat16) if self._torch_dtype == torch.bfloat16 else t

    def acts(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a [n, d_in] tensor in the store's dtype."""
        return self._to_torch(self._gather(start, stop, "acts"))

    def token_ids(self, start: int, stop: int) -> torch.Tensor:
        """The token id each row of ``[start, stop)`` was computed at (LongTensor [n])."""
        return torch.from_numpy(self._gather(start, stop, "rows")[:, 0].astype(np.int64))

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """``(sequence index, position)`` of each row of ``[start, stop)`` (LongTensor [n, 2])."""
        return torch.from_numpy(self._gather(start, stop, "rows")[:, 1:].astype(np.int64))

    def sequence_tokens(self, seq_idx: Any) -> torch.Tensor:
        """Whole contexts by sequence index: LongTensor [len(seq_idx), context_length]."""
        if self._seq_index is None:
            index: dict[int, tuple[int, int]] = {}
            for s, sh in enumerate(self.shards):
                if "seqs" in sh["files"]:
                    ids = np.asarray(self._mmap(s, "seqs")[:, 0])
                    for j, i in enumerate(ids.tolist()):
                        index[i] = (s, j)
            self._seq_index = index
        idx = [int(i) for i in torch.as_tensor(seq_idx).reshape(-1).tolist()]
        missing = [i for i in idx if i not in self._seq_index]
        if missing:
            raise StoreError(
                f"sequence(s) {missing[:5]} are not in the store at {self.path} "
                f"({len(self._seq_index)} sequences recorded)"
            )
        out = [np.asarray(self._mmap(*self._seq_index[i][:1], "seqs")[self._seq_index[i][1], 1:]) for i in idx]
        L = self.context_length or (len(out[0]) if out else 0)
        if not out:
            return torch.empty(0, L, dtype=torch.long)
        return torch.from_numpy(np.stack(out).astype(np.int64))

    # -- shuffled batches -------------------------------------------------------------
    def reader(
        self,
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
    ) -> StoreReader:
        """Batches of rows, shuffled across and within shards; see :class:`StoreReader`."""
        return StoreReader(
            self, batch_size, seed=seed, dtype=dtype, rank=rank, world_size=world_size,
            start_batch=start_batch, with_rows=with_rows, loop=loop, shuffle=shuffle,
            memory_budget_bytes=memory_budget_bytes, device=device, prefetch=prefetch,
            batch_slice=batch_slice,
        )


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
    def _load_group(self, chunks: list[tuple[int, int, int]]) -> tuple[torch.Tensor, np.ndarray]:
        n = sum(c[2] - c[1] for c in chunks)
        buf = np.empty((n, self.store.d_in), self.store._np_dtype)
        rows = np.empty(n, np.int64)
        o = 0
        for s, a, b in chunks:
            buf[o : o + b - a] = self.store._mmap(s, "acts")[a:b]
            rows[o : o + b - a] = np.arange(a, b) + self.store._offsets[s]
            o += b - a
        return buf, rows

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
                xs, rs = [], []
                for gi, a, z in self._batch_pieces(sizes, b):
                    x, rows, perm = get(epoch, gi)
                    # Sorted, so the gather walks memory forwards (the batch's membership is
                    # what is random; order within it does not matter), and np.take rather
                    # than index_select: several times faster for row gathers on CPU.
                    pick = np.sort(perm[a:z])
                    xs.append(np.take(x, pick, axis=0))
                    rs.append(rows[pick])
                # Drop groups behind us and start loading the next one.
                for key in [k for k in cache if k != (epoch, gi)]:
                    del cache[key]
                nxt = (epoch, gi + 1) if gi + 1 < len(gs) else (epoch + 1, 0)
                if nxt[0] == epoch or self.loop:
                    request(*nxt)
                x_BD = self.store._to_torch(xs[0] if len(xs) == 1 else np.concatenate(xs))
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
            x_BD = self.store._to_torch(self._read_rows(rows_B)).to(self.dtype)
            if self.device is not None:
                x_BD = x_BD.to(self.device, non_blocking=True)
            yield (x_BD, torch.from_numpy(rows_B)) if self.with_rows else x_BD

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Activations of store rows ``rows`` (any order), read shard by shard."""
        out = np.empty((len(rows), self.store.d_in), self.store._np_dtype)
        shard = np.searchsorted(self.store._offsets, rows, side="right") - 1
        for s in np.unique(shard):
            at = np.nonzero(shard == s)[0]
            local = rows[at] - self.store._offsets[s]
            order = np.argsort(local, kind="stable")  # walk the file forwards
            out[at[order]] = np.take(self.store._mmap(int(s), "acts"), local[order], axis=0)
        return out

    def __iter__(self) -> Iterator[Any]:
        gen = self._batches() if self.batch_slice is None else self._sliced_batches()
        return iter_in_background(gen, self.prefetch, name="store-prefetch")


def iter_in_background(items: Iterable[Any], depth: int, *, name: str) -> Iterator[Any]:
    """Iterate ``items`` on a daemon thread, keeping up to ``depth`` items ready.

    Order is unchanged; an exception in the producer is re-raised in the consumer; a
    consumer that stops early (break, close, garbage collection) stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # re-raised on the consuming thread
            put(e)

    threading.Thread(target=produce, daemon=True, name=name).start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------
# Verify / info (the `llm-sae store` command)


def verify_store(path: str | Path, *, scan_values: bool = True) -> list[str]:
    """Check every shard file: present, shape/row count, checksum, and finite values.

    Returns a list of problems, each naming the file; empty when the store is sound.
    """
    path = Path(path)
    store = open_store(path, allow_incomplete=True)
    m = store.manifest
    algo = m.get("checksum_algo", CHECKSUM_ALGO)
    problems = []
    if not m.get("complete"):
        problems.append(f"{MANIFEST}: store is incomplete (harvest not finished)")
    if sum(s["rows"] for s in m["shards"]) != m["n_rows"]:
        problems.append(f"{MANIFEST}: n_rows {m['n_rows']} != sum of shard rows")
    for sh in m["shards"]:
        for kind, f in sh["files"].items():
            fp = path / f["file"]
            if not fp.is_file():
                problems.append(f"{f['file']}: missing")
                continue
            try:
                arr = np.load(fp, mmap_mode="r")
            except Exception as e:  # a truncated file fails here
                problems.append(f"{f['file']}: unreadable ({e})")
                continue
            if list(arr.shape) != list(f["shape"]):
                problems.append(f"{f['file']}: shape {list(arr.shape)} != manifest {f['shape']}")
                continue
            if kind in ("acts", "rows") and arr.shape[0] != sh["rows"]:
                problems.append(f"{f['file']}: {arr.shape[0]} rows != manifest {sh['rows']}")
            digest = file_checksum(fp, algo) if algo in (CHECKSUM_ALGO, "sha256") else None
            if digest is not None and digest != f.get(algo):
                problems.append(f"{f['file']}: checksum mismatch (file altered or damaged)")
                continue
            if kind == "acts" and scan_values:
                step = max(1, 2**26 // max(1, store.row_bytes))
                for a in range(0, arr.shape[0], step):
                    x = store._to_torch(np.array(arr[a : a + step])).float()
                    if not bool(torch.isfinite(x).all()):
                        problems.append(f"{f['file']}: NaN/Inf in rows {a}..{a + len(x)}")
                        break
    return problems


def store_info(path: str | Path) -> str:
    store = open_store(path, allow_incomplete=True)
    m = store.manifest
    size = sum((Path(path) / f["file"]).stat().st_size for s in m["shards"] for f in s["files"].values()
               if (Path(path) / f["file"]).exists())
    lines = [
        f"store        {store.path}",
        f"complete     {m.get('complete')}",
        f"model        {m.get('model')}",
        f"hook         {m.get('hook')}",
        f"d_in         {store.d_in}",
        f"dtype        {m['dtype']}",
        f"rows         {store.n_rows:,}",
        f"sequences    {m.get('n_sequences', 0):,}",
        f"context      {m.get('context_length')}",
        f"tokenizer    {m.get('tokenizer')}",
        f"dataset      {json.dumps(m.get('dataset'))}",
        f"progress     {json.dumps(m.get('progress'))}",
        f"shards       {len(m['shards'])} ({size / 2**20:.1f} MiB)",
        f"mean ‖x‖     {store.mean_norm:.4g}",
        f"‖mean x‖     {float(store.mean.norm()):.4g}",
    ]
    return "\n".join(lines)


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = sub.add_parser("info", help="Print what a store holds (from its manifest).")
    p.add_argument("path", help="store directory")
    p = sub.add_parser("verify", help="Check checksums, row counts and NaN/Inf in every shard.")
    p.add_argument("path", help="store directory")
    p.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan of the values")


def _expand(path: str) -> list[Path]:
    """A harvest with several hooks writes one store per hook; accept the parent too."""
    p = Path(path)
    if not (p / MANIFEST).exists() and p.is_dir():
        subs = sorted(q.parent for q in p.glob(f"*/{MANIFEST}"))
        if subs:
            return subs
    return [p]


def run_cli(args: argparse.Namespace) -> int:
    status = 0
    for p in _expand(args.path):
        if args.store_command == "info":
            print(store_info(p))
        else:
            problems = verify_store(p, scan_values=not args.no_scan)
            if problems:
                print(f"{p}: {len(problems)} problem(s)")
                for pr in problems:
                    print(f"  {pr}")
                status = 1
            else:
                n = open_store(p, allow_incomplete=True)
                print(f"{p}: OK ({n.n_rows:,} rows in {len(n.shards)} shards)")
    return status


# Silence numpy's warning about torch.from_numpy on read-only memmaps: we copy first.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
__all__ = ["open_store", "Store", "StoreReader", "StoreWriter", "verify_store", "store_info",
           "settings_diff", "dtype_name", "torch_dtype"]
