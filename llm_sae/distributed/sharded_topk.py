"""A TopK SAE whose latents are sharded across ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_sae.config import ConfigError
from llm_sae.distributed.comm import (
    CopyToShards,
    SumShards,
    all_gather_cat,
    all_reduce_,
    gather_rows_to_cpu,
)
from llm_sae.sae.archs.topk import TopKSAE
from llm_sae.sae.base import SAE, ForwardOutput


class ShardedTopKSAE(TopKSAE):
    """A TopK SAE whose latents are split across the ranks of ``group``.

    Rank r holds latents [r·n/R, (r+1)·n/R): its rows of W_enc, W_dec and b_enc; b_dec is
    replicated. A forward pass: every rank computes its pre-activations for the whole
    batch and keeps its local top-k; the candidates (values only, B·k per rank) are
    all-gathered and the global top-k chosen from them (exactly the unsharded top-k,
    since it is contained in the union of the local ones); each rank decodes its own
    winners and the partial reconstructions are all-reduced. Backward needs one more
    all-reduce, of the encoder's input gradient (for b_dec). Gradients and optimiser
    state of the sharded rows never leave their rank.
    """

    sharded: tuple[str, ...] = ("W_dec", "W_enc", "b_enc")

    def __init__(self, full: SAE, group: Any, shard: int, n_shards: int) -> None:
        nn.Module.__init__(self)
        if full.arch != "topk":
            raise ConfigError(
                f"latent sharding supports arch topk, not {full.arch!r}; use --shard-latents 1 "
                "(data parallel) for other architectures"
            )
        N = full.n_latents
        if N % n_shards:
            raise ConfigError(
                f"n_latents={N} is not divisible by --shard-latents {n_shards}; pick a multiple"
            )
        n_local = N // n_shards
        if full.cfg.k > n_local:
            raise ConfigError(
                f"k={full.cfg.k} exceeds the {n_local} latents per shard; use fewer shards"
            )
        self.cfg, self.progress = full.cfg, full.progress
        self.group, self.shard, self.n_shards, self.n_local = group, shard, n_shards, n_local
        lo, hi = shard * n_local, (shard + 1) * n_local
        # Same parameter order as SAE (W_dec, W_enc, b_enc, b_dec): optimiser state lines up.
        self.W_dec = nn.Parameter(full.W_dec.detach()[lo:hi].clone())
        self.W_enc = nn.Parameter(full.W_enc.detach()[lo:hi].clone())
        self.b_enc = nn.Parameter(full.b_enc.detach()[lo:hi].clone())
        self.b_dec = nn.Parameter(full.b_dec.detach().clone())

    def _global_winners(self, vals_BK: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(mask of this rank's candidates that are global winners, global winner values)."""
        B, K = vals_BK.shape
        with torch.no_grad():
            cand_BRK = all_gather_cat(vals_BK.detach(), self.group, dim=1)
            top_vals_Bk, top_pos_Bk = cand_BRK.topk(k, dim=1, sorted=False)
            win_BRK = torch.zeros_like(cand_BRK, dtype=torch.bool).scatter_(1, top_pos_Bk, True)
            mine_BK = win_BRK[:, self.shard * K : (self.shard + 1) * K]
        return mine_BK, top_vals_Bk

    def encode_topk(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's global winners: values [B, k_local] (0 where not a winner), local indices."""
        from llm_sae.kernels.topk import topk_encode

        xin_BD = CopyToShards.apply(x_BD - self.b_dec, self.group)
        vals_BK, idx_BK = topk_encode(xin_BD, self.W_enc, self.b_enc, self.cfg.k)
        mine_BK, _ = self._global_winners(vals_BK, self.cfg.k)
        return vals_BK * mine_BK, idx_BK

    def forward(
        self, x_BD: Tensor, *, dead_mask_N: Tensor | None = None, aux: bool = True
    ) -> ForwardOutput:
        from llm_sae.kernels.topk import topk_decode, topk_encode

        xin_BD = CopyToShards.apply(x_BD - self.b_dec, self.group)
        vals_BK, idx_BK = topk_encode(xin_BD, self.W_enc, self.b_enc, self.cfg.k)
        mine_BK, top_vals_Bk = self._global_winners(vals_BK, self.cfg.k)
        vals_BK = vals_BK * mine_BK
        x_hat_BD = (
            SumShards.apply(topk_decode(vals_BK, idx_BK, self.W_dec), self.group) + self.b_dec
        )
        on_BK = (vals_BK > 0).float()
        fired_N = torch.zeros(self.n_local, device=x_BD.device).index_add_(
            0, idx_BK.flatten(), on_BK.flatten()
        )
        metrics = {"l0": (top_vals_Bk > 0).float().sum(-1).mean()}
        return self._finish(x_BD, x_hat_BD, x_BD.new_zeros(()), metrics, fired_N, dead_mask_N, aux)

    def aux_reconstruction(self, x_BD: Tensor, dead_mask_N: Tensor) -> tuple[Tensor, int, int]:
        """AuxK's ê over the dead latents of all shards (``dead_mask_N`` is this shard's):
        local candidates, global top k_aux, local decode, summed over the shards."""
        from llm_sae.sae.ops import dead_rows, decode_sparse

        dead_M = dead_rows(dead_mask_N, self.W_enc.device)
        count = torch.tensor([dead_M.numel()], device=x_BD.device)
        n_dead = int(all_reduce_(count, self.group).item())
        if n_dead == 0:
            return x_BD.new_zeros(()), 0, 0
        k_aux = min(self.cfg.aux_k or min(512, max(1, self.d_in // 2)), n_dead)
        B = x_BD.shape[0]
        # Pad to k_aux candidates per rank with -1: below any ReLU value, never a winner.
        vals_BK = x_BD.new_full((B, k_aux), -1.0)
        idx_BK = torch.zeros(B, k_aux, dtype=torch.long, device=x_BD.device)
        m = min(k_aux, dead_M.numel())
        if m:
            pre_BM = F.linear((x_BD - self.b_dec).detach(), self.W_enc[dead_M], self.b_enc[dead_M])
            v_Bm, pos_Bm = F.relu(pre_BM).topk(m, dim=-1, sorted=False)
            vals_BK = torch.cat([v_Bm, vals_BK[:, m:]], dim=1)
            idx_BK[:, :m] = dead_M[pos_Bm]
        mine_BK, _ = self._global_winners(vals_BK, k_aux)
        part_BD = decode_sparse(vals_BK.clamp_min(0) * mine_BK, idx_BK, self.W_dec)
        return SumShards.apply(part_BD, self.group), n_dead, k_aux

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded state dict, on the CPU (a collective: every rank of the group calls it)."""
        sd = self.state_dict()
        return {
            k: (gather_rows_to_cpu(v, self.group) if k in self.sharded else v.detach().cpu())
            for k, v in sd.items()
        }

    def load_full_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load this rank's slice of an unsharded state dict."""
        lo, hi = self.shard * self.n_local, (self.shard + 1) * self.n_local
        self.load_state_dict({k: (v[lo:hi] if k in self.sharded else v) for k, v in sd.items()})
