"""A transcoder's training batches: an input store and an output store, row-aligned.

One harvest writes both hooks from the same forward passes with the same positions kept
(``--pair IN:OUT``), and each manifest names its partner (``manifest["pair"]``). This
source reads the input store with its usual shuffled, resumable row plan and reads the
same rows of the output store, so every batch is ``(x_BD, rows_B, y_BE)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from llm_sae.common.threads import iter_in_background
from llm_sae.errors import StoreError
from llm_sae.sources.store import StoreSource
from llm_sae.store.store import Store

CHECK_ROWS = 4096
"""Rows at each end of the pair whose tokens and positions must agree (a cheap check that
catches stores from different text, settings or harvest runs)."""


class PairedStoreSource:
    """Two stores read with one row plan: inputs ``x_BD`` (d_in) and targets ``y_BE`` (d_out)."""

    def __init__(self, in_path: str | Path, out_path: str | Path, *, verify: bool = False) -> None:
        self.inputs = StoreSource(in_path, verify=verify)
        self.targets = StoreSource(out_path, verify=verify)

    @property
    def d_in(self) -> int:
        return self.inputs.d_in

    @property
    def d_out(self) -> int:
        return self.targets.d_in

    @property
    def mean_norm(self) -> float:
        return self.inputs.mean_norm

    @property
    def target_mean_norm(self) -> float:
        """Mean L2 norm of a target row (the trainer scales targets so E‖y‖ = √d_out)."""
        return self.targets.mean_norm

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.dtype

    def check(self) -> None:
        self.inputs.check()
        self.targets.check()
        check_pair(self.inputs.store, self.targets.store)

    def sample(self, n: int, seed: int) -> Tensor:
        return self.sample_pairs(n, seed)[0]

    def sample_pairs(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` aligned (x_BD, y_BE) rows drawn with ``seed``, as float32."""
        n = min(n, self.inputs.store.n_rows)
        x_rows, y_rows, it = [], [], iter(self.batches(
            min(n, 4096), seed=seed, start_batch=0, device=torch.device("cpu"),
            dtype=torch.float32, batch_slice=None,
        ))
        try:
            while sum(r.shape[0] for r in x_rows) < n:
                x_BD, _, y_BE = next(it)
                x_rows.append(x_BD)
                y_rows.append(y_BE)
        finally:
            it.close()  # type: ignore[attr-defined]
        return torch.cat(x_rows)[:n], torch.cat(y_rows)[:n]

    def batches(
        self, batch_size: int, *, seed: int, start_batch: int, device: torch.device,
        dtype: torch.dtype, batch_slice: tuple[int, int] | None,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(x_BD, rows_B, y_BE)``: the input store's batches and the same rows of the
        output store, read on a background thread."""
        xs = self.inputs.batches(batch_size, seed=seed, start_batch=start_batch, device=None,  # type: ignore[arg-type]
                                 dtype=dtype, batch_slice=batch_slice)
        target = self.targets.store

        def pairs() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
            try:
                for x_BD, rows_B in xs:
                    y_BE = target.acts_at(rows_B.numpy()).to(dtype)
                    yield x_BD.to(device), rows_B, y_BE.to(device)
            finally:
                xs.close()  # type: ignore[attr-defined]

        return iter_in_background(pairs(), 2, name="paired-store")


def check_pair(a: Store, b: Store) -> None:
    """StoreError unless ``a`` is the input and ``b`` the output of one paired harvest."""
    pa, pb = a.manifest.get("pair") or {}, b.manifest.get("pair") or {}
    fix = "harvest both hooks together with --pair IN_HOOK:OUT_HOOK"
    if pa.get("role") != "input" or pb.get("role") != "output":
        raise StoreError(
            f"{a.path} and {b.path} are not an input/output pair (roles {pa.get('role')!r}, "
            f"{pb.get('role')!r}); {fix}, then pass the input store as --store and the output as --target-store"
        )
    if pa.get("partner_hook") != b.hook or pb.get("partner_hook") != a.hook:
        raise StoreError(
            f"{a.path} ({a.hook}) pairs with {pa.get('partner_hook')!r} and {b.path} ({b.hook}) "
            f"with {pb.get('partner_hook')!r}: not each other's partner; {fix}"
        )
    if a.n_rows != b.n_rows or a.model != b.model:
        raise StoreError(
            f"{a.path} and {b.path} differ ({a.n_rows:,} vs {b.n_rows:,} rows, models {a.model!r}, "
            f"{b.model!r}); finish or redo the paired harvest"
        )
    for lo, hi in ((0, CHECK_ROWS), (max(0, a.n_rows - CHECK_ROWS), a.n_rows)):
        if not (torch.equal(a.token_ids(lo, hi), b.token_ids(lo, hi))
                and torch.equal(a.positions(lo, hi), b.positions(lo, hi))):
            raise StoreError(
                f"rows {lo}..{hi} of {a.path} and {b.path} hold other tokens: the stores are not "
                f"row-aligned; {fix}"
            )


def target_scale(source: object) -> float | None:
    """The trainer's scale for a paired source's targets (E‖y‖ = √d_out), else None."""
    d_out, norm = getattr(source, "d_out", None), getattr(source, "target_mean_norm", None)
    return None if d_out is None or not norm else math.sqrt(d_out) / norm
