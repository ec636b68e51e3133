"""Training batches from an activation store on disk."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_sae.errors import StoreError
from llm_sae.store.store import Store, open_store
from llm_sae.store.verify import verify_store


class StoreSource:
    """An opened store as an ``ActivationSource``; ``verify`` checks every shard's checksum
    first."""

    def __init__(self, path: str | Path, *, verify: bool = False) -> None:
        self.path = Path(path)
        self.verify = verify
        self.store: Store = open_store(path)

    @property
    def d_in(self) -> int:
        return self.store.d_in

    @property
    def mean_norm(self) -> float:
        return self.store.mean_norm

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    def check(self) -> None:
        if self.store.n_rows == 0:
            raise StoreError(f"the store at {self.path} has no rows; harvest some activations first")
        self.store.check_files()
        if self.verify:
            problems = verify_store(self.path, scan_values=False)  # NaN rows are skipped, and counted
            if problems:
                raise StoreError(f"store {self.path} failed verification: {'; '.join(problems[:5])}")
        if not math.isfinite(self.mean_norm) or self.mean_norm <= 0:
            raise StoreError(
                f"the store at {self.path} has mean norm {self.mean_norm}; its statistics are "
                "broken (NaN/Inf rows?): run `llm-sae store verify` and harvest again"
            )

    def identity(self) -> dict[str, Any]:
        """What identifies the data, wherever the store folder is later moved."""
        st = self.store
        return {"model": st.model, "hook": st.hook, "d_in": st.d_in, "n_rows": st.n_rows,
                "context_length": st.context_length, "fingerprint": st.fingerprint,
                "path": str(self.path.resolve())}

    def sample(self, n: int, seed: int) -> Tensor:
        n = min(n, self.store.n_rows)
        reader = self.store.reader(min(n, 4096), seed=seed, loop=True, rank=0, world_size=1)
        rows, it = [], iter(reader)
        try:
            while sum(r.shape[0] for r in rows) < n:
                rows.append(next(it).float())
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return torch.cat(rows)[:n]

    def batches(
        self, batch_size: int, *, seed: int, start_batch: int, device: torch.device,
        dtype: torch.dtype, batch_slice: tuple[int, int] | None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        # Every rank follows the one-rank (global) batch order and reads only its slice.
        return iter(self.store.reader(
            batch_size, seed=seed, start_batch=start_batch, loop=True, with_rows=True,
            device=device, rank=0, world_size=1, dtype=dtype, batch_slice=batch_slice,
        ))
