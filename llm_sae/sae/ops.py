"""Small numeric helpers the architectures share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm_sae.kernels.topk import topk_decode


def geometric_median(x_BD: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed distance to the rows (Weiszfeld iterations).

    A better b_dec start than the mean: robust to the few huge-norm rows (e.g. BOS
    positions) that language-model activations have.
    """
    x_BD = x_BD.double()
    y_D = x_BD.mean(0)
    for _ in range(iters):
        w_B = 1.0 / (x_BD - y_D).norm(dim=1).clamp_min(1e-8)
        y_new_D = (w_B[:, None] * x_BD).sum(0) / w_B.sum()
        shift = (y_new_D - y_D).norm()
        y_D = y_new_D
        if shift <= tol * (1.0 + y_D.norm()):
            break
    return y_D.float()


def dead_rows(dead_mask_N: Tensor, device: torch.device) -> Tensor:
    """The dead latents' indices on ``device``. On a GPU the trainer passes the mask from
    the host (read back with the step's other checks), so nothing here waits for the GPU."""
    dead_M = dead_mask_N.nonzero().squeeze(1)
    if dead_M.device != device:
        dead_M = (dead_M.pin_memory() if device.type == "cuda" else dead_M).to(device, non_blocking=True)
    return dead_M


def arch_setting(sae: torch.nn.Module, name: str) -> Any:
    """``sae.cfg.<name>``, or the architecture's ``default_<name>`` where the config leaves
    it None (``SAEConfig.resolved`` writes these in, ``ARCH_DEFAULTS``; an SAE built from
    an unresolved config reads the same value here)."""
    value = getattr(sae.cfg, name)
    return getattr(type(sae), f"default_{name}", None) if value is None else value


@torch.no_grad()
def fit_encoder_scale(sae: torch.nn.Module, xin_BD: Tensor, dec_BD: Tensor) -> float:
    """Scale ``sae``'s encoder (W_enc, b_enc) by the s > 0 that best fits s·``dec_BD`` to
    ``xin_BD`` in least squares (a selection's decode, which the scale does not change);
    returns s, or 1 where there is none (nothing decoded, or no positive fit)."""
    den = (dec_BD * dec_BD).sum()
    scale = float((xin_BD * dec_BD).sum() / den) if den > 0 else 0.0
    if scale <= 0:
        return 1.0
    sae.W_enc.mul_(scale)
    sae.b_enc.mul_(scale)
    return scale


