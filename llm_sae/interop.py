"""Meet the ecosystem where it is: load SAEs saved by SAELens and sparsify as our own SAE
objects, write our SAEs as SAELens directories, and write an analysis in Neuronpedia's
batch JSONL export format. Every convention that differs is mapped in ``docs/interop.md``.

Conversions are exact in the math (layout, b_dec handling, decoder-norm scaling,
threshold parameterisation); what float rounding they leave is measured by
``tests/test_interop.py``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_sae.config import ConfigError, add_arguments, from_args, to_dict
from llm_sae.errors import CheckpointError, LlmSaeError
from llm_sae.sae import REGISTRY, SAE, SAEConfig, load_sae

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose on-disk format the export writes (and the tests load it with)."""

# SAELens architecture → ours. A SAELens BatchTopK is saved as "jumprelu" by SAELens itself.
SAELENS_TO_OURS = {"standard": "relu_l1", "topk": "topk", "jumprelu": "jumprelu"}
# Ours → SAELens. batchtopk and wta are thresholded ReLUs at inference: JumpReLU exactly.
OURS_TO_SAELENS = {
    "relu_l1": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "wta": "jumprelu",
}
# Input normalisations SAELens applies per token at run time: not foldable into weights.
_SAELENS_RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale")


class InteropError(CheckpointError):
    """An SAE directory of another library that cannot be converted (the message says why)."""


# ======================================================================================
# Import: SAELens and sparsify directories → our SAE objects


