"""Loading a saved SAE: this project's folder, or a SAELens or sparsify one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_sae.config import from_dict
from llm_sae.errors import CheckpointError
from llm_sae.sae.base import SAE
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a saved SAE for inference (eval mode, no training state).

    Directories written by SAELens, sparsify or Gemma Scope load too, converted exactly
    (docs/interop.md), and so do published ones: ``hf://ORG/REPO[/SUBFOLDER]`` and
    ``saelens://RELEASE/SAE_ID`` (fetched into the hub cache; see ``formats/hub.py``).
    """
    from safetensors.torch import load_file

    from llm_sae.sae.formats.hub import resolve_sae
    from llm_sae.sae.formats.peers import (  # lazy: interop imports this module
        load_peer,
        peer_format,
    )

    path = resolve_sae(path)
    if peer_format(path) is not None:
        return load_peer(path).to(device).eval()
    cfg_file, weights = path / "cfg.json", path / "sae.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path} is not a saved SAE: it needs cfg.json and sae.safetensors "
            "(written by `llm-sae train` or SAE.save)"
        )
    try:
        data = json.loads(cfg_file.read_text())
        cfg = from_dict(SAEConfig, data)
        state = load_file(str(weights))
    except Exception as e:  # JSON, config and safetensors errors all mean a damaged save
        raise CheckpointError(f"cannot read the SAE in {path}: {e}; re-save or re-train it") from e
    sae = REGISTRY[cfg.arch](cfg) if cfg.arch in REGISTRY else None
    if sae is None:
        raise CheckpointError(f"{cfg_file} names unknown architecture {cfg.arch!r}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {weights} do not fit {cfg_file}: {e}") from e
    return sae.to(device).eval()
