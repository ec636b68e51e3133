"""Reading an analysis folder into site records."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llm_sae.dashboard.config import DashboardError

FORMAT_VERSIONS = (1,)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DashboardError(
            f"{path} is missing: is {path.parent} an analysis output directory? "
            "Write one with `llm-sae analyze --out DIR`"
        ) from None
    except (OSError, ValueError) as e:
        raise DashboardError(f"cannot read {path}: {e}; re-run `llm-sae analyze`") from e


def site_meta(summary: dict[str, Any]) -> dict[str, Any]:
    """The header facts of the site, from the analysis summary."""
    sae = summary.get("sae") or {}
    sae_cfg = sae.get("cfg") or {}
    store = summary.get("store") or {}
    sae_path = sae.get("path")
    metrics: dict[str, Any] = {}
    l0 = summary.get("l0")
    if isinstance(l0, dict) and l0.get("mean") is not None:
        metrics["l0"] = l0["mean"]
    for k in ("fvu", "mse", "loss_recovered"):
        v = summary.get(k, (summary.get("metrics") or {}).get(k))
        if isinstance(v, (int, float)):
            metrics[k] = v
    logits = summary.get("logits") or {}
    hook = store.get("hook") or sae_cfg.get("hook_name") or sae_cfg.get("hook")
    out_hook = (summary.get("transcoder") or {}).get("out_hook")
    if hook and out_hook:  # a transcoder: contexts from the first, logit effects into the second
        hook = f"{hook} → {out_hook}"
    return {
        "model": summary.get("model") or store.get("model"),
        "hook": hook,
        "sae_name": Path(str(sae_path)).name if sae_path else None,
        "architecture": sae_cfg.get("arch"),
        "n_latents": summary.get("n_features"),
        "k": sae_cfg.get("k") if sae_cfg.get("arch") in ("topk", "batchtopk", "wta") else None,
        "d_in": summary.get("d_in"),
        "tokens_analysed": summary.get("tokens_analysed"),
        "n_dead": summary.get("n_dead"),
        "n_dense": summary.get("n_dense"),
        "metrics": metrics,
        "logits_reason": None if logits.get("available", True) else logits.get("reason"),
        "density_histogram": summary.get("density_histogram"),
    }


def iter_records(analysis: str | Path, n_features: int, shard_size: int) -> Iterable[dict[str, Any]]:
    """Every feature record in id order, streamed shard by shard (constant memory)."""
    analysis = Path(analysis)
    n_shards = max(1, math.ceil(n_features / shard_size))
    expected = 0
    for s in range(n_shards):
        path = analysis / "features" / f"shard_{s:05d}.jsonl"
        if not path.is_file():
            raise DashboardError(
                f"{path} is missing ({n_features} features need {n_shards} shards); "
                "the analysis is incomplete: re-run `llm-sae analyze`"
            )
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise DashboardError(f"{path}: corrupt record ({e}); re-run `llm-sae analyze`") from e
                if rec.get("id") != expected:
                    raise DashboardError(
                        f"{path}: expected feature {expected}, found {rec.get('id')}; "
                        "the analysis is inconsistent: re-run `llm-sae analyze`"
                    )
                expected += 1
                yield rec
    if expected != n_features:
        raise DashboardError(
            f"{analysis} holds {expected} feature records but summary.json says "
            f"{n_features}; re-run `llm-sae analyze`"
        )


def read_analysis(analysis: str | Path) -> tuple[dict[str, Any], int, Iterable[dict[str, Any]]]:
    """(site meta, feature count, feature records in id order) from an analysis dir."""
    analysis = Path(analysis)
    if not analysis.is_dir():
        raise DashboardError(
            f"--analysis {analysis} is not a directory; write one with `llm-sae analyze --out DIR`"
        )
    summary = _read_json(analysis / "summary.json")
    version = summary.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise DashboardError(
            f"{analysis}/summary.json has format_version {version!r}; this dashboard reads "
            f"{list(FORMAT_VERSIONS)}: re-run `llm-sae analyze` with this version of llm_sae"
        )
    n = int(summary.get("n_features") or 0)
    shard_size = int(summary.get("shard_size") or 1000)
    return site_meta(summary), n, iter_records(analysis, n, shard_size)
