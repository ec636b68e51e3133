"""What defines an SAE: its shape, its sparsity mechanism and that mechanism's knobs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llm_sae.config import ConfigError
from llm_sae.sae.archs import PARAMS
from llm_sae.sae.registry import REGISTRY

# The classic and modern architectures `llm-sae bench recovery` compares by default.
ARCH_DEFAULTS = ("aux_coef", "relative_fade", "matryoshka_inner_weight")
"""Fields whose default (None) is the architecture's ``default_<field>`` (``ops.arch_setting``)."""

ARCHS = ("topk", "batchtopk", "matryoshka", "relu_l1", "jumprelu", "kl_sigmoid", "wta")


@dataclass(kw_only=True)
class CommonParams:
    """What every SAE has: its shape, its architecture and its dead-latent loss."""

    arch: str = "topk"
    """SAE architecture: topk, batchtopk, matryoshka, relu_l1, jumprelu, kl_sigmoid, wta or lista."""
    d_in: int = 0
    """Input width (the model's d_model at the hook); taken from the store when training."""
    n_latents: int | None = None
    """Number of latents (dictionary size); default: expansion × d_in."""
    k: int = 32
    """Sparsity target, active latents per token: exact for topk, the batch average for
    batchtopk and wta, the L0 target for jumprelu, and k/n_latents is the default target
    mean activation for kl_sigmoid."""
    aux_k: int | None = None
    """Latents used by the AuxK loss to model the residual error (default: d_in/2, at most 512)."""
    aux_coef: float | None = None
    """Weight of the AuxK dead-latent loss (default: the architecture's, 1/32 as Gao et al.
    2024, and 1 for batchtopk, matryoshka (SAELens's) and jumprelu: with their row-relative
    early training, at 1/32 a 2M-token ``bench recovery`` run ended with 17% (batchtopk)
    and 13% (jumprelu) dead latents, at 1 with 2%)."""
    d_out: int | None = None
    """Output width of a transcoder (it predicts another hook's activations from its input);
    None for an SAE, which reconstructs its input. Taken from the target store when training."""
    skip: bool = False
    """Transcoders only: add a linear skip path W_skip from input to output (a skip
    transcoder, Paulo et al. 2025), so the latents model only what a linear map misses."""


@dataclass(kw_only=True)
class SAEConfig(*reversed(PARAMS), CommonParams):  # type: ignore[misc]
    """What defines an SAE: the common fields and every architecture's own parameters.

    Each architecture declares its knobs in its own dataclass in ``llm_sae/sae/archs/``
    (listed in ``PARAMS`` there); this flat view of them all is what the CLI, config files
    and ``cfg.json`` use, so every flag keeps one name whatever the architecture.
    """

    def resolved(self) -> SAEConfig:
        """Only the SAE's own fields (a TrainConfig is an SAEConfig), with checks."""
        names = [f.name for f in dataclasses.fields(SAEConfig)]
        cfg = SAEConfig(**{n: getattr(self, n) for n in names})
        if cfg.arch not in REGISTRY:
            raise ConfigError(f"unknown SAE architecture {cfg.arch!r}; choose one of {sorted(REGISTRY)}")
        if cfg.d_in <= 0:
            raise ConfigError(f"d_in must be positive, got {cfg.d_in}")
        if cfg.n_latents is None or cfg.n_latents <= 0:
            raise ConfigError(f"n_latents must be positive, got {cfg.n_latents}")
        if not 0 < cfg.k < cfg.n_latents:
            raise ConfigError(
                f"k={cfg.k} must be at least 1 and below n_latents={cfg.n_latents}; "
                "lower --k or raise --expansion/--n-latents"
            )
        for name in ARCH_DEFAULTS:  # written out, so cfg.json and checkpoints record them
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(REGISTRY[cfg.arch], f"default_{name}", None))
        if not 0 <= cfg.relative_selection <= 1 or (cfg.relative_fade or 0) < 0:
            raise ConfigError(
                f"relative_selection must be in [0, 1] and relative_fade >= 0, got "
                f"{cfg.relative_selection} and {cfg.relative_fade}"
            )
        if cfg.d_out is not None and cfg.d_out <= 0:
            raise ConfigError(f"d_out must be positive, got {cfg.d_out}")
        if cfg.skip and cfg.d_out is None:
            raise ConfigError("--skip needs a transcoder: give a --target-store (the output hook's store)")
        REGISTRY[cfg.arch].check_config(cfg)
        return cfg
