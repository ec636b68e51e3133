"""A cross-layer transcoder's batches: every layer's (MLP input, MLP output) pair, row-aligned.

One harvest with ``--pair`` for each layer writes all the stores from the same forward
passes, so row r is the same token in every store. This source reads the first input store
with its shuffled, resumable row plan and the same rows of every other store, giving
``(x_BLD, rows_B, y_BLE)``; each pair must be a pair and all pairs rows of one harvest.
Also ``PlantedLayers``: a planted linear multi-layer system with known cross-layer features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llm_sae.common.threads import iter_in_background
from llm_sae.errors import StoreError
from llm_sae.sources.paired import CHECK_ROWS, check_pair
from llm_sae.sources.synthetic import SyntheticActivations, SyntheticConfig
from llm_sae.store.store import Store, open_store


class LayerPairsSource:
    """Pairs ``[(in_store, out_store), …]`` in layer order, read with one row plan."""

    def __init__(self, pairs: list[tuple[str | Path, str | Path]]) -> None:
        if not pairs:
            raise StoreError("a cross-layer transcoder needs at least one --pair IN_STORE:OUT_STORE")
        self.inputs: list[Store] = [open_store(a) for a, _ in pairs]
        self.targets: list[Store] = [open_store(b) for _, b in pairs]

    @property
    def n_layers(self) -> int:
        return len(self.inputs)

    @property
    def d_in(self) -> int:
        return self.inputs[0].d_in

    @property
    def d_out(self) -> int:
        return self.targets[0].d_in

    def check(self) -> None:
        """StoreError, before training, unless every pair is a pair and all rows align."""
        first = self.inputs[0]
        for a, b in zip(self.inputs, self.targets, strict=True):
            check_pair(a, b)
            if (a.d_in, b.d_in) != (self.d_in, self.d_out):
                raise StoreError(f"{a.path} / {b.path} have widths {a.d_in} / {b.d_in}, not "
                                 f"{self.d_in} / {self.d_out} as layer 0: a CLT's layers share their widths")
            if a.n_rows != first.n_rows or any(
                not torch.equal(a.token_ids(lo, hi), first.token_ids(lo, hi))
                for lo, hi in ((0, CHECK_ROWS), (max(0, a.n_rows - CHECK_ROWS), a.n_rows))
            ):
                raise StoreError(f"{a.path} and {first.path} hold other rows: harvest every layer's "
                                 "--pair in one harvest so that the stores are row-aligned")

    def batches(self, batch_size: int, *, seed: int, start_batch: int, device: torch.device,
                batch_slice: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Endless float32 ``(x_BLD, rows_B, y_BLE)``, deterministic for (seed, start_batch);
        ``batch_slice=(i, n)``: the i-th of n equal parts of each batch (data parallel)."""
        reader = self.inputs[0].reader(batch_size, seed=seed, start_batch=start_batch, loop=True,
                                       with_rows=True, rank=0, world_size=1, dtype=torch.float32,
                                       batch_slice=batch_slice)

        def rows() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
            for x0_BD, rows_B in reader:
                idx = rows_B.numpy()
                xs = [x0_BD] + [s.acts_at(idx).float() for s in self.inputs[1:]]
                ys = [s.acts_at(idx).float() for s in self.targets]
                yield torch.stack(xs, 1).to(device), rows_B, torch.stack(ys, 1).to(device)

        return iter_in_background(rows(), 2, name="layer-pairs")


class PlantedLayers:
    """Planted cross-layer features: layer h's input is a sparse mix of its own F features,
    and feature i of layer h writes ``codes · out_h[i, t − h]`` into every output t ≥ h.

    ``out_features[h]`` [F, L − h, E] has unit-norm rows over (t, e): what a CLT's
    ``W_dec[h]`` rows should recover.
    """

    def __init__(self, n_layers: int, cfg: SyntheticConfig, d_out: int) -> None:
        self.layers = [SyntheticActivations(dataclasses.replace(cfg, seed=cfg.seed + 97 * h))
                       for h in range(n_layers)]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 11]).generate_state(1)[0]))
        self.out_features = []
        for h in range(n_layers):
            out_FJE = torch.randn(cfg.n_features, n_layers - h, d_out, generator=g)
            self.out_features.append(out_FJE / out_FJE.flatten(1).norm(dim=1)[:, None, None])
        self.n_layers, self.d_in, self.d_out = n_layers, cfg.d_in, d_out

    def batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """(x_BLD, y_BLE), a pure function of (seed, index)."""
        xs, ys = [], [torch.zeros(batch_size, self.d_out) for _ in range(self.n_layers)]
        for h, gen in enumerate(self.layers):
            x_BD, codes_BF = gen.batch(index, batch_size, return_codes=True)  # type: ignore[misc]
            xs.append(x_BD)
            out_BJE = torch.einsum("bf,fje->bje", codes_BF, self.out_features[h])
            for j in range(self.n_layers - h):
                ys[h + j] += out_BJE[:, j]
        return torch.stack(xs, 1), torch.stack(ys, 1)

    def batches(self, batch_size: int, *, seed: int = 0, start_batch: int, device: torch.device,
                batch_slice: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, None, Tensor]]:
        i, n = batch_slice or (0, 1)
        part = slice(i * batch_size // n, (i + 1) * batch_size // n)
        b = start_batch
        while True:
            x_BLD, y_BLE = self.batch(b, batch_size)
            yield x_BLD[part].to(device), None, y_BLE[part].to(device)
            b += 1
