"""The evaluation report as a table and as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from llm_sae.common.faults import maybe_kill
from llm_sae.evaluate.plot import write_frontier_png
from llm_sae.evaluate.replacement import format_replacement


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width comparison table, one row per SAE."""
    cols = [
        ("sae", lambda n, e: n, "<"),
        ("arch", lambda n, e: e["arch"], "<"),
        ("latents", lambda n, e: str(e["n_latents"]), ">"),
        ("L0", lambda n, e: _fmt(e["sparsity"]["l0"].get("mean"), ".1f"), ">"),
        ("FVU", lambda n, e: _fmt(e["reconstruction"]["fvu"]), ">"),
        ("MSE", lambda n, e: _fmt(e["reconstruction"]["mse"], ".4g"), ">"),
        ("cos", lambda n, e: _fmt(e["reconstruction"]["cosine"]), ">"),
        ("shrink", lambda n, e: _fmt(e["reconstruction"]["shrinkage"], ".3f"), ">"),
        ("dead", lambda n, e: _fmt(e["sparsity"]["dead_frac"], ".3f"), ">"),
        ("dense", lambda n, e: _fmt(e["sparsity"]["dense_frac"], ".3f"), ">"),
        ("gini", lambda n, e: _fmt(e.get("selectivity", {}).get("gini", {}).get("p50"), ".3f"), ">"),
    ]
    if "downstream" in report:
        cols += [
            ("ΔCE", lambda n, e: _fmt(e["downstream"]["ce_delta"]), ">"),
            ("KL", lambda n, e: _fmt(e["downstream"]["kl"]), ">"),
            ("LR(zero)", lambda n, e: _fmt(e["downstream"]["loss_recovered_zero"]), ">"),
            ("LR(mean)", lambda n, e: _fmt(e["downstream"]["loss_recovered_mean"]), ">"),
        ]
    if any("fvu_fista" in e.get("amortization", {}) for e in report["saes"].values()):
        cols += [
            ("FVU@L0 fista", lambda n, e: _fmt(e.get("amortization", {}).get("fvu_fista_refit")), ">"),
            ("amort.gap", lambda n, e: _fmt(e.get("amortization", {}).get("gap")), ">"),
        ]
    rows = [[c[0] for c in cols]] + [[c[1](n, e) for c in cols] for n, e in report["saes"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(format(v, f"{c[2]}{w}") for v, c, w in zip(r, cols, widths, strict=True)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    head = [f"store {report['store']}  hook {report['hook']}  rows "
            f"{report['eval_rows']['start']}..{report['eval_rows']['stop']}"]
    if "downstream" in report:
        d = report["downstream"]
        head.append(
            f"next-token CE over {d['tokens']} tokens: clean {d['ce_clean']:.4f}, zero-ablation "
            f"{d['ce_zero_ablation']:.4f}, mean-ablation {d['ce_mean_ablation']:.4f} ({d['text']['source']})"
        )
    foot = ("FVU = Σ‖x−x̂‖²/Σ‖x−x̄‖²; shrink = Σ⟨x̂,x⟩/Σ‖x̂‖²; gini = median selectivity over token ids; "
            "LR = loss recovered; FVU@L0 fista = FISTA (refit) at the encoder's L0")
    if "replacement" in report:  # transcoders: FVU is of the predicted output hook
        lines += [""] + format_replacement(report["replacement"])
    return "\n".join(head + [""] + lines + ["", foot]) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """eval.json (per-feature arrays in features.json), eval.txt, and frontier.png for ≥ 2 SAEs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_feature = report.get("per_feature", {})
    summary = {k: v for k, v in report.items() if k != "per_feature"}
    (out / "eval.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    (out / "features.json").write_text(json.dumps(_json_safe(per_feature)) + "\n")
    (out / "eval.txt").write_text(format_table(report))
    maybe_kill("mid_output")
    if len(report["saes"]) >= 2:
        write_frontier_png(report, out / "frontier.png")
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x
