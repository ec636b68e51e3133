"""A planted "MLP" for transcoder ground truth: sparse features in, a known linear map out.

Input x_BD is the synthetic generator's sparse mix of F known unit directions in R^D
(``SyntheticActivations``); the target is y_BE = codes_BF · out_FE, the same codes written
along F known unit directions in R^E. A transcoder that learned the map has, for every
true feature, a latent whose decoder row is that feature's output direction, which
``recovery_metrics(mlp.out_features_FE, sae.W_dec)`` scores.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from llm_sae.sources.synthetic import SyntheticActivations, SyntheticConfig


class PlantedMLP:
    """``batch(i, B)`` → (x_BD, y_BE), a pure function of (seed, i), as the generator's."""

    def __init__(self, cfg: SyntheticConfig, d_out: int) -> None:
        self.inputs = SyntheticActivations(cfg)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 7]).generate_state(1)[0]))
        out_FE = torch.randn(cfg.n_features, d_out, generator=g, dtype=torch.float64)
        self.out_features_FE = (out_FE / out_FE.norm(dim=1, keepdim=True)).float()
        self.d_in, self.d_out = cfg.d_in, d_out

    def batch(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        x_BD, codes_BF = self.inputs.batch(index, batch_size, return_codes=True)  # type: ignore[misc]
        return x_BD, codes_BF @ self.out_features_FE

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[Tensor, None, Tensor]]:
        """Endless ``(x_BD, None, y_BE)`` items, the form a paired source gives the trainer."""
        i = start
        while True:
            x_BD, y_BE = self.batch(i, batch_size)
            yield x_BD, None, y_BE
            i += 1
