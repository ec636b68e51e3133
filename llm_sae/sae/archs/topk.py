"""TopK (Gao et al. 2024): exactly k latents per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels.topk import topk_encode
from llm_sae.sae.base import SAE, ForwardOutput
from llm_sae.sae.ops import decode_sparse
from llm_sae.sae.registry import register


@register
class TopKSAE(SAE):
    """TopK (Gao et al. 2024): keep the k largest pre-activations per token (after ReLU).

    Training uses the sparse kernels: one dense encoder matmul, and a decode and backward
    that touch only the k active latents.
    """

    arch = "topk"

    def activate(self, pre_BN: Tensor) -> Tensor:
        vals_BK, idx_BK = F.relu(pre_BN).topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BN).scatter_(-1, idx_BK, vals_BK)

    def encode_topk(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """The sparse form: values [B, K] (≥ 0) and latent indices [B, K]."""
        # ``centered(x)`` done inside the kernel, whose backward then gives b_dec its
        # gradient without one for x: data, it needs none.
        center_D = None if self.is_transcoder else self.b_dec
        vals_BK, idx_BK = topk_encode(x_BD, self.W_enc, self.b_enc, self.cfg.k, center_D=center_D)
        return F.relu(vals_BK), idx_BK

    def forward(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        vals_BK, idx_BK = self.encode_topk(x_BD)
        x_hat_BD = decode_sparse(vals_BK, idx_BK, self.W_dec)
        # In place where the dtypes allow: the decode is a fresh tensor nothing saved, so
        # this is the same sum without a second [B, D] tensor.
        x_hat_BD = x_hat_BD.add_(self.b_dec) if x_hat_BD.dtype == self.b_dec.dtype else x_hat_BD + self.b_dec
        x_hat_BD = self.add_skip(x_hat_BD, x_BD)
        on_BK = (vals_BK > 0).float()
        fired_N = torch.zeros(self.n_latents, device=x_BD.device).index_add_(
            0, idx_BK.flatten(), on_BK.flatten()
        )
        metrics = {"l0": on_BK.sum(-1).mean().detach()}
        zero = x_BD.new_zeros(())
        return self._finish(x_BD, x_hat_BD, zero, metrics, fired_N, dead_mask_N, aux, target_BE=target_BE)
