"""The seam between where activations come from and the trainer.

An ``ActivationSource`` is anything that can say how wide its rows are, how large they are
on average (for the input scale), hand out a sample for initialisation, and stream
shuffled batches from a resumable position. The trainer sees only this; a store on disk
(``StoreSource``) is one source, and new ones (a model run on the fly, a pair of stores
for a transcoder) are one file each in this package.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor


class ActivationSource(Protocol):
    """Rows of activations, streamed in shuffled batches from a resumable position."""

    @property
    def d_in(self) -> int:
        """Row width."""
        ...

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of a row (the trainer scales inputs so E‖x‖ = √d_in)."""
        ...

    def check(self) -> None:
        """Raise an LlmSaeError naming the problem and the fix if the source is unusable;
        called before any long work starts."""
        ...

    def sample(self, n: int, seed: int) -> Tensor:
        """``n`` rows (fewer if the source is smaller) drawn with ``seed``, as float32."""
        ...

    def batches(
        self, batch_size: int, *, seed: int, start_batch: int, device: torch.device,
        dtype: torch.dtype, batch_slice: tuple[int, int] | None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless ``(x_BD, rows_B)`` batches in a fixed order for ``seed``, beginning at
        batch ``start_batch`` (so a resumed run sees what an uninterrupted one would);
        ``batch_slice`` keeps only this rank's rows of each global batch."""
        ...
