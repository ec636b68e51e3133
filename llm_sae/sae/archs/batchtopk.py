"""BatchTopK (Bussmann et al. 2024): the top k·B pre-activations of a batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.kernels.batch_topk import batch_topk_decodes
from llm_sae.sae.base import SAE, ForwardOutput
from llm_sae.sae.ops import fit_encoder_scale, relative_row_scale, update_ema
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
    relative_selection: float = 0.9
    """batchtopk, matryoshka and jumprelu: early in training the batch-level top k·B ranks
    each activation relative to its row's input norm (jumprelu: its gate compares
    pre-activation / relative row norm with θ); then the ranking fades to plain BatchTopK
    (JumpReLU), which inference runs, and is half-way there at this fraction of
    training (``relative_fade``); 0 = plain throughout. Plainly ranked, rows with large
    norms take most of the budget, latents that would align with the features of the
    other rows never reach the cut-off, and learning stalls: ``llm-sae bench recovery``
    recovered 33% of the planted features at 1M tokens, 83% this way (TopK: 88%;
    BENCHMARKS.md, issue 17)."""
    relative_fade: float | None = None
    """batchtopk, matryoshka and jumprelu: over this fraction of training, centred on
    ``relative_selection``, the row norm's power in the ranking falls linearly from 1 to 0
    (default 0.2: relative to 80% of a run, plain at its end; 0 = switch at once). A sudden
    switch lets the latents that only the relative ranking chose stop firing at once:
    ``bench recovery`` ended with 2.0% dead (switch at 90%), 0.3% with the fade."""


@register
class BatchTopKSAE(SAE):
    """BatchTopK (Bussmann et al. 2024): the B·k largest activations over the whole batch.

    Tokens get a variable number of latents (k on average). Inference cannot depend on
    the batch, so it is a JumpReLU with one global threshold: a running average of each
    training batch's cut-off (its smallest kept activation), exported to SAELens as
    ``jumprelu``. Two changes from the paper make it learn as TopK does (``relative_selection``):
    for most of training the batch ranks activations relative to their row's norm, fading
    to the plain ranking by the end (``relative_fade``), and the encoder starts at the scale that best reconstructs the initialisation sample.
    """

    arch = "batchtopk"
    default_aux_coef = 1.0
    default_relative_fade = 0.2

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    def row_scale(self, xin_BD: Tensor) -> Tensor | None:
        """What the training selection divides each row's activations by (the relative
        phase, in float32), else None (plain BatchTopK): ``ops.relative_row_scale``."""
        s_B = relative_row_scale(self, xin_BD)
        return None if s_B is None else s_B.float()

    @contextlib.contextmanager
    def dense_selection(self, xin_BD: Tensor) -> Iterator[None]:
        """Within it, the dense ``activate`` selects as ``forward`` does on ``xin_BD``'s rows
        (relative to their norms in the relative phase)."""
        self._row_scale_B = self.row_scale(xin_BD)
        try:
            yield
        finally:
            self._row_scale_B = None

    def follow_cut(self, cut: Tensor) -> None:
        """The inference threshold's running average takes a batch's (positive) cut-off."""
        with torch.no_grad():
            if cut > 0:
                update_ema(self.threshold, cut, self.cfg.threshold_momentum)

    def activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        if self.training:
            flat = z_BN.flatten()
            scale_B = getattr(self, "_row_scale_B", None)
            rank = flat if scale_B is None else (z_BN / scale_B[:, None]).flatten()
            idx = rank.topk(min(flat.numel(), self.cfg.k * z_BN.shape[0]), sorted=False).indices
            return torch.zeros_like(flat).scatter_(0, idx, flat[idx]).view_as(z_BN)
        return z_BN * (z_BN > self.threshold.clamp_min(0))

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = self.activate(pre_BN)
        with torch.no_grad():
            if getattr(self, "_row_scale_B", None) is not None:
                flat = F.relu(pre_BN).flatten()
                cut = flat.topk(min(flat.numel(), self.cfg.k * pre_BN.shape[0]), sorted=False).values.min()
            else:
                kept = z_BN[z_BN > 0]
                cut = kept.min() if kept.numel() else z_BN.new_zeros(())
        self.follow_cut(cut)
        return z_BN

    def forward_dense(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """The dense [B, N] reference of ``forward`` (the base class's, with the same
        selection)."""
        with self.dense_selection(self.centered(x_BD)):
            return SAE.forward(self, x_BD, target_BE=target_BE, dead_mask_N=dead_mask_N, aux=aux)

    @torch.no_grad()
    def init_from_sample(self, x_BD: Tensor) -> None:
        """Scale the encoder so the first selection's decode best reconstructs the
        (scaled, b_dec-centred) sample in least squares. The selection does not depend on
        the scale; at the initial scale (W_enc = W_decᵀ) the rows the batch gives many
        latents are reconstructed several times over, and the first steps only shrink
        the encoder (BENCHMARKS.md, issue 17). A transcoder keeps its start."""
        if self.is_transcoder or x_BD.shape[0] == 0:
            return
        was = self.training
        self.train()
        xs_BD = x_BD[: max(64, min(4096, (1 << 26) // self.n_latents))].to(self.W_enc.dtype)
        xin_BD = self.centered(xs_BD)
        try:  # the training selection's decode, on the sparse kernels: no dense [S, N] (1.1 GB at n=24576)
            (dec_BD,), _, _, _ = batch_topk_decodes(
                xin_BD, self.W_enc, self.b_enc, self.W_dec, self.cfg.k, [self.n_latents], self.row_scale(xin_BD)
            )
        finally:
            self.train(was)
        fit_encoder_scale(self, xin_BD, dec_BD)

    def forward(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """Training forward on the sparse kernels: the kept (token, latent) pairs from
        ``batch_topk_decodes`` (as virtual rows of a few pairs), with a sparse backward and
        a sparse decode; the same loss and gradients as ``forward_dense`` (tested)."""
        if not self.training:
            return super().forward(x_BD, target_BE=target_BE, dead_mask_N=dead_mask_N, aux=aux)
        xin_BD = self.centered(x_BD)
        (dec_BE,), vals_VJ, idx_VJ, cut = batch_topk_decodes(
            xin_BD, self.W_enc, self.b_enc, self.W_dec, self.cfg.k, [self.n_latents], self.row_scale(xin_BD)
        )
        self.follow_cut(cut)
        x_hat_BD = self.add_skip(dec_BE + self.b_dec, x_BD)
        fired_VJ = (vals_VJ > 0).float()
        fired_N = torch.zeros(self.n_latents, device=x_BD.device).index_add_(
            0, idx_VJ.flatten(), fired_VJ.flatten()
        )
        metrics = {"l0": (fired_VJ.sum() / x_BD.shape[0]).detach()}
        zero = x_BD.new_zeros(())
        return self._finish(x_BD, x_hat_BD, zero, metrics, fired_N, dead_mask_N, aux, target_BE=target_BE)

    def _scale_latents(self, factor: float) -> None:
        if self.threshold > 0:
            self.threshold *= factor
