"""Reading an analysis folder: the on-disk contract between analyze and its readers
(dashboard, export, serve). See docs/analysis-format.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_sae.errors import AnalyzeError

FORMAT_VERSION = 1


# Reading the output back
def load_summary(out_dir: str | Path) -> dict[str, Any]:
    """The analysis summary (summary.json)."""
    p = Path(out_dir) / "summary.json"
    if not p.is_file():
        raise AnalyzeError(f"no analysis at {out_dir} (no summary.json); run `llm-sae analyze` first")
    return json.loads(p.read_text(encoding="utf-8"))


def load_index(out_dir: str | Path) -> list[dict[str, Any]]:
    """The per-feature index (features.jsonl): a list where element i is feature i."""
    load_summary(out_dir)
    with open(Path(out_dir) / "features.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_feature(out_dir: str | Path, feature_id: int) -> dict[str, Any]:
    """One feature's full record, read by byte range (never parses a whole shard)."""
    summary = load_summary(out_dir)
    N, S = summary["n_features"], summary["shard_size"]
    if not 0 <= feature_id < N:
        raise AnalyzeError(f"feature {feature_id} is out of range: this analysis has features 0..{N - 1}")
    s, i = divmod(int(feature_id), S)
    d = Path(out_dir) / "features"
    offsets = json.loads((d / f"shard_{s:05d}.idx.json").read_text())
    with open(d / f"shard_{s:05d}.jsonl", "rb") as f:
        f.seek(offsets[i])
        return json.loads(f.read(offsets[i + 1] - offsets[i]).decode("utf-8"))