def peer_format(path: str | Path) -> str | None:
    """Which library wrote the SAE directory ``path``.

    ``"saelens"`` (cfg.json + sae_weights.safetensors), ``"sparsify"`` (cfg.json +
    sae.safetensors with sparsify's config fields), ``"sparsify-run"`` (a folder of
    per-hookpoint sparsify SAEs, as sparsify's trainer writes them), or None (ours, or
    not an SAE at all: ``load_sae`` then says what is missing).
    """
    path = Path(path)
    if (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify" if _is_sparsify_cfg(path / SPARSIFY_CFG) else None
    if path.is_dir() and _sparsify_hookpoints(path):
        return "sparsify-run"
    return None


def _is_sparsify_cfg(cfg_file: Path) -> bool:
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


def _sparsify_hookpoints(path: Path) -> list[str]:
    return sorted(
        d.name
        for d in path.iterdir()
        if d.is_dir() and (d / SPARSIFY_WEIGHTS).is_file() and _is_sparsify_cfg(d / SPARSIFY_CFG)
    )


def load_peer(path: str | Path) -> SAE:
    """Load an SAE saved by SAELens or sparsify as an llm_sae SAE (eval mode, float32, CPU)."""
    path = Path(path)
    fmt = peer_format(path)
    if fmt == "saelens":
        return load_saelens(path)
    if fmt == "sparsify":
        return load_sparsify(path)
    if fmt == "sparsify-run":
        hookpoints = _sparsify_hookpoints(path)
        raise InteropError(
            f"{path} is a sparsify run with one SAE per hookpoint ({', '.join(hookpoints)}); "
            f"pass the hookpoint's folder, e.g. {path / hookpoints[0]}"
        )
    raise InteropError(f"{path} is not an SAE directory written by SAELens or sparsify")


def load_saelens(path: str | Path) -> SAE:
    """An SAE saved by SAELens (v6 ``save_model``/``save_inference_model``) as ours.

    SAELens's W_enc is [d_in, d_sae]; ours is [N, D]. ``apply_b_dec_to_input=False`` moves
    b_dec into b_enc; ``rescale_acts_by_decoder_norm`` is folded into the weights; a JumpReLU
    threshold θ becomes log θ. See docs/interop.md.
    """
    path = Path(path)
    cfg, state = _read(path / SAELENS_CFG, path / SAELENS_WEIGHTS)
    cfg = _saelens_v6(cfg)
    arch = cfg["architecture"]
    if arch not in SAELENS_TO_OURS:
        raise InteropError(
            f"{path} holds a SAELens {arch!r} SAE; llm_sae can import {sorted(SAELENS_TO_OURS)} "
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
    W_enc_ND = _get(state, "W_enc", path).T
    W_dec_ND, b_enc_N, b_dec_D = (_get(state, k, path) for k in ("W_dec", "b_enc", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens: pre = x·W_enc + b_enc. Ours subtracts b_dec first, so add it back via b_enc.
        b_enc_N = b_enc_N + W_enc_ND.double() @ b_dec_D.double()
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens: pre·‖W_dec_i‖ for selection, acts/‖W_dec_i‖ when decoding. Folded:
        # encoder row i and b_enc_i times ‖W_dec_i‖, decoder row i divided by it.
        n_N = W_dec_ND.double().norm(dim=1)
        W_enc_ND, b_enc_N = W_enc_ND * n_N[:, None], b_enc_N * n_N
        W_dec_ND = W_dec_ND / n_N[:, None]
    extra: dict[str, Tensor] = {}
    if arch == "jumprelu":
        if "threshold" not in state and "log_threshold" in state:  # older SAELens saves
            extra["log_threshold"] = state["log_threshold"]
        else:
            extra["log_threshold"] = log_threshold(_get(state, "threshold", path))
    k = int(cfg["k"]) if arch == "topk" else None
    return _build(SAELENS_TO_OURS[arch], W_enc_ND, b_enc_N, W_dec_ND, b_dec_D, k=k, **extra)


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


def load_sparsify(path: str | Path) -> SAE:
    """An SAE saved by sparsify (``SparseCoder.save_to_disk``) as our TopK.

    sparsify's layout is ours already: encoder.weight [N, D], W_dec [N, D], b_dec
    subtracted before encoding, ReLU then top-k.
    """
    path = Path(path)
    cfg, state = _read(path / SPARSIFY_CFG, path / SPARSIFY_WEIGHTS)
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in state:
        raise InteropError(
            f"{path} is a sparsify transcoder (transcode/skip_connection): it predicts another "
            "hook's activations, while an llm_sae SAE reconstructs its input"
        )
    if cfg.get("activation", "topk") != "topk":
        raise InteropError(
            f"{path} uses sparsify's {cfg.get('activation')!r} activation; only 'topk' has an "
            "llm_sae counterpart"
        )
    W_enc_ND = _get(state, "encoder.weight", path)
    return _build(
        "topk",
        W_enc_ND,
        _get(state, "encoder.bias", path),
        _get(state, "W_dec", path),
        _get(state, "b_dec", path),
        k=int(cfg["k"]),
    )


def _read(cfg_file: Path, weights: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    try:
        return json.loads(cfg_file.read_text()), load_file(str(weights))
    except Exception as e:  # JSON and safetensors errors both mean a damaged directory
        raise InteropError(f"cannot read {cfg_file.parent}: {e}") from e


def _get(state: dict[str, Tensor], key: str, path: Path) -> Tensor:
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


def _build(
    arch: str,
    W_enc_ND: Tensor,
    b_enc_N: Tensor,
    W_dec_ND: Tensor,
    b_dec_D: Tensor,
    *,
    k: int | None,
    **extra: Tensor,
) -> SAE:
    """Our SAE of ``arch`` holding exactly these weights (float32, eval mode)."""
    N, D = W_dec_ND.shape
    if W_enc_ND.shape != (N, D) or b_enc_N.shape != (N,) or b_dec_D.shape != (D,):
        raise InteropError(
            f"inconsistent shapes: W_enc {tuple(W_enc_ND.shape)}, W_dec {tuple(W_dec_ND.shape)}, "
            f"b_enc {tuple(b_enc_N.shape)}, b_dec {tuple(b_dec_D.shape)}"
        )
    if k is not None and not 0 < k < N:
        raise InteropError(f"k={k} does not fit {N} latents")
    # k only matters at inference for TopK; for the others it is a training knob, but it
    # must still be a valid one.
    cfg = SAEConfig(
        arch=arch, d_in=D, n_latents=N, k=k if k is not None else min(SAEConfig.k, N - 1)
    )
    sae = REGISTRY[arch](cfg)
    state = {"W_enc": W_enc_ND, "b_enc": b_enc_N, "W_dec": W_dec_ND, "b_dec": b_dec_D, **extra}
    sae.load_state_dict({k_: v.detach().float().contiguous() for k_, v in state.items()})
    return sae.eval()


# ======================================================================================
# Export: our SAE → a SAELens directory


_NO_COUNTERPART = {
    "kl_sigmoid": "its units are sigmoids",
    "lista": "its encoder is T unrolled ISTA steps with a lateral matrix",
}


def saelens_weights(sae: SAE) -> tuple[str, dict[str, Tensor]]:
    """SAELens's architecture name and state dict for ``sae`` (inference behaviour equal)."""
    arch = sae.cfg.arch
    if arch not in OURS_TO_SAELENS:
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
        state["threshold"] = sae.log_threshold.detach().exp()
    elif arch == "batchtopk":
        # Eval mode keeps relu(pre) > max(θ, 0): one global threshold, as SAELens saves it.
        state["threshold"] = sae.threshold.detach().clamp_min(0).expand(sae.n_latents)
    elif arch == "wta":
        state["threshold"] = sae.threshold.detach().clamp_min(0)
    return OURS_TO_SAELENS[arch], {k: v.float().contiguous().cpu() for k, v in state.items()}


def saelens_cfg(
    sae: SAE, arch: str, *, hook_name: str | None, model_name: str | None, context_size: int | None
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
    return cfg


def export_saelens(
    sae: SAE | str | Path,
    out_dir: str | Path,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    context_size: int | None = None,
) -> Path:
    """Write ``sae`` (an SAE or a saved SAE's directory) as a SAELens directory.

    ``out_dir`` gets ``cfg.json`` and ``sae_weights.safetensors``, loadable with
    ``sae_lens.SAE.load_from_disk(out_dir)``. Hook, model and context size default to
    those of the store the SAE was trained on, when its train_cfg.json names one.
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
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / SAELENS_WEIGHTS))
    (out / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _provenance(sae_dir: Path) -> dict[str, Any]:
    """Model, hook and context length of the store an SAE was trained on, if still there."""
    from llm_sae.store import open_store

    try:
        store = open_store(json.loads((sae_dir / "train_cfg.json").read_text())["store"])
        return {"model": store.model, "hook": store.hook, "context_length": store.context_length}
    except (OSError, ValueError, KeyError, TypeError, LlmSaeError):
        return {}


# ======================================================================================
# Export: an analysis directory → Neuronpedia's batch JSONL export


@dataclass
class NeuronpediaInfo:
    """Who and what an upload is, in Neuronpedia's terms (source = one SAE at one layer)."""

    model_id: str
    layer: int
    source_set: str
    release: str
    creator_name: str
    creator_id: str
    description: str
    dataset: str | None
    context_length: int | None

    @property
    def source_id(self) -> str:
        return f"{self.layer}-{self.source_set}"


def export_neuronpedia(
    analysis_dir: str | Path,
    out_dir: str | Path,
    *,
    model_id: str | None = None,
    layer: int | None = None,
    source_set: str = "llm-sae",
    release: str = "llm-sae",
    creator_name: str = "llm_sae",
    creator_id: str = "llm-sae",
    features_per_batch: int = 1000,
) -> Path:
    """Write ``analysis_dir`` in Neuronpedia's export layout; returns the source directory.

    ``out_dir/{model_id}/{layer}-{source_set}/`` gets release.jsonl, model.jsonl,
    sourceset.jsonl, source.jsonl and, per batch of features, ``features/batch-i.jsonl.gz``
    and ``activations/batch-i.jsonl.gz`` (one JSON object per line), as Neuronpedia's
    ``convert-saedashboard-to-neuronpedia-export.py`` writes them.
    """
    from llm_sae.analyze import load_feature, load_summary

    summary = load_summary(analysis_dir)
    info = _neuronpedia_info(
        summary, model_id, layer, source_set, release, creator_name, creator_id
    )
    src = Path(out_dir) / info.model_id / info.source_id
    (src / "features").mkdir(parents=True, exist_ok=True)
    (src / "activations").mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat()
    for name, record in _neuronpedia_headers(info, summary, now).items():
        (src / f"{name}.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    n, per = int(summary["n_features"]), max(1, int(features_per_batch))
    for b, start in enumerate(range(0, n, per)):
        feats, acts = [], []
        for i in range(start, min(n, start + per)):
            rec = load_feature(analysis_dir, i)
            feats.append(neuronpedia_feature(rec, info, now))
            acts.extend(neuronpedia_activations(rec, info, now))
        _write_jsonl_gz(src / "features" / f"batch-{b}.jsonl.gz", feats)
        _write_jsonl_gz(src / "activations" / f"batch-{b}.jsonl.gz", acts)
    return src


def _neuronpedia_info(
    summary: dict[str, Any],
    model_id: str | None,
    layer: int | None,
    source_set: str,
    release: str,
    creator_name: str,
    creator_id: str,
) -> NeuronpediaInfo:
    store = summary.get("store") or {}
    model_id = model_id or summary.get("model") or store.get("model")
    if not model_id:
        raise ConfigError(
            "the analysis names no model; pass --model-name (Neuronpedia's model id, e.g. gpt2-small)"
        )
    hook = store.get("hook") or ""
    if layer is None:
        m = re.match(r"blocks\.(\d+)\.", hook)
        if m is None:
            raise ConfigError(f"cannot tell the layer from hook {hook!r}; pass --layer")
        layer = int(m.group(1))
    return NeuronpediaInfo(
        model_id=str(model_id).replace("/", "-"),
        layer=int(layer),
        source_set=source_set,
        release=release,
        creator_name=creator_name,
        creator_id=creator_id,
        description=f"llm_sae {summary.get('sae', {}).get('cfg', {}).get('arch', 'SAE')} at {hook}, "
        f"{summary['n_features']} features",
        dataset=None,
        context_length=store.get("context_length"),
    )


def _neuronpedia_headers(
    info: NeuronpediaInfo, summary: dict[str, Any], now: str
) -> dict[str, dict]:
    """The one-line release, model, source set and source records of an export."""
    return {
        "release": {
            "name": info.release,
            "description": info.description,
            "creatorName": info.creator_name,
            "creatorId": info.creator_id,
            "visibility": "PUBLIC",
            "isNewUi": False,
            "featured": False,
            "descriptionShort": info.description,
            "urls": [],
            "creatorEmail": None,
            "creatorNameShort": info.creator_name,
            "defaultSourceSetName": None,
            "defaultSourceId": None,
            "defaultUmapSourceIds": [],
            "createdAt": now,
        },
        "model": {
            "id": info.model_id,
            "instruct": info.model_id.endswith("-it"),
            "creatorId": info.creator_id,
            "displayNameShort": info.model_id,
            "displayName": info.model_id,
            "tlensId": None,
            "dimension": summary.get("d_in"),
            "visibility": "PUBLIC",
            "defaultSourceSetName": None,
            "defaultSourceId": None,
            "inferenceEnabled": True,
            "layers": 0,
            "neuronsPerLayer": 0,
            "createdAt": now,
            "owner": "",
            "updatedAt": now,
            "website": None,
        },
        "sourceset": {
            "modelId": info.model_id,
            "name": info.source_set,
            "creatorId": info.creator_id,
            "hasDashboards": True,
            "visibility": "PUBLIC",
            "description": info.description,
            "type": "",
            "creatorName": info.creator_name,
            "urls": [],
            "creatorEmail": None,
            "releaseName": info.release,
            "defaultOfModelId": None,
            "defaultRange": 1,
            "defaultShowBreaks": True,
            "showDfa": False,
            "showCorrelated": False,
            "showHeadAttribution": False,
            "showUmap": False,
            "createdAt": now,
        },
        "source": {
            "id": info.source_id,
            "modelId": info.model_id,
            "setName": info.source_set,
            "creatorId": info.creator_id,
            "hasDashboards": True,
            "inferenceEnabled": False,
            "inferenceHosts": [],
            "saelensConfig": None,
            "saelensRelease": None,
            "saelensSaeId": None,
            "hfRepoId": None,
            "hfFolderId": None,
            "visibility": "PUBLIC",
            "defaultOfModelId": None,
            "hasUmap": False,
            "hasUmapLogSparsity": False,
            "hasUmapClusters": False,
            "num_prompts": None,
            "num_tokens_in_prompt": info.context_length,
            "dataset": info.dataset,
            "notes": None,
            "createdAt": now,
        },
    }


def neuronpedia_feature(rec: dict[str, Any], info: NeuronpediaInfo, now: str) -> dict[str, Any]:
    """One feature's line of ``features/batch-i.jsonl`` from our per-feature record."""
    hist = rec.get("histogram") or {"edges": [], "counts": []}
    edges = hist["edges"]
    logits = rec.get("logits") or {"promoted": [], "suppressed": []}
    cos = (rec.get("neighbours") or {}).get("decoder_cosine") or []
    return {
        "modelId": info.model_id,
        "layer": info.source_id,
        "index": str(rec["id"]),
        "creatorId": info.creator_id,
        "createdAt": now,
        "maxActApprox": rec["max_act"],
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10,
        "hookName": None,
        "topkCosSimIndices": [c["id"] for c in cos],
        "topkCosSimValues": [c["value"] for c in cos],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": [t["token"] for t in logits["suppressed"]],
        "neg_values": [t["value"] for t in logits["suppressed"]],
        "pos_str": [t["token"] for t in logits["promoted"]],
        "pos_values": [t["value"] for t in logits["promoted"]],
        "frac_nonzero": rec["density"],
        # Bars at the bin centres, heights = counts (SAEDashboard's activation histogram).
        "freq_hist_data_bar_heights": list(hist["counts"]),
        "freq_hist_data_bar_values": [
            (a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=False)
        ],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }


def neuronpedia_activations(
    rec: dict[str, Any], info: NeuronpediaInfo, now: str
) -> list[dict[str, Any]]:
    """The feature's example windows as lines of ``activations/batch-i.jsonl``.

    Top examples first (no bin), then the interval examples with their bin's range and
    share. Positions the store has no row for (``null``) are written as 0.
    """
    out = []
    items = [(ex, None) for ex in rec.get("top_examples", [])]
    items += [(ex, b) for b in rec.get("interval_examples", []) for ex in b["examples"]]
    for n, (ex, b) in enumerate(items):
        values = [float(v) if v is not None else 0.0 for v in ex["acts"]]
        top = max(values)
        key = f"{info.model_id}/{info.source_id}/{rec['id']}/{n}"
        out.append(
            {
                # Neuronpedia ids are 25-character cuids; a hash keeps exports reproducible.
                "id": "c" + hashlib.sha1(key.encode()).hexdigest()[:24],
                "tokens": ex["tokens"],
                "index": str(rec["id"]),
                "layer": info.source_id,
                "modelId": info.model_id,
                "maxValue": top,
                "maxValueTokenIndex": values.index(top),
                "minValue": min(values),
                "values": values,
                "creatorId": info.creator_id,
                "dataSource": None,
                "dataIndex": None,
                "dfaValues": [],
                "dfaTargetIndex": None,
                "dfaMaxValue": None,
                "createdAt": now,
                "lossValues": [],
                "logitContributions": None,
                "binMin": b["lo"] if b else None,
                "binMax": b["hi"] if b else None,
                "binContains": b["share"] if b else None,
                "qualifyingTokenIndex": ex["peak"],
            }
        )
    return out


def _write_jsonl_gz(path: Path, records: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(gzip.compress(data, compresslevel=5))
    tmp.replace(path)


# ======================================================================================
# The `llm-sae export` stage


@dataclass
class ExportConfig:
    """Write an SAE in SAELens's format, or an analysis in Neuronpedia's batch JSONL format."""

    format: str
    """Target format: saelens (needs --sae) or neuronpedia (needs --analysis)."""
    out: str
    """Output directory."""
    sae: str | None = None
    """Saved SAE directory to export (for --format saelens)."""
    analysis: str | None = None
    """Analysis directory (`llm-sae analyze --out`) to export (for --format neuronpedia)."""
    hook_name: str | None = None
    """saelens: metadata.hook_name (default: the hook of the store the SAE was trained on)."""
    model_name: str | None = None
    """Model name: SAELens metadata.model_name, Neuronpedia's modelId (default: from the store or analysis)."""
    layer: int | None = None
    """neuronpedia: layer number of the source id (default: parsed from blocks.L.* hooks)."""
    source_set: str = "llm-sae"
    """neuronpedia: source set name; the source id is LAYER-SOURCE_SET."""
    release: str = "llm-sae"
    """neuronpedia: release name."""
    creator_name: str = "llm_sae"
    """neuronpedia: creator name written into the records."""
    creator_id: str = "llm-sae"
    """neuronpedia: creatorId written into the records (Neuronpedia's importer maps it to a user)."""
    features_per_batch: int = 1000
    """neuronpedia: features per batch-i.jsonl.gz file."""


def export(cfg: ExportConfig) -> Path:
    """Run one export; returns the directory written."""
    if cfg.format == "saelens":
        if not cfg.sae:
            raise ConfigError("--format saelens needs --sae DIR (a saved SAE)")
        return export_saelens(cfg.sae, cfg.out, hook_name=cfg.hook_name, model_name=cfg.model_name)
    if cfg.format == "neuronpedia":
        if not cfg.analysis:
            raise ConfigError(
                "--format neuronpedia needs --analysis DIR (the output of `llm-sae analyze`)"
            )
        return export_neuronpedia(
            cfg.analysis,
            cfg.out,
            model_id=cfg.model_name,
            layer=cfg.layer,
            source_set=cfg.source_set,
            release=cfg.release,
            creator_name=cfg.creator_name,
            creator_id=cfg.creator_id,
            features_per_batch=cfg.features_per_batch,
        )
    raise ConfigError(f"unknown --format {cfg.format!r}; choose saelens or neuronpedia")


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ExportConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(ExportConfig, args)
    out = export(cfg)
    print(f"wrote {cfg.format} export to {out}")
    return 0


__all__ = [
    "ExportConfig",
    "InteropError",
    "export",
    "export_saelens",
    "export_neuronpedia",
    "load_peer",
    "load_saelens",
    "load_sparsify",
    "peer_format",
    "log_threshold",
]
