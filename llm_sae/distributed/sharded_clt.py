"""A cross-layer transcoder whose latents are sharded across ranks."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from llm_sae.config import ConfigError
from llm_sae.distributed.comm import SumShards, gather_rows_to_cpu
from llm_sae.sae.clt import CrossLayerTranscoder

# Which dimension of each parameter (and its Adam moments) indexes the latents.
LATENT_DIM = {"W_enc": 1, "b_enc": 1, "W_dec": 0}


def latent_dim(name: str) -> int | None:
    """The latent dimension of state ``name`` ("W_dec.3" → 0), None for replicated state."""
    return LATENT_DIM.get(name.split(".")[0])


class ShardedCLT(CrossLayerTranscoder):
    """A CLT whose latents are split across the ranks of ``group``, as the sharded TopK SAE's.

    Rank r holds latents [r·n/R, (r+1)·n/R) of every layer: its slices of W_enc, b_enc and
    every W_dec[l] (a latent's whole decoder, so the per-latent norm stays local); b_dec and
    the thresholds are replicated. A forward pass: every rank computes its pre-activations
    for the whole batch; each layer's top k·B is chosen from every rank's candidates
    (``share_batch``, set by the trainer over all ranks); each rank decodes its own latents
    and the partial outputs are all-reduced (``SumShards``: backward is the identity, as every
    rank computes the same loss). Gradients and Adam state of the sharded rows never leave
    their rank; ``full_tensor`` gathers them for a checkpoint, ``local_slice`` cuts one.
    """

    def __init__(self, full: CrossLayerTranscoder, group: Any, shard: int, n_shards: int) -> None:
        N, k = full.cfg.n_latents, full.cfg.k
        if N % n_shards or k >= N // n_shards:
            raise ConfigError(f"--shard-latents {n_shards} must divide n_latents={N} and leave more than "
                              f"k={k} latents per shard; pick a divisor with N / shards > k")
        super().__init__(dataclasses.replace(full.cfg, n_latents=N // n_shards))
        self.full_cfg = full.cfg
        self.group, self.shard, self.n_shards = group, shard, n_shards
        self.load_state_dict({k: self.local_slice(k, v) for k, v in full.state_dict().items()})

    def sum_shards(self, part: Tensor) -> Tensor:
        return SumShards.apply(part.float(), self.group)  # float32: a sum over shards, and gloo

    def local_slice(self, name: str, v: Tensor) -> Tensor:
        dim = latent_dim(name)
        if dim is None or v.ndim == 0:
            return v
        n = v.shape[dim] // self.n_shards
        return v.narrow(dim, self.shard * n, n).clone()

    def full_tensor(self, name: str, v: Tensor) -> Tensor:
        """Every shard's ``v`` joined along its latent dimension, on the CPU (a collective)."""
        dim = latent_dim(name)
        if dim is None or v.ndim == 0:
            return v.detach().cpu()
        rows = gather_rows_to_cpu(v.detach().movedim(dim, 0).contiguous(), self.group)
        return rows.movedim(0, dim).contiguous()

    @torch.no_grad()
    def unsharded(self) -> CrossLayerTranscoder:
        """The whole CLT on the CPU (a collective: every rank of the group calls it)."""
        full = CrossLayerTranscoder(self.full_cfg)
        full.load_state_dict({k: self.full_tensor(k, v) for k, v in self.state_dict().items()})
        return full.train(self.training)
