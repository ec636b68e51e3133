"""A feature's record as the site stores it: rounded, finite, safe to embed in JS."""

from __future__ import annotations

import json
import math
from typing import Any

from llm_sae.dashboard.config import DashboardConfig

SHARD_SIZE = 1000  # feature files per folder: keeps directory listings small at 100k features


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


def pick_interval_examples(bins: list[dict[str, Any]], budget: int) -> list[int]:
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


def feature_js(rec: dict[str, Any], cfg: DashboardConfig, prev_id: int | None, next_id: int | None,
               explanation: dict[str, Any] | None = None) -> str:
    """The data file of one feature: a call of the page's registered callback.

    ``explanation`` (from ``explanation_brief``) rides along when `llm-sae explain` wrote one.
    """
    window = None
    for nxt in (*WINDOWS, None):
        site = feature_record(rec, cfg, window)
        site["prev"], site["next"] = prev_id, next_id
        if explanation is not None:
            site["explanation"] = explanation
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
    take = pick_interval_examples(bins, cfg.max_interval_examples)
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
