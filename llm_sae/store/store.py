"""An opened store: its manifest, its shards as memory maps, and its checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.common.dtypes import dtype_name, dtypes_of, quant_block
from llm_sae.errors import StoreError
from llm_sae.store.format import DEFAULT_MEMORY_BUDGET, FORMAT, MANIFEST
from llm_sae.store.quant import dequantise, n_blocks, scale_bytes
from llm_sae.store.reader import StoreReader


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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{mpath} is not an llm_sae activation store manifest; point at a store "
                         "written by `llm-sae harvest`")
    missing = [k for k in ("shards", "d_in", "dtype", "n_rows", "stats") if k not in manifest]
    try:
        bad_dtype = "dtype" in manifest and not dtype_name(manifest["dtype"])
    except (StoreError, TypeError):
        bad_dtype = True
    if missing or bad_dtype or not isinstance(manifest["shards"], list):
        raise StoreError(f"{mpath} is damaged (missing or bad {', '.join(missing) or 'dtype/shards'}); "
                         "harvest the store again")
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
        self._np_dtype, self._torch_dtype = dtypes_of(manifest["dtype"])
        # int8 stores: rows are dequantised with their scales as they are read.
        self.quant_block = quant_block(manifest["dtype"])
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
        """The dtype ``acts`` returns (float32 for an int8 store)."""
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
    def fingerprint(self) -> str:
        """A short hash of the shard list (names, shapes, checksums): the same data gives
        the same fingerprint wherever its folder is."""
        blob = json.dumps(self.shards, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def mean_norm(self) -> float:
        return float(self.manifest["stats"]["mean_norm"])

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.manifest["stats"]["mean"], dtype=torch.float32)

    @property
    def row_bytes(self) -> int:
        """Bytes per row on disk (activations, and an int8 store's scales)."""
        return self.d_in * self._np_dtype.itemsize + scale_bytes(self.d_in, self.quant_block)

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

    def check_files(self) -> None:
        """Every shard file is there with the shape and byte size its manifest entry says.

        Reads only the .npy headers, so it costs milliseconds whatever the store's size,
        and a shard cut short or rewritten at another width is refused before any work
        starts instead of surfacing as a wrong count (or a broadcast error) mid-pass.
        """
        widths = {"acts": self.d_in, "rows": 3}
        for sh in self.shards:
            for kind, f in sh["files"].items():
                fp = self.path / f["file"]
                want = [sh["rows"], widths[kind]] if kind in widths else list(f.get("shape", []))
                try:
                    with open(fp, "rb") as fh:
                        version = np.lib.format.read_magic(fh)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dt = read(fh)
                        offset = fh.tell()
                    size = fp.stat().st_size
                except (OSError, ValueError) as e:
                    raise StoreError(f"cannot read shard file {f['file']} of {self.path} ({e}); "
                                     f"run `llm-sae store verify {self.path}`, then harvest again") from None
                need = offset + int(np.prod(shape)) * dt.itemsize
                if list(shape) != want or size < need:
                    got = f"shape {list(shape)}" if list(shape) != want else f"{size} bytes, not {need}"
                    raise StoreError(
                        f"shard file {f['file']} of {self.path} does not match its manifest ({got}; "
                        f"the manifest says shape {want}); run `llm-sae store verify {self.path}`, "
                        "then harvest again"
                    )

    def _gather(self, start: int, stop: int, kind: str) -> np.ndarray:
        start, stop = max(0, int(start)), min(self.n_rows, int(stop))
        if stop <= start:
            width = {"acts": self.d_in, "rows": 3}.get(kind) or n_blocks(self.d_in, self.quant_block or 0)
            dt = {"acts": self._np_dtype, "rows": np.int32}.get(kind, np.float32)
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

    def _to_torch(self, arr: np.ndarray, scales: np.ndarray | None = None) -> torch.Tensor:
        """On-disk rows as a tensor of ``self.dtype``; an int8 store's need their scales."""
        if self.quant_block is not None:
            assert scales is not None, "an int8 store's rows are read with their scales"
            return dequantise(arr, scales)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.view(torch.bfloat16) if self._torch_dtype == torch.bfloat16 else t

    def acts(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a [n, d_in] tensor in the store's dtype."""
        scales = self._gather(start, stop, "scales") if self.quant_block is not None else None
        return self._to_torch(self._gather(start, stop, "acts"), scales)

    def acts_at(self, rows: np.ndarray) -> torch.Tensor:
        """Rows at any indices (any order) as [len(rows), d_in]: how a paired source reads
        the partner store's rows of a batch the first store's reader chose."""
        return self._to_torch(*self.gather_rows(np.asarray(rows, dtype=np.int64)))

    def gather_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """On-disk activations (and an int8 store's scales) of rows ``rows``, any order,
        read shard by shard, each shard's rows in file order."""
        out = np.empty((len(rows), self.d_in), self._np_dtype)
        scales = None
        if self.quant_block is not None:
            scales = np.empty((len(rows), n_blocks(self.d_in, self.quant_block)), np.float32)
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        for s in np.unique(shard):
            at = np.nonzero(shard == s)[0]
            local = rows[at] - self._offsets[s]
            order = np.argsort(local, kind="stable")  # walk the file forwards
            out[at[order]] = np.take(self._mmap(int(s), "acts"), local[order], axis=0)
            if scales is not None:
                scales[at[order]] = np.take(self._mmap(int(s), "scales"), local[order], axis=0)
        return out, scales

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
