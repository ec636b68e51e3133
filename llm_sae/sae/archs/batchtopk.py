"""BatchTopK (Bussmann et al. 2024): the top k·B pre-activations of a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels.batch_topk import batch_topk_decodes
from llm_sae.sae.base import SAE, ForwardOutput
from llm_sae.sae.ops import update_ema
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@dataclass(kw_only=True)
class BatchTopKParams:
    stat_momentum: float = 0.99
    """Momentum of running statistics: kl_sigmoid's ρ̂ and wta's inference thresholds."""
    threshold_momentum: float = 0.9
    """batchtopk and matryoshka: momentum of the inference threshold, a running average
    of each batch's cut-off. One batch's cut-off is already precise (a quantile of B·N
    values), so a short window that follows the end of training beats a long one that
    still remembers its start."""


@register
class BatchTopKSAE(SAE):
    """BatchTopK (Bussmann et al. 2024): the B·k largest activations over the whole batch.

    Tokens get a variable number of latents (k on average). Inference cannot depend on
    the batch, so it is a JumpReLU with one global threshold: a running average of each
    training batch's cut-off (its smallest kept activation), exported to SAELens as
    ``jumprelu``.
    """

    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    def activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        if self.training:
            flat = z_BN.flatten()
            vals, idx = flat.topk(min(flat.numel(), self.cfg.k * z_BN.shape[0]), sorted=False)
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(z_BN)
        return z_BN * (z_BN > self.threshold.clamp_min(0))

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = self.activate(pre_BN)
        with torch.no_grad():
            kept = z_BN[z_BN > 0]
            if kept.numel():
                update_ema(self.threshold, kept.min(), self.cfg.threshold_momentum)
        return z_BN

    def forward(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """Training forward on the sparse kernels: the kept (token, latent) pairs from
        ``batch_topk_pairs``, their values recomputed with a sparse backward, a sparse
        decode; the same loss and gradients as the dense ``SAE.forward`` (tested)."""
        if not self.training:
            return super().forward(x_BD, target_BE=target_BE, dead_mask_N=dead_mask_N, aux=aux)
        xin_BD = self.centered(x_BD)
        (dec_BE,), vals_BK, idx_BK = batch_topk_decodes(xin_BD, self.W_enc, self.b_enc, self.W_dec, self.cfg.k, [self.n_latents])
        with torch.no_grad():
            kept = vals_BK[vals_BK > 0]
            if kept.numel():
                update_ema(self.threshold, kept.min(), self.cfg.threshold_momentum)
        x_hat_BD = self.add_skip(dec_BE + self.b_dec, x_BD)
        fired_BK = (vals_BK > 0).float()
        fired_N = torch.zeros(self.n_latents, device=x_BD.device).index_add_(
            0, idx_BK.flatten(), fired_BK.flatten()
        )
        metrics = {"l0": (fired_BK.sum() / x_BD.shape[0]).detach()}
        zero = x_BD.new_zeros(())
        return self._finish(x_BD, x_hat_BD, zero, metrics, fired_N, dead_mask_N, aux, target_BE=target_BE)

    def _scale_latents(self, factor: float) -> None:
        if self.threshold > 0:
            self.threshold *= factor
