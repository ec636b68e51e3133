"""LISTA (Gregor & LeCun 2010): an SAE whose encoder is T unrolled, learned ISTA steps.

ISTA solves min_z ½‖x − b − zD‖² + λ‖z‖₁ by repeating z ← S_θ(x·Dᵀ/L + z·(I − D·Dᵀ/L)),
θ = λ/L. LISTA keeps that loop for a fixed number of steps T but learns its matrices::

    c_BN = (x_BD − b_dec) @ W_encᵀ                   # computed once, as in every SAE
    z_BN = relu(c_BN − θ)                            # step 0: a one-layer encoder
    repeat T times:  z_BN = relu(c_BN + z_BN @ Sᵀ − θ)
    x_hat_BD = z_BN @ W_dec + b_dec                  # the same unit-norm dictionary

with learned W_enc [N, D], lateral matrix S [N, N] and per-latent thresholds θ = exp(·) > 0,
trained end to end on reconstruction + l1_coef·‖z‖₁: the amortized form of the very
problem FISTA solves per row (``llm_sae.sparse_coding``), so more steps close more of the
amortization gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_sae.config import ConfigError
from llm_sae.sae.base import SAE
from llm_sae.sae.ops import warmup
from llm_sae.sae.registry import register
from llm_sae.sae.sparse_coding import lipschitz_constant

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig

MAX_LATENTS = 16384
"""S is N×N: at 16,384 latents it is 1 GiB in float32 (3 GiB with Adam's moments)."""


@dataclass(kw_only=True)
class LISTAParams:
    lista_steps: int = 3
    """lista: unrolled ISTA steps T after the one-layer first guess (0 = a ReLU encoder)."""


@register
class LISTASAE(SAE):
    """LISTA encoder: ``lista_steps`` = T learned ISTA steps after a one-layer first guess.

    Choices (see docs/classic.md):

    - **Nonnegative codes.** The shrinkage is the nonnegative soft threshold
      relu(u − θ), the prox of λ‖z‖₁ restricted to z ≥ 0, so codes are comparable with the
      other SAEs' (and with ``fista(..., nonnegative=True)``), and T = 0 is exactly a
      ReLU encoder with bias −θ.
    - **θ > 0 per latent**, stored as ``log_threshold``. ``b_enc`` is kept at 0 and frozen:
      with nonnegative codes only b_enc − θ matters at every step, so a trainable b_enc
      would only undo the sign constraint.
    - **ISTA initialisation** (Gregor & LeCun): W_enc = W_dec / L, S = I − W_dec·W_decᵀ / L,
      θ = (l1_coef/2) / L, with L the largest eigenvalue of W_dec·W_decᵀ. Untrained, the
      encoder is T + 1 ISTA iterations from z = 0 for the penalty the training loss uses
      (the loss sums the squared error without the ½, hence λ = l1_coef/2).
    - **Unit-norm dictionary** and an L1 penalty l1_coef·Σ z that warms up like relu_l1's.
    - **Memory and time**: S is N×N and every step is a [B, N]×[N, N] product, so LISTA is
      for the small dictionaries of the classic experiments (N ≤ 16,384; an error above).
    """

    arch = "lista"
    default_dead_latents = "resample"
    max_latents: ClassVar[int] = MAX_LATENTS

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        T, N = self.cfg.lista_steps, self.n_latents
        if T < 0:
            raise ConfigError(f"lista_steps must be 0 or more, got {T}")
        if T > 0 and N > self.max_latents:
            gib = N * N * 4 / 2**30
            raise ConfigError(
                f"lista keeps an N×N lateral matrix: n_latents={N} needs {gib:.1f} GiB for it "
                f"(3× that with Adam); use n_latents ≤ {self.max_latents}, --lista-steps 0, "
                "or another --arch"
            )
        W_dec_ND = self.W_dec.detach()
        L = max(lipschitz_constant(W_dec_ND), 1e-12)
        lam = max(self.cfg.l1_coef / 2, 1e-6)
        with torch.no_grad():
            self.W_enc.div_(L)
        self.b_enc.requires_grad_(False)
        self.log_threshold = nn.Parameter(torch.full((N,), math.log(lam / L)))
        self.S = nn.Parameter(torch.eye(N) - W_dec_ND @ W_dec_ND.T / L) if T > 0 else None

    @property
    def steps(self) -> int:
        return self.cfg.lista_steps

    def activate(self, pre_BN: Tensor) -> Tensor:
        theta_N = self.log_threshold.exp()
        z_BN = F.relu(pre_BN - theta_N)
        for _ in range(self.steps):
            z_BN = F.relu(pre_BN + F.linear(z_BN, self.S) - theta_N)
        return z_BN

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        coef = self.cfg.l1_coef * warmup(self.progress, self.cfg.sparsity_warmup)
        l1 = z_BN.sum(-1).mean()  # z ≥ 0 and unit-norm atoms: the plain L1 norm
        return coef * l1, {"l1": l1.detach()}

    def _scale_latents(self, factor: float) -> None:
        # relu is positively homogeneous and S maps latents to latents, so scaling every
        # code by `factor` only needs θ scaled with it.
        self.log_threshold += math.log(factor)
