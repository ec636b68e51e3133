"""Writing an analysis in Neuronpedia's upload layout."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llm_sae.config import ConfigError


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
    explanations: str | Path | None = None,
) -> Path:
    """Write ``analysis_dir`` in Neuronpedia's export layout; returns the source directory.

    ``out_dir/{model_id}/{layer}-{source_set}/`` gets release.jsonl, model.jsonl,
    sourceset.jsonl, source.jsonl and, per batch of features, ``features/batch-i.jsonl.gz``
    and ``activations/batch-i.jsonl.gz`` (one JSON object per line), as Neuronpedia's
    ``convert-saedashboard-to-neuronpedia-export.py`` writes them. Explanations from
    ``llm-sae explain`` (``explanations``, default ``analysis_dir/explanations`` when it
    exists) go to ``explanations/batch-i.jsonl.gz`` with their scores.
    """
    from llm_sae.common.analysis_files import load_feature, load_summary
    from llm_sae.common.explanation_files import find_explanations
    from llm_sae.interop.neuronpedia_explanations import neuronpedia_explanation

    summary = load_summary(analysis_dir)
    expl_dir = find_explanations(analysis_dir, explanations)  # a wrong folder fails before writing
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
    if expl_dir is not None:
        (src / "explanations").mkdir(exist_ok=True)
    for b, start in enumerate(range(0, n, per)):
        feats, acts, expls = [], [], []
        for i in range(start, min(n, start + per)):
            rec = load_feature(analysis_dir, i)
            feats.append(neuronpedia_feature(rec, info, now))
            acts.extend(neuronpedia_activations(rec, info, now))
            if expl_dir is not None:
                expls.extend(neuronpedia_explanation(expl_dir, i, info, now))
        _write_jsonl_gz(src / "features" / f"batch-{b}.jsonl.gz", feats)
        _write_jsonl_gz(src / "activations" / f"batch-{b}.jsonl.gz", acts)
        if expl_dir is not None:
            _write_jsonl_gz(src / "explanations" / f"batch-{b}.jsonl.gz", expls)
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
