"""Dead latents: how long since each latent fired, and Anthropic-style resampling.

A latent is dead once it has not fired for ``dead_tokens`` tokens. AuxK (in the SAE) reads
the mask; ``resample`` restarts dead latents at badly reconstructed inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm_sae.sae.base import SAE

METHODS = ("auxk", "resample", "none")


class DeadLatents:
    """Per-latent token counts since the last firing, on the SAE's device (no host sync)."""

    def __init__(self, n_latents: int, device: torch.device, dead_tokens: int) -> None:
        self.dead_tokens = int(dead_tokens)
        self.tokens_since_fired_N = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.n_resampled = 0
        self.last_resample_tokens = 0

    def mask(self) -> Tensor:
        return self.tokens_since_fired_N >= self.dead_tokens

    def update(self, fired_N: Tensor, n_tokens: int) -> None:
        """After a step of ``n_tokens`` tokens in which latent i fired on ``fired_N[i]`` rows."""
        self.tokens_since_fired_N += n_tokens
        self.tokens_since_fired_N.masked_fill_(fired_N > 0, 0)

    @torch.no_grad()
    def resample(self, sae: SAE, opt: torch.optim.Optimizer, x_BD: Tensor, x_hat_BD: Tensor) -> int:
        """Dead latents restart at badly reconstructed inputs (Anthropic, 2023).

        Inputs are drawn with probability ∝ (squared error)²; the atom becomes the
        (centred, normalised) input, the encoder row the same direction at 0.2× the mean
        alive encoder norm, b_enc 0, and their Adam moments are reset.
        """
        dead_M = self.mask().nonzero().squeeze(1)
        n_dead = dead_M.numel()
        if n_dead == 0:
            return 0
        loss_B = (x_BD - x_hat_BD).pow(2).sum(-1)
        p_B = loss_B.pow(2)
        p_B = p_B if float(p_B.sum()) > 0 else torch.ones_like(p_B)
        pick_M = torch.multinomial(p_B, n_dead, replacement=n_dead > x_BD.shape[0])
        v_MD = x_BD[pick_M] - sae.b_dec
        v_MD = v_MD / v_MD.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive_N = ~self.mask()
        enc_norm = float(sae.W_enc[alive_N].norm(dim=1).mean()) if bool(alive_N.any()) else 1.0
        dec_norm = 1.0 if sae.unit_norm_decoder or not bool(alive_N.any()) else float(sae.W_dec[alive_N].norm(dim=1).mean())
        sae.W_dec[dead_M] = v_MD * dec_norm
        sae.W_enc[dead_M] = v_MD * (0.2 * enc_norm)
        sae.b_enc[dead_M] = 0.0
        for p in (sae.W_dec, sae.W_enc, sae.b_enc):
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead_M] = 0.0
        self.tokens_since_fired_N[dead_M] = 0
        self.n_resampled += n_dead
        return n_dead
