"""Explanations from ``llm-sae explain`` in Neuronpedia's export layout.

A feature's explanation becomes one line of ``explanations/batch-i.jsonl.gz`` with
Neuronpedia's Explanation fields; each score an ExplanationScore record inside it. The
files are read through ``llm_sae.common.explanation_files``, so export depends on the
format, not on the explain code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_sae.common.explanation_files import load_explanation

if TYPE_CHECKING:
    from llm_sae.interop.neuronpedia import NeuronpediaInfo


def record_id(key: str) -> str:
    """A stable cuid-shaped id: re-exporting gives the same ids, so an import updates in place."""
    return "c" + hashlib.sha1(key.encode()).hexdigest()[:24]


def neuronpedia_explanation(expl_dir: Path, feature: int, info: NeuronpediaInfo, now: str) -> list[dict[str, Any]]:
    """The feature's explanation as [one Explanation record], or [] when it has none."""
    res = load_explanation(expl_dir, feature)
    if res is None:
        return []
    key = f"{info.model_id}/{info.source_id}/{feature}/explanation"
    eid = record_id(key)
    scores = [
        {"id": record_id(f"{key}/{name}"), "value": s.get("balanced_accuracy"), "explanationId": eid,
         "initiatedByUserId": info.creator_id, "explanationScoreTypeName": name,
         "explanationScoreModelName": res.get("model"), "jsonDetails": json.dumps(s), "createdAt": now}
        for name, s in sorted(res["scores"].items()) if isinstance(s, dict)
    ]
    return [{"id": eid, "modelId": info.model_id, "layer": info.source_id, "index": str(feature),
             "description": res["explanation"], "authorId": info.creator_id,
             "typeName": f"llm-sae-{res.get('prompt', 'explain')}", "explanationModelName": res.get("model"),
             "notes": None, "createdAt": now, "scores": scores}]
