"""Writing the static site: assets, index and feature shards."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from llm_sae.common.explanation_files import explanation_brief, find_explanations, load_explanation
from llm_sae.common.faults import maybe_kill
from llm_sae.dashboard.config import DashboardConfig, DashboardError
from llm_sae.dashboard.records import SHARD_SIZE, feature_js, feature_relpath, js_literal, round_sig

ASSET_PAGES = ("index.html", "feature.html", "live.html")


ASSET_FILES = ("style.css", "common.js", "index.js", "feature.js", "live.js", "steer.js")


SITE_MARKER = "data/meta.js"


def _write_text(path: Path, text: str) -> None:
    # backslashreplace turns a lone surrogate into \udcXX, a valid escape inside a JS string.
    data = text.encode("utf-8", "backslashreplace")
    try:
        path.write_bytes(data)
    except FileNotFoundError:  # first file of its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _prepare_out(out: Path) -> None:
    """Use ``out`` if new, empty or an earlier site (whose data is replaced); else refuse."""
    if out.exists() and not out.is_dir():
        raise DashboardError(f"--out {out} is a file; give a directory for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / SITE_MARKER).is_file():
        raise DashboardError(
            f"--out {out} is not empty and is not a dashboard site; choose a new or empty "
            "directory so nothing of yours is overwritten"
        )
    if (out / "data").is_dir():
        shutil.rmtree(out / "data")
    out.mkdir(parents=True, exist_ok=True)


def copy_assets(out: Path) -> None:
    pkg = resources.files("llm_sae.dashboard") / "assets"
    for name in ASSET_PAGES:
        _write_text(out / name, (pkg / name).read_text(encoding="utf-8"))
    for name in ASSET_FILES:
        _write_text(out / "assets" / name, (pkg / name).read_text(encoding="utf-8"))


def write_site(
    out: str | Path,
    meta: dict[str, Any],
    features: Iterable[dict[str, Any]],
    cfg: DashboardConfig,
    n_features: int | None = None,
) -> dict[str, Any]:
    """Write a whole site from analysis feature records; returns size statistics.

    ``features`` is consumed once, in id order, so a huge analysis streams through.
    """
    from tqdm import tqdm

    out = Path(out)
    expl_dir = find_explanations(cfg.analysis, cfg.explanations)  # a wrong folder fails before writing
    _prepare_out(out)
    copy_assets(out)
    cols: dict[str, list[Any]] = {"id": [], "density": [], "max_act": [], "dead": [], "top": []}
    if expl_dir is not None:
        cols.update(expl=[], score=[])  # the index's explanation column, sortable by score
    briefs: dict[int, dict[str, Any]] = {}  # only for records still waiting to be written
    feature_bytes: list[int] = []
    # A page's data names its neighbours in id order, so a record is written one step late.
    pending: tuple[dict[str, Any], int | None] | None = None

    def flush(rec: dict[str, Any], prev_id: int | None, next_id: int | None) -> None:
        path = out / feature_relpath(int(rec["id"]))
        _write_text(path, feature_js(rec, cfg, prev_id, next_id, briefs.pop(int(rec["id"]), None)))
        feature_bytes.append(path.stat().st_size)
        maybe_kill("mid_output")

    for rec in tqdm(features, total=n_features, desc="dashboard", unit="feat", disable=None):
        fid = int(rec["id"])
        cols["id"].append(fid)
        cols["density"].append(round_sig(rec.get("density") or 0.0, 4))
        cols["max_act"].append(round_sig(rec.get("max_act") or 0.0, 4))
        cols["dead"].append(1 if rec.get("dead") else 0)
        cols["top"].append([str(t) for t in (rec.get("top_tokens") or [])[: cfg.top_tokens]])
        if expl_dir is not None:
            res = load_explanation(expl_dir, fid)
            brief = explanation_brief(res) if res is not None else None
            cols["expl"].append(brief["text"] if brief else None)
            cols["score"].append(brief["score"] if brief else None)
            if brief:
                briefs[fid] = brief
        if pending is not None:
            flush(pending[0], pending[1], fid)
        pending = (rec, pending[0]["id"] if pending is not None else None)
    if pending is not None:
        flush(pending[0], pending[1], None)
    if not cols["id"]:
        raise DashboardError(f"the analysis in {cfg.analysis} has no features to show")

    ids = cols["id"]
    meta = dict(meta)
    meta.update(
        n_features=len(ids),
        first_id=ids[0],
        last_id=ids[-1],
        shard_size=SHARD_SIZE,
    )
    _write_text(out / "data" / "meta.js", f"window.LLM_SAE_META={js_literal(meta)};\n")
    _write_text(out / "data" / "index.js", f"window.LLM_SAE_INDEX={js_literal(cols)};\n")
    return {
        "n_features": len(ids),
        "index_bytes": (out / "data" / "index.js").stat().st_size,
        "feature_bytes_max": max(feature_bytes),
        "feature_bytes_mean": sum(feature_bytes) / len(feature_bytes),
        "total_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }
