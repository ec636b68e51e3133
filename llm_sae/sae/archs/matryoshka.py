"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llm_sae.config import ConfigError
from llm_sae.kernels.auxk import DeadGroup, grouped_auxk_loss
from llm_sae.kernels.batch_topk import batch_topk_virtual_decodes
from llm_sae.sae.archs.batchtopk import BatchTopKSAE
from llm_sae.sae.base import ForwardOutput
from llm_sae.sae.ops import arch_setting, aux_k_of, dead_rows
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


@dataclass(kw_only=True)
class MatryoshkaParams:
    matryoshka_widths: list[int] | None = None
    """matryoshka: widths of the nested prefixes of the dictionary that must each reconstruct
    the input on their own, increasing; n_latents is added as the last if missing (default
    n/32, n/8, n/2, n, SynthSAEBench's)."""
    matryoshka_inner_weight: float | None = None
    """matryoshka: weight of each inner prefix's reconstruction loss beside the whole
    dictionary's (default 0.5; 1 is the paper's and SAELens's equal weighting). The inner
    losses ask the first latents to also stand in for features that live further out, which
    blends them: on ``llm-sae bench recovery`` (independent features; a switch to plain
    ranking at 90%) 1 recovered 86.1% of the planted features, 0.5 90.8% at a lower FVU,
    and SynthSAEBench's hierarchy kept its F1 (0.552 → 0.541) and raised its MCC (0.677 →
    0.689). With the default fade, 0.5 recovers 89.8% with 0.3% dead (BENCHMARKS.md,
    issue 17, fourth pass)."""


