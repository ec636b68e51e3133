"""Reading the output of ``llm-sae explain``: the on-disk contract between explain and its
readers (the dashboard, the Neuronpedia export). See docs/explain.md.

One reader, so the stages that show explanations depend on this file format, never on
the explain code (which pulls in the chat client).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_sae.errors import ExplainError

RUN_FILE = "run.json"  # written first by every run: marks a folder as explain output


def result_path(out: str | Path, feature: int) -> Path:
    """Where one feature's result lives: a thousand files per folder at most."""
    return Path(out) / "features" / f"{int(feature) // 1000:03d}" / f"f_{int(feature):06d}.json"


def read_result(out: str | Path, feature: int) -> dict[str, Any] | None:
    """A feature's saved result as written, or None when it has none yet.

    Writes are atomic, so a file is whole or absent; one that still fails to parse (edited
    by hand) reads as absent rather than stopping a dashboard build.
    """
    try:
        res = json.loads(result_path(out, feature).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) else None


def find_explanations(analysis_dir: str | Path, explicit: str | Path | None = None) -> Path | None:
    """The explain output to show: ``explicit`` (refused unless it is one), else
    ``ANALYSIS/explanations`` when it exists, else None."""
    if explicit:
        d = Path(explicit)
        if not (d / RUN_FILE).is_file():
            raise ExplainError(f"--explanations {d} is not the output of `llm-sae explain` (no {RUN_FILE}); "
                               "pass the folder that command wrote (its --out)")
        return d
    d = Path(analysis_dir) / "explanations"
    return d if (d / RUN_FILE).is_file() else None


def load_explanation(expl_dir: str | Path, feature: int) -> dict[str, Any] | None:
    """A feature's result when it has an explanation (scores may still be missing)."""
    res = read_result(expl_dir, feature)
    if res is None or not isinstance(res.get("explanation"), str):
        return None
    if not isinstance(res.get("scores"), dict):
        res["scores"] = {}
    return res


def explanation_brief(res: dict[str, Any]) -> dict[str, Any]:
    """What a site shows of a result: the text, each scorer's balanced accuracy, their
    mean (``score``, None when nothing was scored) and the model that wrote it."""
    scores = {k: v.get("balanced_accuracy") for k, v in res["scores"].items() if isinstance(v, dict)}
    vals = [v for v in scores.values() if isinstance(v, (int, float))]
    return {"text": res["explanation"], "scores": scores, "model": str(res.get("model") or ""),
            "score": round(sum(vals) / len(vals), 4) if vals else None}
