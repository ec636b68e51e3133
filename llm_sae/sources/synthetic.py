"""Synthetic activations with a known dictionary: the ground truth for SAE training.

Each sample is a sparse nonnegative combination of F known unit-norm feature directions
in R^D (F > D: features in superposition), so a trained SAE can be scored on whether
its decoder found them. Feature firing frequencies follow a power law, magnitudes are
lognormal, features can co-fire in groups, and Gaussian noise and a constant offset can
be added. Batches stream: batch i is a pure function of (seed, i), nothing is stored.

API::

    from llm_sae.sources.synthetic import SyntheticConfig, SyntheticActivations, recovery_metrics

    data = SyntheticActivations(SyntheticConfig(d_in=64, n_features=512, mean_active=8, seed=0))
    data.features_FD          # [F, D] true unit-norm feature directions (fixed by the seed)
    data.frequencies_F        # [F] probability each feature is active in a sample
    x_BD = data.batch(i, 4096)                  # batch i: deterministic for (seed, i)
    x_BD, codes_BF = data.batch(i, 4096, return_codes=True)  # with the true coefficients
    for x_BD in data.batches(4096, n_batches=100, start=0): ...   # a stream of batches

    m = recovery_metrics(data.features_FD, sae.W_dec_ND)   # decoder rows are latents
    m.mean_max_cos            # mean over true features of the best |cos| to any decoder row
    m.frac_recovered          # share of true features whose best |cos| > 0.9 (threshold=)
    m.max_cos_F, m.best_latent_F   # per true feature: that best |cos|, and which latent

A planted perfect dictionary (any permutation/scaling of the features, extra rows
allowed) scores 1.0 on both; a random dictionary scores low.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from llm_sae.errors import LlmSaeError


class SyntheticError(LlmSaeError, ValueError):
    """A synthetic-data setting that cannot be generated; the message says the fix."""


@dataclasses.dataclass
class SyntheticConfig:
    d_in: int = 64
    """Width D of each activation vector."""
    n_features: int = 512
    """Number F of true feature directions (random unit vectors in R^D)."""
    mean_active: float = 8.0
    """Expected number of active features per sample (sum of all firing probabilities)."""
    zipf_exponent: float = 1.0
    """Power-law exponent a: feature i (0-based) fires with probability ∝ (i+1)^-a; 0 = uniform."""
    magnitude_sigma: float = 0.5
    """Sigma of the lognormal magnitude of an active feature (mean magnitude is 1)."""
    n_groups: int = 0
    """Features are dealt round-robin into this many co-firing groups (0 = independent)."""
    correlation: float = 0.0
    """Within-group correlation in [0, 1) of the Gaussian copula deciding which features fire;
    each feature's own firing frequency is unchanged."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to each coordinate."""
    offset_norm: float = 0.0
    """Norm of a constant random vector added to every sample (what an SAE's b_dec learns)."""
    seed: int = 0
    """Fixes the features, the frequencies and every batch."""


class SyntheticActivations:
    """A deterministic, streaming source of activations built from known features."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        F, D = cfg.n_features, cfg.d_in
        if F < 1 or D < 1:
            raise SyntheticError(
                f"need n_features ≥ 1 and d_in ≥ 1, got {F} and {D}; use a width (--d) and a "
                "feature count (--n-true) of 1 or more"
            )
        if not 0 < cfg.mean_active <= F:
            raise SyntheticError(
                f"mean_active={cfg.mean_active} must be in (0, n_features={F}]; lower it"
            )
        if not 0 <= cfg.correlation < 1:
            raise SyntheticError(f"correlation={cfg.correlation} must be in [0, 1)")
        if cfg.correlation > 0 and cfg.n_groups < 1:
            raise SyntheticError("correlation > 0 needs n_groups ≥ 1 (which features co-fire)")
        g = self._generator(0)
        feats_FD = torch.randn(F, D, generator=g, dtype=torch.float64)
        self.features_FD = (feats_FD / feats_FD.norm(dim=1, keepdim=True)).float()
        offset_D = torch.randn(D, generator=g, dtype=torch.float64)
        self.offset_D = (offset_D / offset_D.norm() * cfg.offset_norm).float()
        self.frequencies_F = _power_law_frequencies(F, cfg.mean_active, cfg.zipf_exponent)
        # The copula fires feature i when its standard-normal z_i < Φ⁻¹(p_i).
        normal = torch.distributions.Normal(0.0, 1.0)
        self._thresholds_F = normal.icdf(self.frequencies_F.clamp(1e-12, 1 - 1e-7))
        self._thresholds_F[self.frequencies_F >= 1] = math.inf
        self._group_F = torch.arange(F) % max(1, cfg.n_groups)

    def _generator(self, stream: int) -> torch.Generator:
        # Stream 0 makes the features; batch i uses stream i + 1. torch's CPU generator
        # keeps only 32 bits of its seed, so (seed, stream) is hashed into 32 well-mixed bits.
        state = np.random.SeedSequence([self.cfg.seed, stream]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def batch(
        self, index: int, batch_size: int, *, return_codes: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Batch ``index`` of ``batch_size`` samples, float32 [B, D]; the same every call.

        With ``return_codes`` also the true nonnegative coefficients [B, F], such that
        x = codes @ features_FD + offset_D + noise.
        """
        cfg = self.cfg
        if index < 0 or batch_size < 1:
            raise SyntheticError(f"need index ≥ 0 and batch_size ≥ 1, got {index}, {batch_size}")
        g = self._generator(index + 1)
        B, F = batch_size, cfg.n_features
        z_BF = torch.randn(B, F, generator=g)
        if cfg.correlation > 0:
            shared_BG = torch.randn(B, cfg.n_groups, generator=g)
            z_BF = math.sqrt(1 - cfg.correlation) * z_BF + math.sqrt(
                cfg.correlation
            ) * shared_BG.index_select(1, self._group_F)
        active_BF = z_BF < self._thresholds_F
        # Lognormal with mean 1: exp(N(-σ²/2, σ²)).
        s = cfg.magnitude_sigma
        mags_BF = torch.exp(torch.randn(B, F, generator=g) * s - s * s / 2)
        codes_BF = torch.where(active_BF, mags_BF, 0.0)
        x_BD = codes_BF @ self.features_FD + self.offset_D
        if cfg.noise_std > 0:
            x_BD += cfg.noise_std * torch.randn(B, cfg.d_in, generator=g)
        return (x_BD, codes_BF) if return_codes else x_BD

    def batches(
        self, batch_size: int, n_batches: int | None = None, start: int = 0
    ) -> Iterator[Tensor]:
        """Batches ``start``, ``start+1``, … (forever when ``n_batches`` is None)."""
        i = start
        while n_batches is None or i < start + n_batches:
            yield self.batch(i, batch_size)  # type: ignore[misc]
            i += 1


