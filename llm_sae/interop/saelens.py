"""Writing our SAEs in SAELens's layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from llm_sae.common.faults import maybe_kill
from llm_sae.config import to_dict
from llm_sae.errors import LlmSaeError
from llm_sae.interop.saelens_transcoder import saelens_transcoder_arch
from llm_sae.sae.base import SAE
from llm_sae.sae.formats.meta import recorded_model_and_hook, recorded_source
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.formats.saelens import SAELENS_CFG, SAELENS_WEIGHTS
from llm_sae.sae.formats.weights import InteropError

SAELENS_FORMAT_VERSION = "6.54.12"

"""The SAELens release whose on-disk format the export writes (and the tests load it with)."""


# Ours → SAELens. batchtopk, matryoshka and wta are thresholded ReLUs at inference: JumpReLU exactly.
OURS_TO_SAELENS = {
    "relu_l1": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "wta": "jumprelu",
}


# Export: our SAE → a SAELens directory
_NO_COUNTERPART = {
    "kl_sigmoid": "its units are sigmoids",
    "lista": "its encoder is T unrolled ISTA steps with a lateral matrix",
}


def saelens_weights(sae: SAE) -> tuple[str, dict[str, Tensor]]:
    """SAELens's architecture name and state dict for ``sae`` (inference behaviour equal)."""
    arch = sae.cfg.arch
    name = saelens_transcoder_arch(sae) if sae.is_transcoder else OURS_TO_SAELENS.get(arch)
    if name is None:
        raise InteropError(
            f"SAELens has no counterpart of llm_sae's {arch!r} SAE "
            f"({_NO_COUNTERPART.get(arch, 'no SAELens architecture computes it')}); "
            f"export one of {sorted(OURS_TO_SAELENS)}"
        )
    state = {
        "W_enc": sae.W_enc.detach().T,  # SAELens: [d_in, d_sae]
        "W_dec": sae.W_dec.detach(),
        "b_enc": sae.b_enc.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if arch == "jumprelu":
        state["threshold"] = sae.threshold.detach()
    elif arch in ("batchtopk", "matryoshka"):
        # Eval mode keeps relu(pre) > max(θ, 0): one global threshold, as SAELens saves it.
        state["threshold"] = sae.threshold.detach().clamp_min(0).expand(sae.n_latents)
    elif arch == "wta":
        state["threshold"] = sae.threshold.detach().clamp_min(0)
    if sae.cfg.skip:
        state["W_skip"] = sae.W_skip.detach()  # [d_out, d_in] in both
    return name, {k: v.float().contiguous().cpu() for k, v in state.items()}


def saelens_cfg(
    sae: SAE, arch: str, *, hook_name: str | None, model_name: str | None, context_size: int | None,
    hook_name_out: str | None = None,
) -> dict[str, Any]:
    """SAELens v6 cfg.json for ``sae``, with the field names SAELens writes itself."""
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # our saved SAEs take raw activations already
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # not trained by SAELens
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "context_size": context_size,
            "prepend_bos": True,  # our harvest's contexts start with BOS
            "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {},
            "llm_sae": {"cfg": to_dict(sae.cfg)},
        },
    }
    if arch == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False  # ReLU-then-top-k on the raw pre-activations
    if sae.is_transcoder:  # SAELens refuses b_dec on a transcoder's input; ours never does it
        cfg.update(d_out=sae.d_out, apply_b_dec_to_input=False)
        cfg["metadata"]["hook_name_out"] = hook_name_out
    return cfg


def export_saelens(
    sae: SAE | str | Path,
    out_dir: str | Path,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    context_size: int | None = None,
    hook_name_out: str | None = None,
) -> Path:
    """Write ``sae`` (an SAE or a saved SAE's directory) as a SAELens directory.

    ``out_dir`` gets ``cfg.json`` and ``sae_weights.safetensors``, loadable with
    ``sae_lens.SAE.load_from_disk(out_dir)``. Hook, model and context size default to
    those of the store the SAE was trained on, when its train_cfg.json names one. A
    transcoder loads as SAELens's ``Transcoder``, ``SkipTranscoder`` or their JumpReLU
    forms; ``hook_name_out`` (default: its target store's hook) goes into the metadata.
    """
    from safetensors.torch import save_file

    known = _provenance(Path(sae)) if isinstance(sae, (str, Path)) else {}
    if isinstance(sae, (str, Path)):
        sae = load_sae(sae)
    arch, state = saelens_weights(sae)
    cfg = saelens_cfg(
        sae,
        arch,
        hook_name=hook_name or known.get("hook"),
        model_name=model_name or known.get("model"),
        context_size=context_size or known.get("context_length"),
        hook_name_out=hook_name_out or known.get("hook_out"),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / SAELENS_WEIGHTS))
    maybe_kill("mid_output")
    (out / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _provenance(sae_dir: Path) -> dict[str, Any]:
    """Model, hook and context length of the data an SAE was trained on: as train_cfg.json
    records them (from any working directory), else from its store if still there."""
    from llm_sae.store.store import open_store

    model, hook = recorded_model_and_hook(sae_dir)
    known = {k: v for k, v in (("model", model), ("hook", hook),
                               ("context_length", recorded_source(sae_dir).get("context_length"))) if v}
    try:  # a transcoder: the hook it predicts, from its target store
        target = json.loads((sae_dir / "train_cfg.json").read_text()).get("target_store")
        if target:
            known["hook_out"] = open_store(target).hook
    except (OSError, ValueError, TypeError, AttributeError, LlmSaeError):
        pass
    if {"model", "hook", "context_length"} <= set(known):
        return known
    try:
        store = open_store(json.loads((sae_dir / "train_cfg.json").read_text())["store"])
        found = {"model": store.model, "hook": store.hook, "context_length": store.context_length}
    except (OSError, ValueError, KeyError, TypeError, LlmSaeError):
        found = {}
    return {**found, **known}
