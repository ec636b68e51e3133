"""Render analysis output into a static, self-contained feature-dashboard site.

The site opens straight from disk (file://) or through ``llm-sae serve``. Browsers refuse
``fetch()`` of local files, so data ships as small JavaScript files loaded by <script>
tags: ``data/index.js`` holds the feature table's columns, and each feature's page data
lives in its own ``data/features/<shard>/f_<id>.js``, loaded only when that page opens.
Token text is untrusted: the JSON inside those files is escaped so no string can close
the script, and the pages insert it only as text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llm_sae.config import add_arguments, from_args
from llm_sae.errors import LlmSaeError


class DashboardError(LlmSaeError):
    """Analysis output that cannot be rendered, or an output folder that cannot be used."""


@dataclass
class DashboardConfig:
    analysis: str
    """The analysis output directory written by `llm-sae analyze`."""
    out: str
    """Where to write the site (a new or empty directory, or a site built before)."""
    top_tokens: int = 5
    """Top tokens per feature shown in the index table."""
    max_examples: int = 20
    """Top-activating examples per feature page (at most what the analysis kept)."""
    max_interval_examples: int = 10
    """Examples from activation intervals per feature page, over all intervals."""
    max_logits: int = 10
    """Promoted and suppressed tokens listed per feature."""
    max_neighbours: int = 10
    """Nearest features listed per feature."""
    digits: int = 3
    """Significant digits kept for activations (smaller files; tooltips show these)."""
    max_feature_kb: float = 30.0
    """Size budget of one feature's data file; example windows are cut around their peak
    token until the file fits."""


SHARD_SIZE = 1000  # feature files per folder: keeps directory listings small at 100k features
ASSET_PAGES = ("index.html", "feature.html", "live.html")
ASSET_FILES = ("style.css", "common.js", "index.js", "feature.js", "live.js")
SITE_MARKER = "data/meta.js"


# ------------------------------------------------------------------------ safe JS data
def js_literal(obj: Any) -> str:
    """``obj`` as a JavaScript literal that is safe inside an HTML page or a .js file.

    JSON with '<', '>' and '&' escaped (so ``</script>`` and ``<!--`` cannot appear), the
    line separators U+2028/U+2029 escaped (they end a line in older JS), and lone
    surrogates from broken byte tokens written as \\uXXXX escapes rather than invalid UTF-8.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # rare: walk the object only when a NaN/inf is actually there
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return text


def _finite(obj: Any) -> Any:
    """NaN and infinities have no JSON form: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_text(path: Path, text: str) -> None:
    # backslashreplace turns a lone surrogate into \udcXX, a valid escape inside a JS string.
    data = text.encode("utf-8", "backslashreplace")
    try:
        path.write_bytes(data)
    except FileNotFoundError:  # first file of its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def feature_relpath(feature_id: int) -> str:
    return f"data/features/{feature_id // SHARD_SIZE:03d}/f_{feature_id:06d}.js"


def round_sig(x: float, digits: int = 3) -> float | int | None:
    """``x`` to ``digits`` significant digits; zeros stay the short ``0``; NaN/inf → None."""
    if x == 0:
        return 0
    x = float(x)
    if not math.isfinite(x):
        return None
    r = float(f"{x:.{digits}g}")
    return int(r) if r.is_integer() and abs(r) < 1e15 else r


# ------------------------------------------------------------------------ site records
def _act(a: Any, digits: int) -> float | int | None:
    # null means the store had no row there (e.g. a skipped BOS): no activation exists.
    if a == 0:  # most window tokens: skip the formatting
        return 0
    return None if a is None else round_sig(a, digits)


def site_example(
    ex: dict[str, Any], vocab: dict[str, int], digits: int, window: tuple[int, int] | None = None
) -> dict[str, Any]:
    """One example as indices into the feature's token table plus rounded activations.

    Tokens repeat a lot within one feature's examples, so a per-feature table of distinct
    strings keeps a 30-example page to a few KB. ``window`` = (before, after) keeps only
    that many tokens around the peak.
    """
    tokens, acts, peak = list(ex.get("tokens", [])), list(ex.get("acts", [])), ex.get("peak")
    if window is not None and peak is not None:
        lo = max(0, int(peak) - window[0])
        tokens, acts = tokens[lo : int(peak) + window[1] + 1], acts[lo : int(peak) + window[1] + 1]
        peak = int(peak) - lo
    ex = {**ex, "tokens": tokens, "acts": acts, "peak": peak}
    t = []
    for s in tokens:
        s = str(s)
        if s not in vocab:
            vocab[s] = len(vocab)
        t.append(vocab[s])
    out: dict[str, Any] = {"t": t, "a": [_act(a, digits) for a in ex.get("acts", [])]}
    if ex.get("peak") is not None:
        out["p"] = int(ex["peak"])
    if ex.get("act") is not None:
        out["v"] = round_sig(ex["act"], 4)
    return out


def _pick_interval_examples(bins: list[dict[str, Any]], budget: int) -> list[int]:
    """How many examples to show from each bin: round-robin from the highest bin down,
    so every non-empty bin gets one before any gets two."""
    take = [0] * len(bins)
    order = sorted(range(len(bins)), key=lambda i: -float(bins[i].get("lo") or 0))
    progress = True
    while budget > 0 and progress:
        progress = False
        for i in order:
            if budget > 0 and take[i] < len(bins[i].get("examples") or []):
                take[i] += 1
                budget -= 1
                progress = True
    return take


# Ever shorter (before, after) example windows, tried until a feature file fits its budget.
WINDOWS = ((48, 16), (32, 12), (24, 8), (16, 6), (10, 4), (6, 2), (3, 1), (0, 0))


def feature_js(rec: dict[str, Any], cfg: DashboardConfig, prev_id: int | None, next_id: int | None) -> str:
    """The data file of one feature: a call of the page's registered callback."""
    window = None
    for nxt in (*WINDOWS, None):
        site = feature_record(rec, cfg, window)
        site["prev"], site["next"] = prev_id, next_id
        text = f"LLM_SAE_FEATURE({site['id']},{js_literal(site)});\n"
        if len(text.encode("utf-8", "backslashreplace")) <= cfg.max_feature_kb * 1000 or nxt is None:
            return text
        window = nxt
    raise AssertionError("unreachable")


def feature_record(
    rec: dict[str, Any], cfg: DashboardConfig, window: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The page data of one feature from its analysis record (docs/analysis-format.md)."""
    vocab: dict[str, int] = {}
    d = cfg.digits
    top = [site_example(e, vocab, d, window) for e in (rec.get("top_examples") or [])[: cfg.max_examples]]
    bins = list(rec.get("interval_examples") or [])
    take = _pick_interval_examples(bins, cfg.max_interval_examples)
    intervals = []
    for b, n_take in zip(bins, take, strict=True):
        item: dict[str, Any] = {
            "lo": round_sig(b.get("lo") or 0.0, 4),
            "hi": round_sig(b.get("hi") or 0.0, 4),
            "ex": [site_example(e, vocab, d, window) for e in (b.get("examples") or [])[:n_take]],
        }
        if b.get("count") is not None:
            item["count"] = int(b["count"])
        intervals.append(item)
    hist = rec.get("histogram")
    if hist and hist.get("counts"):
        hist = {
            "edges": [round_sig(e, 4) for e in hist.get("edges", [])],
            "counts": [int(c) for c in hist["counts"]],
        }
    else:
        hist = None
    logits = rec.get("logits")
    if logits is not None:
        logits = {
            "pos": [[str(x["token"]), round_sig(x["value"], 3)] for x in (logits.get("promoted") or [])[: cfg.max_logits]],
            "neg": [[str(x["token"]), round_sig(x["value"], 3)] for x in (logits.get("suppressed") or [])[: cfg.max_logits]],
        }
    nbrs = ((rec.get("neighbours") or {}).get("decoder_cosine") or [])[: cfg.max_neighbours]
    return {
        "id": int(rec["id"]),
        "density": round_sig(rec.get("density") or 0.0, 4),
        "max_act": round_sig(rec.get("max_act") or 0.0, 4),
        "mean_act": None if rec.get("mean_act") is None else round_sig(rec["mean_act"], 4),
        "n_fires": None if rec.get("count") is None else int(rec["count"]),
        "dead": bool(rec.get("dead", False)),
        "dense": bool(rec.get("dense", False)),
        "hist": hist,
        "vocab": list(vocab),
        "top": top,
        "intervals": intervals,
        "logits": logits,
        "nbrs": [[int(x["id"]), round_sig(x["value"], 3)] for x in nbrs],
    }


# ------------------------------------------------------------------------ site writing
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
    pkg = resources.files("llm_sae") / "dashboard_assets"
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
    _prepare_out(out)
    copy_assets(out)
    cols: dict[str, list[Any]] = {"id": [], "density": [], "max_act": [], "dead": [], "top": []}
    feature_bytes: list[int] = []
    # A page's data names its neighbours in id order, so a record is written one step late.
    pending: tuple[dict[str, Any], int | None] | None = None

    def flush(rec: dict[str, Any], prev_id: int | None, next_id: int | None) -> None:
        path = out / feature_relpath(int(rec["id"]))
        _write_text(path, feature_js(rec, cfg, prev_id, next_id))
        feature_bytes.append(path.stat().st_size)

    for rec in tqdm(features, total=n_features, desc="dashboard", unit="feat", disable=None):
        fid = int(rec["id"])
        cols["id"].append(fid)
        cols["density"].append(round_sig(rec.get("density") or 0.0, 4))
        cols["max_act"].append(round_sig(rec.get("max_act") or 0.0, 4))
        cols["dead"].append(1 if rec.get("dead") else 0)
        cols["top"].append([str(t) for t in (rec.get("top_tokens") or [])[: cfg.top_tokens]])
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


# ------------------------------------------------------------------------ analysis input
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
    return {
        "model": summary.get("model") or store.get("model"),
        "hook": store.get("hook") or sae_cfg.get("hook_name") or sae_cfg.get("hook"),
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


def build_dashboard(cfg: DashboardConfig) -> dict[str, Any]:
    """Write the site for ``cfg.analysis`` into ``cfg.out``; returns size statistics."""
    meta, n, feats = read_analysis(cfg.analysis)
    return write_site(cfg.out, meta, feats, cfg, n_features=n)


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, DashboardConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(DashboardConfig, args)
    stats = build_dashboard(cfg)
    index = os.path.join(os.path.abspath(cfg.out), "index.html")
    print(
        f"wrote {stats['n_features']} features to {cfg.out} "
        f"({stats['total_bytes'] / 1e6:.1f} MB; largest feature file "
        f"{stats['feature_bytes_max'] / 1e3:.1f} KB)"
    )
    print(f"open file://{index}  or run: llm-sae serve {cfg.out}")
    return 0