def _power_law_frequencies(F: int, mean_active: float, exponent: float) -> Tensor:
    """p_i ∝ (i+1)^-a scaled to sum to mean_active; mass above 1 is moved to rarer features."""
    w_F = torch.arange(1, F + 1, dtype=torch.float64).pow(-exponent)
    p_F = torch.zeros(F, dtype=torch.float64)
    free = torch.ones(F, dtype=torch.bool)
    budget = float(mean_active)
    # Water-filling: clip the most frequent at probability 1, rescale the rest, repeat.
    while True:
        p_F[free] = w_F[free] * (budget / w_F[free].sum())
        over = free & (p_F > 1)
        if not over.any():
            break
        p_F[over] = 1.0
        free &= ~over
        budget = mean_active - float(p_F[~free].sum())
    return p_F.float()


@dataclasses.dataclass(frozen=True)
class RecoveryMetrics:
    mean_max_cos: float
    """Mean over true features of the best |cos| to any decoder row."""
    frac_recovered: float
    """Share of true features whose best |cos| exceeds ``threshold``."""
    threshold: float
    max_cos_F: Tensor
    """Per true feature: the best |cos|."""
    best_latent_F: Tensor
    """Per true feature: the decoder row that attains it."""


def recovery_metrics(
    true_features_FD: Tensor, W_dec_ND: Tensor, threshold: float = 0.9
) -> RecoveryMetrics:
    """How well the decoder rows (one per latent) recover the true feature directions."""
    if true_features_FD.dim() != 2 or W_dec_ND.dim() != 2:
        raise SyntheticError("true_features_FD and W_dec_ND must both be 2-D")
    if true_features_FD.shape[1] != W_dec_ND.shape[1]:
        raise SyntheticError(
            f"feature width {true_features_FD.shape[1]} ≠ decoder width {W_dec_ND.shape[1]}: "
            "pass W_dec with one row per latent ([n_latents, d_in])"
        )
    with torch.no_grad():
        f_FD = _unit_rows(true_features_FD.detach().float().cpu())
        w_ND = _unit_rows(W_dec_ND.detach().float().cpu())
        max_cos_F = torch.empty(f_FD.shape[0])
        best_F = torch.empty(f_FD.shape[0], dtype=torch.long)
        step = max(1, 2**24 // max(1, w_ND.shape[0]))  # bound the [chunk, N] cosine block
        for s in range(0, f_FD.shape[0], step):
            cos_CN = (f_FD[s : s + step] @ w_ND.T).abs_()
            max_cos_F[s : s + step], best_F[s : s + step] = cos_CN.max(dim=1)
    return RecoveryMetrics(
        mean_max_cos=float(max_cos_F.mean()),
        frac_recovered=float((max_cos_F > threshold).float().mean()),
        threshold=threshold,
        max_cos_F=max_cos_F,
        best_latent_F=best_F,
    )


def _unit_rows(m: Tensor) -> Tensor:
    # A zero row (e.g. a dead, zeroed latent) has cosine 0 with everything.
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