def aux_k_of(sae: torch.nn.Module) -> int:
    """AuxK's latents per row before the cap at the dead count: ``aux_k``, default d/2 up
    to 512 (``SAE.auxk_loss``; Matryoshka's AuxK takes as many per level)."""
    return sae.cfg.aux_k or min(512, max(1, sae.d_in // 2))


def decode_sparse(vals_BK: Tensor, idx_BK: Tensor, W_dec_ND: Tensor) -> Tensor:
    """Σ_k vals·W_dec[idx] without a dense [B, N] intermediate (no bias)."""
    return topk_decode(vals_BK, idx_BK, W_dec_ND)


def update_ema(buf: Tensor, value: Tensor, momentum: float) -> None:
    """Running average; a negative (unset) scalar buffer takes the first value as is."""
    if buf.ndim == 0 and buf < 0:
        buf.copy_(value)
    else:
        buf.mul_(momentum).add_(value.to(buf.dtype), alpha=1 - momentum)


def warmup(progress: float, frac: float) -> float:
    return 1.0 if frac <= 0 else min(1.0, progress / frac)


def tune_log_coef(log_coef: Tensor, l0: Tensor, target: float, rate: float = 0.01) -> None:
    """One step of a multiplicative controller driving a sparsity coefficient c = exp(log_coef)
    towards the value at which the batch L0 is ``target``: log c += rate·(L0/target − 1),
    the error clipped to [−1, 1] so a far-off start (a dense ReLU at step 0) moves c by at
    most e^rate a step. A buffer, so a resumed run continues with the same coefficient."""
    log_coef.add_(rate * (l0.detach().float() / target - 1.0).clamp(-1.0, 1.0))


def fitted_residual_loss(err_BD: Tensor, e_hat_BD: Tensor, scale: float) -> Tensor:
    """scale · mean over rows of ‖e − s·ê‖², with s = clamp(⟨e, ê⟩/‖ê‖², 0, 1) per row not
    differentiated (AuxK's loss, ``SAE.auxk_loss``); the gradient reaches ê only.

    The plain expression holds and differentiates five [B, D] temporaries (the products,
    the scaled ê, the difference, its square and their gradients); here the forward keeps
    one, the residual r = e − s·ê, and the backward is one product: −2·scale·s/B · r."""
    return _FittedResidual.apply(err_BD.detach(), e_hat_BD, float(scale))


class _FittedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, err_BD: Tensor, e_hat_BD: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        fit_B1 = torch.linalg.vecdot(err_BD, e_hat_BD).unsqueeze(1)
        fit_B1 = (fit_B1 / torch.linalg.vecdot(e_hat_BD, e_hat_BD).unsqueeze(1).clamp_min(1e-12)).clamp_(0, 1)
        r_BD = torch.sub(err_BD, e_hat_BD * fit_B1)
        ctx.save_for_backward(r_BD, fit_B1)
        ctx.scale = scale
        return scale * torch.linalg.vecdot(r_BD, r_BD).mean()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        r_BD, fit_B1 = ctx.saved_tensors
        coef_B1 = fit_B1 * (g * (-2 * ctx.scale / max(1, r_BD.shape[0])))
        return None, r_BD * coef_B1, None


def control_l0(state: Tensor, l0: Tensor, target: float, *, ki: float, kp: float, lo: float, hi: float) -> Tensor:
    """One step of a PI controller on a log-scale knob u (a sparsity coefficient's log, or
    how far below the target a quadratic loss aims) that lowers the batch L0 as u rises.

    The error is e = log(L0/target), clipped to [−1, 1]: symmetric in ratio, so an L0 half
    the target pulls as hard as one twice it. The integral ``state`` += ki·e is a buffer (a
    resumed run continues from it), clamped to [lo, hi]: where the knob has lost its grip
    (a coefficient so small that reconstruction alone moves the thresholds) it would
    otherwise wind on, and take hundreds of steps to come back once the L0 turns. The
    returned u = state + kp·e: the proportional part reacts within the step and damps the
    overshoot an integral alone gives against thresholds that move about lr a step."""
    e = (l0.detach().float() / target).clamp_min(1e-6).log().clamp(-1.0, 1.0)
    state.add_(ki * e).clamp_(lo, hi)
    return state + kp * e


def relative_power(progress: float, middle: float, fade: float | None) -> float:
    """The row norm's power in the relative ranking at ``progress`` (a fraction of
    training): 1 until ``fade``/2 before ``middle``, 0 from ``fade``/2 after it, linear
    between (``fade`` 0 or None: a switch at ``middle``); 0 throughout when ``middle`` is 0."""
    if middle <= 0 or progress >= middle + (fade or 0) / 2:
        return 0.0
    if not fade:
        return 1.0
    return min(1.0, 0.5 + (middle - progress) / fade)


def relative_row_scale(sae: torch.nn.Module, xin_BD: Tensor) -> Tensor | None:
    """[B]: each row's input norm over the batch's mean, to the power ``relative_power``,
    while ``sae`` trains and that power is positive (BatchTopK's ranking and JumpReLU's
    gate divide each row's pre-activations by it), else None: the plain rule inference
    runs."""
    if not sae.training:
        return None
    alpha = relative_power(sae.progress, sae.cfg.relative_selection, arch_setting(sae, "relative_fade"))
    if alpha <= 0:
        return None
    n_B = xin_BD.detach().norm(dim=1)
    s_B = (n_B / n_B.mean().clamp_min(1e-12)).clamp_min(1e-3)
    return s_B if alpha == 1 else s_B.pow(alpha)
