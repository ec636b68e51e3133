"""Reading SAELens folders (cfg.json + sae_weights.safetensors)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_sae.sae.base import SAE
from llm_sae.sae.formats.weights import (
    InteropError,
    build_sae_from,
    get_tensor,
    read_cfg_weights,
)

SAELENS_CFG = "cfg.json"


SAELENS_WEIGHTS = "sae_weights.safetensors"


# SAELens architecture → ours. A SAELens BatchTopK is saved as "jumprelu" by SAELens itself.
SAELENS_TO_OURS = {"standard": "relu_l1", "topk": "topk", "jumprelu": "jumprelu"}


# SAELens transcoder architectures → (ours, with a skip path). Their encoders never subtract
# b_dec (it lives in the output space), as ours for a transcoder.
SAELENS_TRANSCODERS = {
    "transcoder": ("relu_l1", False),
    "skip_transcoder": ("relu_l1", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}


# Input normalisations SAELens applies per token at run time: not foldable into weights.
_SAELENS_RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale")


def load_saelens(path: str | Path) -> SAE:
    """An SAE saved by SAELens (v6 ``save_model``/``save_inference_model``) as ours.

    SAELens's W_enc is [d_in, d_sae]; ours is [N, D]. ``apply_b_dec_to_input=False`` moves
    b_dec into b_enc; ``rescale_acts_by_decoder_norm`` is folded into the weights; a JumpReLU
    threshold θ becomes log θ. See docs/interop.md.
    """
    path = Path(path)
    cfg, state = read_cfg_weights(path / SAELENS_CFG, path / SAELENS_WEIGHTS)
    cfg = _saelens_v6(cfg)
    arch = cfg["architecture"]
    transcoder = arch in SAELENS_TRANSCODERS
    ours, skip = SAELENS_TRANSCODERS.get(arch, (SAELENS_TO_OURS.get(arch), False))
    if ours is None:
        raise InteropError(
            f"{path} holds a SAELens {arch!r} SAE; llm_sae can import "
            f"{sorted(SAELENS_TO_OURS) + sorted(SAELENS_TRANSCODERS)} "
            "(a SAELens BatchTopK is saved as 'jumprelu' and imports as such)"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm in _SAELENS_RUNTIME_NORMS:
        raise InteropError(
            f"{path}: normalize_activations={norm!r} rescales each token at run time, which "
            "cannot be folded into the weights of an llm_sae SAE"
        )
    if norm not in ("none", None):
        raise InteropError(
            f"{path}: normalize_activations={norm!r} means the weights expect inputs scaled by "
            "a factor SAELens keeps outside this directory; fold it first in SAELens "
            "(sae.fold_activation_norm_scaling_factor(f) or fold_activation_whitening, then "
            "sae.save_model(dir)) and import that directory"
        )
    if "scaling_factor" in state and not torch.all(state["scaling_factor"] == 1):
        raise InteropError(
            f"{path} has a pre-6 SAELens finetuning scaling_factor; load and save it with "
            "SAELens 6 (SAE.load_from_disk(dir).save_model(new_dir)) and import that directory"
        )
    W_enc_ND = get_tensor(state, "W_enc", path).T
    W_dec_ND, b_enc_N, b_dec_D = (get_tensor(state, k, path) for k in ("W_dec", "b_enc", "b_dec"))
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        # SAELens: pre = x·W_enc + b_enc. Ours subtracts b_dec first, so add it back via b_enc.
        b_enc_N = b_enc_N + W_enc_ND.double() @ b_dec_D.double()
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens: pre·‖W_dec_i‖ for selection, acts/‖W_dec_i‖ when decoding. Folded:
        # encoder row i and b_enc_i times ‖W_dec_i‖, decoder row i divided by it.
        n_N = W_dec_ND.double().norm(dim=1)
        W_enc_ND, b_enc_N = W_enc_ND * n_N[:, None], b_enc_N * n_N
        W_dec_ND = W_dec_ND / n_N[:, None]
    extra: dict[str, Tensor] = {"W_skip": get_tensor(state, "W_skip", path)} if skip else {}
    if ours == "jumprelu":
        if "threshold" not in state and "log_threshold" in state:  # older SAELens saves
            extra["threshold"] = state["log_threshold"].exp()
        else:  # SAELens gates relu(pre) at θ: below 0 that is ours at θ = 0
            extra["threshold"] = get_tensor(state, "threshold", path).clamp_min(0)
    k = None
    if arch == "topk":
        try:
            k = int(cfg["k"])
        except (KeyError, TypeError, ValueError):
            raise InteropError(
                f"{path / SAELENS_CFG} is a SAELens topk SAE with no usable k ({cfg.get('k')!r}); "
                "add \"k\": N (its active latents per token) to that file"
            ) from None
    return build_sae_from(ours, W_enc_ND, b_enc_N, W_dec_ND, b_dec_D, k=k, transcoder=transcoder, **extra)


def _saelens_v6(cfg: dict[str, Any]) -> dict[str, Any]:
    """A SAELens cfg in v6 terms. Pre-6 saves (no sae_lens_version) are read the way SAELens's
    own loader reads them: standard unless activation_fn is topk with a k."""
    cfg = dict(cfg)
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    major = re.match(r"\d+", str(version or ""))
    if major is None or int(major.group()) < 6:
        cfg.setdefault("apply_b_dec_to_input", True)
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if fn == "topk" and k is not None:
            cfg["architecture"], cfg["k"] = "topk", k
    cfg.setdefault("architecture", "standard")
    return cfg
