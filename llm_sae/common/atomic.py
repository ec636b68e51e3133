"""Atomic file writes and checksums: the one helper every stage writes through.

A file is written under a temporary name, fsynced and renamed into place, so a kill at
any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from llm_sae.common.faults import maybe_kill


def hasher():
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128
    except ImportError:  # pragma: no cover - xxhash comes with `datasets`
        return "sha256", hashlib.sha256


CHECKSUM_ALGO, HASH = hasher()


def file_checksum(path: str | Path, algo: str = CHECKSUM_ALGO) -> str:
    """Checksum of a file, read in 16 MiB blocks so memory stays flat."""
    h = HASH() if algo == CHECKSUM_ALGO else hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys) and atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def swap_in_folder(tmp: Path, out: Path, old: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` with two renames: ``out`` aside
    to ``old``, ``tmp`` to ``out``; then ``old`` goes. A kill at any moment leaves ``out``
    whole (the old or the new one) or, between the renames, the old one at ``old``, which
    the caller knows to look for."""
    fsync_dir(tmp)
    maybe_kill("before_swap")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        maybe_kill("mid_swap")
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
