"""Which peer library wrote a folder, and loading it."""

from __future__ import annotations

from pathlib import Path

from llm_sae.sae.base import SAE
from llm_sae.sae.formats.gemmascope import GEMMASCOPE_PARAMS, load_gemmascope
from llm_sae.sae.formats.saelens import SAELENS_CFG, SAELENS_WEIGHTS, load_saelens
from llm_sae.sae.formats.sparsify import (
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    is_sparsify_cfg,
    load_sparsify,
    sparsify_hookpoints,
)
from llm_sae.sae.formats.weights import InteropError


def peer_format(path: str | Path) -> str | None:
    """Which library wrote the SAE directory ``path``.

    ``"saelens"`` (cfg.json + sae_weights.safetensors), ``"sparsify"`` (cfg.json +
    sae.safetensors with sparsify's config fields), ``"sparsify-run"`` (a folder of
    per-hookpoint sparsify SAEs, as sparsify's trainer writes them), ``"gemmascope"``
    (params.npz, Gemma Scope's layout), or None (ours, or
    not an SAE at all: ``load_sae`` then says what is missing).
    """
    path = Path(path)
    if (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify" if is_sparsify_cfg(path / SPARSIFY_CFG) else None
    if (path / GEMMASCOPE_PARAMS).is_file():
        return "gemmascope"
    if path.is_dir() and sparsify_hookpoints(path):
        return "sparsify-run"
    return None


def load_peer(path: str | Path) -> SAE:
    """Load an SAE saved by SAELens, sparsify or Gemma Scope as an llm_sae SAE (eval mode, float32, CPU)."""
    path = Path(path)
    fmt = peer_format(path)
    if fmt == "saelens":
        return load_saelens(path)
    if fmt == "sparsify":
        return load_sparsify(path)
    if fmt == "gemmascope":
        return load_gemmascope(path)
    if fmt == "sparsify-run":
        hookpoints = sparsify_hookpoints(path)
        raise InteropError(
            f"{path} is a sparsify run with one SAE per hookpoint ({', '.join(hookpoints)}); "
            f"pass the hookpoint's folder, e.g. {path / hookpoints[0]}"
        )
    raise InteropError(f"{path} is not an SAE directory written by SAELens or sparsify")
