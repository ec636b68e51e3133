"""Sparse autoencoders: the config, the base class, one file per architecture in ``archs``,
and readers for saved SAEs in ``formats`` (ours, SAELens's, sparsify's)."""

from llm_sae.sae import archs as _archs  # noqa: F401  (registers every architecture)
from llm_sae.sae.base import SAE, ForwardOutput
from llm_sae.sae.config import ARCHS, SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.registry import REGISTRY, register

__all__ = ["SAE", "SAEConfig", "ForwardOutput", "REGISTRY", "ARCHS", "register", "load_sae"]
