"""Reading sparsify folders (one cfg.json + sae.safetensors per hookpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from llm_sae.sae.base import SAE
from llm_sae.sae.formats.weights import InteropError, build_sae_from, get_tensor, read_cfg_weights

SPARSIFY_CFG = "cfg.json"


SPARSIFY_WEIGHTS = "sae.safetensors"


def is_sparsify_cfg(cfg_file: Path) -> bool:
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return False  # a damaged cfg.json: load_sae reports it
    return (
        isinstance(cfg, dict)
        and "arch" not in cfg
        and {"d_in", "k"} <= set(cfg)
        and ("num_latents" in cfg or "expansion_factor" in cfg)
    )


def sparsify_hookpoints(path: Path) -> list[str]:
    return sorted(
        d.name
        for d in path.iterdir()
        if d.is_dir() and (d / SPARSIFY_WEIGHTS).is_file() and is_sparsify_cfg(d / SPARSIFY_CFG)
    )


def load_sparsify(path: str | Path) -> SAE:
    """An SAE or transcoder saved by sparsify (``SparseCoder.save_to_disk``) as our TopK.

    sparsify's layout is ours already: encoder.weight [N, D], W_dec [N, D], b_dec
    subtracted before encoding, ReLU then top-k. A transcoder (``transcode: true``) reads
    its input as is, as ours do; ``W_skip`` [D, D] is our skip path. An SAE with a skip
    connection but ``transcode: false`` subtracts b_dec first: that becomes a transcoder
    with ``d_out = d_in`` whose b_enc absorbs −W_enc·b_dec (in float64).
    """
    path = Path(path)
    cfg, state = read_cfg_weights(path / SPARSIFY_CFG, path / SPARSIFY_WEIGHTS)
    skip = bool(cfg.get("skip_connection")) or "W_skip" in state
    if cfg.get("activation", "topk") != "topk":
        raise InteropError(
            f"{path} uses sparsify's {cfg.get('activation')!r} activation; only 'topk' has an "
            "llm_sae counterpart"
        )
    W_enc_ND, b_enc_N, b_dec_D = (get_tensor(state, k, path) for k in ("encoder.weight", "encoder.bias", "b_dec"))
    transcoder = bool(cfg.get("transcode")) or skip
    if skip and not cfg.get("transcode"):
        b_enc_N = (b_enc_N.double() - W_enc_ND.double() @ b_dec_D.double()).float()
    extra = {"W_skip": get_tensor(state, "W_skip", path)} if skip else {}
    return build_sae_from(
        "topk", W_enc_ND, b_enc_N, get_tensor(state, "W_dec", path), b_dec_D,
        k=int(cfg["k"]), transcoder=transcoder, **extra,
    )
