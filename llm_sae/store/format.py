"""The store's on-disk format: manifest constants, dtypes, shard files and identity keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.common.atomic import HASH
from llm_sae.common.faults import maybe_kill

FORMAT = "llm_sae.store"


VERSION = 1


MANIFEST = "manifest.json"


DEFAULT_SHARD_BYTES = 256 * 2**20


DEFAULT_MEMORY_BUDGET = 2**30


def atomic_save_npy(path: Path, pieces: list[np.ndarray]) -> tuple[str, tuple[int, ...]]:
    """Write the row-wise concatenation of ``pieces`` as one .npy under a temp name, fsync,
    rename; return its checksum and shape.

    Pieces are written one after another (no concatenated copy), and the checksum is
    computed from the bytes as they are written, so the file is never read back.
    """
    tmp = path.with_name(path.name + ".tmp")
    h = HASH()
    pieces = [np.ascontiguousarray(p) for p in pieces]
    shape = (sum(len(p) for p in pieces), *pieces[0].shape[1:])
    with open(tmp, "wb") as f:
        header = npy_header(shape, pieces[0].dtype)
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
            maybe_kill("mid_file")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return h.hexdigest(), shape


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


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


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
