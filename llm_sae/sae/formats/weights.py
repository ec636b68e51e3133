"""Reading a peer library's weights and building our SAE from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_sae.errors import CheckpointError
from llm_sae.sae.base import SAE
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY


class InteropError(CheckpointError):
    """An SAE directory of another library that cannot be converted (the message says why)."""


def read_cfg_weights(cfg_file: Path, weights: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    try:
        return json.loads(cfg_file.read_text()), load_file(str(weights))
    except Exception as e:  # JSON and safetensors errors both mean a damaged directory
        raise InteropError(f"cannot read {cfg_file.parent}: {e}") from e


def get_tensor(state: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in state:
        raise InteropError(f"{path} has no tensor {key!r} (it has {sorted(state)})")
    return state[key]


def log_threshold(theta_N: Tensor) -> Tensor:
    """log θ for our JumpReLU, chosen so that float32 exp(log θ) == θ wherever possible.

    A plain float32 log can be off by an ulp after exp; the neighbouring floats are tried
    and the closest kept. θ ≤ 0 gives -inf: SAELens then acts as a plain ReLU
    (relu(pre)·[pre > θ]), and ours as pre·[pre > exp(-inf) = 0], the same.
    """
    target_N = theta_N.float().clamp_min(0)
    best_N = torch.where(target_N > 0, target_N.double().log().float(), float("-inf"))
    err_N = (best_N.exp() - target_N).abs()
    for direction in (float("inf"), float("-inf")):
        cand_N = best_N
        for _ in range(2):
            cand_N = torch.nextafter(cand_N, torch.full_like(cand_N, direction))
            e_N = (cand_N.exp() - target_N).abs()
            better_N = e_N < err_N
            best_N, err_N = torch.where(better_N, cand_N, best_N), torch.where(better_N, e_N, err_N)
    return best_N


def build_sae_from(
    arch: str,
    W_enc_ND: Tensor,
    b_enc_N: Tensor,
    W_dec_ND: Tensor,
    b_dec_D: Tensor,
    *,
    k: int | None,
    transcoder: bool = False,
    **extra: Tensor,
) -> SAE:
    """Our SAE of ``arch`` holding exactly these weights (float32, eval mode).

    With ``transcoder`` the decoder may write another width E (W_dec [N, E], b_dec [E]) and
    a ``W_skip`` [E, D] among ``extra`` makes it a skip transcoder.
    """
    N, E = W_dec_ND.shape
    D = W_enc_ND.shape[-1] if transcoder else E
    skip_ED = extra.get("W_skip")
    if (W_enc_ND.shape != (N, D) or b_enc_N.shape != (N,) or b_dec_D.shape != (E,)
            or (skip_ED is not None and skip_ED.shape != (E, D))):
        raise InteropError(
            f"inconsistent shapes: W_enc {tuple(W_enc_ND.shape)}, W_dec {tuple(W_dec_ND.shape)}, "
            f"b_enc {tuple(b_enc_N.shape)}, b_dec {tuple(b_dec_D.shape)}"
            + ("" if skip_ED is None else f", W_skip {tuple(skip_ED.shape)}")
        )
    if k is not None and not 0 < k < N:
        raise InteropError(f"k={k} does not fit {N} latents")
    # k only matters at inference for TopK; for the others it is a training knob, but it
    # must still be a valid one.
    cfg = SAEConfig(
        arch=arch, d_in=D, n_latents=N, k=k if k is not None else min(SAEConfig.k, N - 1),
        d_out=E if transcoder else None, skip=skip_ED is not None,
    )
    sae = REGISTRY[arch](cfg)
    state = {"W_enc": W_enc_ND, "b_enc": b_enc_N, "W_dec": W_dec_ND, "b_dec": b_dec_D, **extra}
    sae.load_state_dict({k_: v.detach().float().contiguous() for k_, v in state.items()})
    return sae.eval()
