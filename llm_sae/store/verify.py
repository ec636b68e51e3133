"""Checking a store (checksums, row counts, values) and describing it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llm_sae.common.atomic import CHECKSUM_ALGO, file_checksum
from llm_sae.store.format import MANIFEST
from llm_sae.store.norms import describe
from llm_sae.store.store import open_store


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
        if store.quant_block is not None and "scales" not in sh["files"]:
            problems.append(f"{MANIFEST}: int8 shard {sh['name']} lists no scales file")
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
            if kind in ("acts", "rows", "scales") and arr.shape[0] != sh["rows"]:
                problems.append(f"{f['file']}: {arr.shape[0]} rows != manifest {sh['rows']}")
            digest = file_checksum(fp, algo) if algo in (CHECKSUM_ALGO, "sha256") else None
            if digest is not None and digest != f.get(algo):
                problems.append(f"{f['file']}: checksum mismatch (file altered or damaged)")
                continue
            # An int8 store's values are finite by construction; its scales may not be.
            if kind == ("acts" if store.quant_block is None else "scales") and scan_values:
                step = max(1, 2**26 // max(1, store.row_bytes))
                for a in range(0, arr.shape[0], step):
                    chunk = np.array(arr[a : a + step])
                    x = store._to_torch(chunk).float() if kind == "acts" else torch.from_numpy(chunk)
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
        f"bytes/row    {store.row_bytes:,} (activations{' + scales' if store.quant_block is not None else ''})",
        f"mean ‖x‖     {store.mean_norm:.4g}",
        f"‖mean x‖     {float(store.mean.norm()):.4g}",
        *describe(m["stats"], m.get("outliers")),
    ]
    return "\n".join(lines)