@register
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK: BatchTopK whose prefixes of latents are SAEs in their own right.

    Latents [0, w) must reconstruct x without the rest, for every w in the widths, and the
    loss is the whole dictionary's reconstruction error plus ``matryoshka_inner_weight``
    times each inner prefix's. The first latents learn the general,
    frequent features and the later ones refine them, so a parent feature is not
    absorbed into its children (Bussmann et al. 2025): on SynthSAEBench it beats
    BatchTopK on F1 and MCC. Dead latents get the Matryoshka AuxK: those of each level
    reconstruct the residual of the prefix that ends with that level. Inference is
    BatchTopK's (one global threshold), and so is the SAELens export (``jumprelu``).
    """

    arch = "matryoshka"
    default_matryoshka_inner_weight = 0.5
    """Checkpoints written before the setting existed trained with 1 (``LEGACY_DEFAULTS``
    in ``train/checkpoint.py``)."""

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        widths = cfg.matryoshka_widths or []
        n = cfg.n_latents or 0
        if any(w <= 0 or w > n for w in widths) or any(b <= a for a, b in zip(widths[:-1], widths[1:], strict=True)):
            raise ConfigError(
                f"matryoshka_widths must increase and lie in (0, n_latents={n}], got {widths}"
            )
        if cfg.matryoshka_inner_weight is not None and not cfg.matryoshka_inner_weight >= 0:
            raise ConfigError(
                f"matryoshka_inner_weight must be >= 0, got {cfg.matryoshka_inner_weight}"
            )

    @property
    def widths(self) -> list[int]:
        n = self.n_latents
        widths = list(self.cfg.matryoshka_widths or [max(1, n // 32), max(1, n // 8), max(1, n // 2)])
        return sorted({w for w in widths if 0 < w < n}) + [n]

    def forward(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """Training forward on the sparse kernels: BatchTopK's kept pairs decoded sparsely
        as virtual rows of one level each (``batch_topk_virtual_decodes``), the prefix
        decodes their running sums; the same losses and gradients as ``forward_dense``
        (tested)."""
        if not self.training:
            return self.forward_dense(x_BD, target_BE=target_BE, dead_mask_N=dead_mask_N, aux=aux)
        xin_BD = self.centered(x_BD)
        dec_VE, rows_V, sizes, vals_VJ, idx_VJ, cut = batch_topk_virtual_decodes(
            xin_BD, self.W_enc, self.b_enc, self.W_dec, self.cfg.k, self.widths, self.row_scale(xin_BD)
        )
        del xin_BD  # not saved by the backward (its virtual rows are): one [B, D] less while AuxK runs
        self.follow_cut(cut)  # BatchTopK's running cut-off, as its train_activate keeps it
        fired_VJ = (vals_VJ > 0).float()
        fired_N = torch.zeros(self.n_latents, device=x_BD.device).index_add_(0, idx_VJ.flatten(), fired_VJ.flatten())
        l0 = fired_VJ.sum() / x_BD.shape[0]
        prefixes = _PrefixErrors.apply(self.target_of(x_BD, target_BE), self._base(x_BD, target_BE), dec_VE, rows_V, sizes)
        del dec_VE  # the backward does not need the [V, E] decodes: freed before AuxK runs
        return self._prefix_losses(x_BD, target_BE, prefixes, fired_N, l0, dead_mask_N, aux)

    def forward_dense(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """The reference path (and evaluation's): dense [B, N] latents, each level's
        decode a dense product with its slice of the dictionary."""
        with self.dense_selection(self.centered(x_BD)):
            z_BN = self.train_activate(self.pre_acts(x_BD))
        lo, decodes = 0, []
        for w in self.widths:
            decodes.append(z_BN[:, lo:w] @ self.W_dec[lo:w])
            lo = w
        fired_BN = z_BN > 0
        rows_V = torch.arange(x_BD.shape[0], device=x_BD.device).repeat(len(decodes))  # a virtual row per row and level
        prefixes = _PrefixErrors.apply(self.target_of(x_BD, target_BE), self._base(x_BD, target_BE), torch.cat(decodes),
                                       rows_V, [x_BD.shape[0]] * len(decodes))  # fmt: skip
        return self._prefix_losses(x_BD, target_BE, prefixes, fired_BN.sum(0).float(),
                                   fired_BN.sum(-1).float().mean(), dead_mask_N, aux)

    def _base(self, x_BD: Tensor, target_BE: Tensor | None) -> Tensor:
        """What every prefix decode is added to: b_dec, and a transcoder's skip path."""
        return self.add_skip(self.b_dec.expand_as(self.target_of(x_BD, target_BE)), x_BD)

    def _prefix_losses(
        self, x_BD: Tensor, target_BE: Tensor | None, prefixes: tuple[Tensor, Tensor, Tensor], fired_N: Tensor,
        l0: Tensor, dead_mask_N: Tensor | None, aux: bool,
    ) -> ForwardOutput:
        """The loss of every prefix from ``_PrefixErrors``'s (levels_I, x̂, err_IBE): each
        inner level's residual (detached) is kept for its AuxK; the last level's is
        ``_finish``'s."""
        levels_I, x_hat_BD, err_IBE = prefixes
        metrics: dict[str, Tensor] = {"l0": l0.detach()}
        self._level_errs: list[tuple[int, int, Tensor]] = []
        for i, w in enumerate(self.widths[:-1]):
            metrics[f"mse_{w}"] = (levels_I[i] / x_hat_BD.shape[-1]).detach()
            self._level_errs.append(([0, *self.widths][i], w, err_IBE[i]))
        inner = levels_I.sum() * arch_setting(self, "matryoshka_inner_weight")
        out = self._finish(x_BD, x_hat_BD, inner, metrics, fired_N, dead_mask_N, aux, target_BE=target_BE)
        del self._level_errs
        return out

    def auxk_loss(self, x_BD: Tensor, err_BD: Tensor, dead_mask_N: Tensor) -> Tensor:
        """The Matryoshka AuxK: per level, its dead latents model the residual of the prefix
        ending with it (SAELens's ``use_matryoshka_aux_loss``), each with the fitted
        scale and the few-dead down-weighting of ``SAE.auxk_loss``; all levels in one
        pass over the dead latents (``grouped_auxk_loss``: the same losses and gradients
        as ``SAE.auxk_loss`` level by level, tested)."""
        dead_M = dead_rows(dead_mask_N, self.W_enc.device)
        if dead_M.numel() == 0:
            return x_BD.new_zeros(())
        # Each level's dead latents are a run of the sorted dead_M: one read-back for all.
        bounds = torch.searchsorted(dead_M, torch.tensor(self.widths, device=dead_M.device)).tolist()
        errs = [e for _, _, e in self._level_errs] + [err_BD]
        groups, lo = [], 0
        for hi, level_err_BD in zip(bounds, errs, strict=True):
            n_dead = hi - lo
            if n_dead:
                k_aux = min(aux_k_of(self), n_dead)
                groups.append(DeadGroup(lo, hi, k_aux, level_err_BD, min(n_dead / k_aux, 1.0)))
            lo = hi
        # The encoder's input, centred a slab at a time (``centered``: x + (−b_dec) for an
        # SAE); detached: AuxK trains only the dead latents.
        shift_D = None if self.is_transcoder else -self.b_dec
        return grouped_auxk_loss(x_BD, self.W_enc, self.b_enc, self.W_dec, dead_M, groups, shift_D)


class _PrefixErrors(torch.autograd.Function):
    """(levels_I, x̂, err_IBE) for L levels' decodes given as virtual rows (dec_VE[v] adds
    to row rows_V[v]; the first sizes[0] rows are level 0's, and so on): x̂_l = base +
    Σ_{i≤l} dec_i, the inner levels' (l < L−1) mean squared errors ‖y − x̂_l‖² (float32)
    and errors (detached), and the whole x̂ (its loss is the base class's).

    Running forms both ways, so no [L, B, E] tensor exists: the forward adds each level's
    virtual rows into one x̂ and keeps the inner errors; the backward holds one [B, E]
    running gradient, dec_l's = x̂'s + Σ_{i≥l} −2·g_i/B·err_i over inner levels i (a
    suffix sum), and gathers each level's virtual rows from it."""

    @staticmethod
    def forward(ctx, y_BE: Tensor, base_BE: Tensor, dec_VE: Tensor, rows_V: Tensor, sizes: list[int]):  # type: ignore[override]
        L = len(sizes)
        x_hat_BE = base_BE.clone(memory_format=torch.contiguous_format)
        err_IBE = y_BE.new_empty(L - 1, *y_BE.shape)
        start = 0
        for i, n in enumerate(sizes):
            x_hat_BE.index_add_(0, rows_V[start : start + n], dec_VE[start : start + n])
            start += n
            if i < L - 1:
                torch.sub(y_BE, x_hat_BE, out=err_IBE[i])
        # Level by level: vecdot's product is a temporary of its inputs' size.
        sq_IB = [torch.linalg.vecdot(e_BE, e_BE) for e_BE in err_IBE]
        levels_I = (torch.stack(sq_IB) if sq_IB else err_IBE.new_zeros(0, err_IBE.shape[1])).float().mean(-1)
        ctx.save_for_backward(err_IBE, rows_V)
        ctx.sizes = sizes
        ctx.mark_non_differentiable(err_IBE)
        ctx.set_materialize_grads(False)
        return levels_I, x_hat_BE, err_IBE

    @staticmethod
    def backward(ctx, g_I: Tensor | None, g_x_hat_BE: Tensor | None, _g_err: Tensor | None):  # type: ignore[override]
        err_IBE, rows_V = ctx.saved_tensors
        sizes, (L, B) = ctx.sizes, (len(ctx.sizes), err_IBE.shape[1])
        run_BE = err_IBE.new_zeros(err_IBE.shape[1:]) if g_x_hat_BE is None else g_x_hat_BE.clone()
        c_I = err_IBE.new_zeros(L - 1) if g_I is None else g_I.to(err_IBE.dtype) * (-2 / B)
        grad_VE = err_IBE.new_empty(rows_V.numel(), err_IBE.shape[2])
        stop = rows_V.numel()
        for i in range(L - 1, -1, -1):  # no host sync: the coefficients stay tensors
            if i < L - 1:
                run_BE.addcmul_(err_IBE[i], c_I[i])
            torch.index_select(run_BE, 0, rows_V[stop - sizes[i] : stop], out=grad_VE[stop - sizes[i] : stop])
            stop -= sizes[i]
        grad_y = (g_x_hat_BE if g_x_hat_BE is not None else 0) - run_BE if ctx.needs_input_grad[0] else None
        return grad_y, run_BE if ctx.needs_input_grad[1] else None, grad_VE, None, None
