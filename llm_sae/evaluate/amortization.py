"""The amortization gap: how far the encoder is from the best sparse code."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm_sae.evaluate.stats import fired_mask, reconstruct


@torch.no_grad()
def amortization_gap(sae: Any, x_BD: Tensor, *, iters: int = 300, tau: float | None = None) -> dict[str, Any]:
    """The encoder's reconstruction at its L0 against FISTA's at the same mean L0.

    The dictionary is the SAE's (rows of W_dec, normalised — a row's scale only
    reparameterises its code — plus b_dec). ``fista_refit`` also refits the values on
    FISTA's support by least squares (z ≥ 0), removing the L1 shrinkage, which is the
    fairer comparison for SAEs trained without an L1 penalty.
    """
    from llm_sae.sae.sparse_coding import fista, fista_matched_l0

    if not hasattr(sae, "W_dec") or not hasattr(sae, "b_dec"):
        return {"skipped": "the SAE has no W_dec/b_dec dictionary"}
    x_BD = x_BD.float()
    z_BN, x_hat_BD = reconstruct(sae, x_BD)
    target = float(fired_mask(sae, z_BN, tau).sum(-1).float().mean())
    W_ND = sae.W_dec.detach().float()
    D_ND = W_ND / W_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b_D = sae.b_dec.detach().float()
    if target >= D_ND.shape[0] or target <= 0:
        return {"skipped": f"encoder L0 {target:.1f} leaves nothing to match"}
    m = fista_matched_l0(x_BD, D_ND, target, bias_D=b_D, nonnegative=True, iters=iters)
    x_fista = m.z_BN @ D_ND + b_D
    z_refit = fista(x_BD, D_ND, 0.0, bias_D=b_D, nonnegative=True, iters=iters, z0_BN=m.z_BN,
                    mask_BN=(m.z_BN != 0).float())
    x_refit = z_refit @ D_ND + b_D
    var = float((x_BD - x_BD.mean(0)).pow(2).sum())

    def fvu(xh: Tensor) -> float:
        return float((x_BD - xh).pow(2).sum()) / var if var > 0 else float("nan")

    out = {
        "rows": x_BD.shape[0], "l0_encoder": target, "l0_fista": m.l0, "lambda": m.lam,
        "bisection_steps": m.steps, "fvu_encoder": fvu(x_hat_BD), "fvu_fista": fvu(x_fista),
        "fvu_fista_refit": fvu(x_refit),
    }
    out["gap"] = out["fvu_encoder"] - min(out["fvu_fista"], out["fvu_fista_refit"])
    return out
