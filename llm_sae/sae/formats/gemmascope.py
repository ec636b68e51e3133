"""Reading Gemma Scope folders (one ``params.npz`` per SAE, as google/gemma-scope-* publish them)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from llm_sae.sae.base import SAE
from llm_sae.sae.formats.weights import InteropError, build_sae_from, get_tensor, log_threshold

GEMMASCOPE_PARAMS = "params.npz"


def load_gemmascope(path: str | Path) -> SAE:
    """A Gemma Scope JumpReLU SAE as our JumpReLU, converted as SAELens converts it.

    Gemma Scope encodes ``pre = x·W_enc + b_enc`` (no b_dec subtracted; W_enc is [D, N]),
    keeps ``pre`` where it exceeds ``threshold``, and decodes ``acts·W_dec + b_dec``. Ours
    subtracts b_dec first, so b_dec·W_enc is added to b_enc; θ becomes log θ. The file is
    read with ``allow_pickle=False``: an npz holding pickled objects is refused.
    """
    path = Path(path)
    f = path / GEMMASCOPE_PARAMS
    try:
        with np.load(f, allow_pickle=False) as npz:
            state = {k: torch.from_numpy(np.asarray(npz[k], np.float32)) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InteropError(f"cannot read {f}: {e}") from e
    W_enc_DN = get_tensor(state, "W_enc", path)
    W_dec_ND, b_enc_N, b_dec_D = (get_tensor(state, k, path) for k in ("W_dec", "b_enc", "b_dec"))
    b_enc_N = (b_enc_N.double() + b_dec_D.double() @ W_enc_DN.double()).float()
    theta_N = get_tensor(state, "threshold", path)
    return build_sae_from("jumprelu", W_enc_DN.T, b_enc_N, W_dec_ND, b_dec_D, k=None,
                          log_threshold=log_threshold(theta_N))
