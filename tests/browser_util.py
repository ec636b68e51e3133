"""Helpers for the dashboard tests: analysis dirs written by hand in the documented format
(docs/analysis-format.md), and a headless Chromium when one is installed."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

# Untrusted token text the pages must show literally and never execute.
XSS_TOKENS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</script>",
    "<!--",
    "'\"><svg onload=alert(1)>",
]
ODD_TOKENS = [" ", "\n", "\t", "  \n\n", "é", "日本語", "\ufffd", "\u202e", "\u200b", "<|endoftext|>", "\u2028", "&amp;", ""]
WORDS = [" the", " quick", " brown", " fox", "def", " add", "(", "):", " return", " a", " b", ",", "."]
VOCAB = WORDS + XSS_TOKENS + ODD_TOKENS


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def make_example(rng: random.Random, act: float, width: int, row: int, vocab: list[str]) -> dict[str, Any]:
    peak = rng.randrange(width)
    tokens = [rng.choice(vocab) for _ in range(width)]
    acts: list[float | None] = [
        _r(rng.random() * act) if rng.random() < 0.3 else 0 for _ in range(width)
    ]
    acts[peak] = _r(act)
    if peak > 0 and rng.random() < 0.2:
        acts[0] = None  # a position the store has no row for
    return {"row": row, "seq": row // 64, "pos": row % 64, "act": _r(act), "peak": peak,
            "tokens": tokens, "acts": acts}


def make_record(i: int, n: int, rng: random.Random, *, dead: bool, n_top: int = 20,
                per_bin: int = 3, n_bins: int = 10, width: int = 33,
                vocab: list[str] | None = None, tokens_analysed: int = 100_000) -> dict[str, Any]:
    vocab = vocab or VOCAB
    if dead:
        return {"id": i, "dead": True, "dense": False, "count": 0, "density": 0.0,
                "log10_density": None, "mean_act": 0, "max_act": 0, "top_tokens": [],
                "histogram": {"edges": [], "counts": []}, "top_examples": [],
                "interval_examples": [], "logits": None,
                "neighbours": {"decoder_cosine": [], "cooccurrence": None}}
    max_act = _r(1 + 9 * rng.random())
    count = rng.randint(10, 5000)
    acts = sorted((max_act * (1 - 0.03 * j) for j in range(n_top)), reverse=True)
    top = [make_example(rng, a, width, rng.randrange(10**6), vocab) for a in acts]
    edges = [_r(max_act * j / n_bins) for j in range(n_bins + 1)]
    bins = []
    for b in range(n_bins):
        exs = [make_example(rng, edges[b] + (edges[b + 1] - edges[b]) * rng.random(), width,
                            rng.randrange(10**6), vocab) for _ in range(per_bin)]
        exs.sort(key=lambda e: -e["act"])
        bins.append({"lo": edges[b], "hi": edges[b + 1], "count": count // n_bins,
                     "share": 0.1, "examples": exs})
    hist_edges = [_r(max_act * j / 32) for j in range(33)]
    tops: list[str] = []
    for e in top:
        t = e["tokens"][e["peak"]]
        if t not in tops:
            tops.append(t)
    return {
        "id": i, "dead": False, "dense": False, "count": count,
        "density": _r(count / tokens_analysed), "log10_density": _r(math.log10(count / tokens_analysed)),
        "mean_act": _r(max_act / 3), "max_act": max_act, "top_tokens": tops[:5],
        "histogram": {"edges": hist_edges, "counts": [int(count * math.exp(-j / 5) / 5) for j in range(32)]},
        "top_examples": top,
        "interval_examples": bins,
        "logits": {
            "promoted": [{"token": rng.choice(vocab), "id": j, "value": _r(2 - 0.1 * j)} for j in range(10)],
            "suppressed": [{"token": rng.choice(vocab), "id": j, "value": _r(-2 + 0.1 * j)} for j in range(10)],
        },
        "neighbours": {"decoder_cosine": [{"id": (i + j) % n, "value": _r(0.9 - 0.05 * j)} for j in range(1, 6)],
                       "cooccurrence": None},
    }


def write_analysis(out: str | Path, n_features: int = 30, *, shard_size: int = 10, seed: int = 0,
                   dead_every: int = 7, records: dict[int, dict[str, Any]] | None = None,
                   **record_kw: Any) -> Path:
    """An analysis output directory in format_version 1, written by hand."""
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    recs = []
    for i in range(n_features):
        if records and i in records:
            recs.append(records[i])
        else:
            recs.append(make_record(i, n_features, rng, dead=dead_every > 0 and i % dead_every == 3, **record_kw))
    n_shards = max(1, math.ceil(n_features / shard_size))
    for s in range(n_shards):
        lines = [json.dumps(r) + "\n" for r in recs[s * shard_size:(s + 1) * shard_size]]
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line.encode()))
        (out / "features" / f"shard_{s:05d}.jsonl").write_text("".join(lines), encoding="utf-8")
        (out / "features" / f"shard_{s:05d}.idx.json").write_text(json.dumps(offsets))
    with open(out / "features.jsonl", "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps({k: r[k] for k in ("id", "dead", "dense", "count", "log10_density",
                                                  "max_act", "mean_act", "top_tokens")}) + "\n")
    n_dead = sum(r["dead"] for r in recs)
    summary = {
        "format_version": 1, "n_features": n_features, "d_in": 32,
        "sae": {"path": "/runs/tiny-topk", "cfg": {"arch": "topk", "d_in": 32, "n_latents": n_features, "k": 4}},
        "store": {"path": "/runs/store", "model": "tiny-gpt2", "hook": "blocks.1.hook_resid_post",
                  "n_rows": 100_000, "context_length": 64},
        "model": "tiny-gpt2", "tokens_analysed": 100_000, "rows_read": 100_000, "rows_excluded": 0,
        "dead_threshold": 0, "dense_threshold": 0.1, "n_dead": n_dead, "n_dense": 0,
        "density_histogram": {"log10_edges": [-7.0 + j for j in range(8)], "counts": [0] * 7, "n_dead": n_dead},
        "l0": {"mean": 4.0, "median": 4, "p10": 4, "p90": 4, "max": 4, "histogram": {"edges": [], "counts": []}},
        "logits": {"available": True, "reason": None, "norm": "layernorm"},
        "shard_size": shard_size, "n_shards": n_shards, "options": {}, "elapsed_s": 1.0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return out


# ------------------------------------------------------------------------ browser
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def chromium_path() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                 shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")):
        if cand and os.path.exists(cand):
            return cand
    return None


# Installed before any page script runs: records every alert()/error so a test can
# check that no token text ever executed.
HOOK_SCRIPT = """
window.__xss = [];
window.alert = function (m) { window.__xss.push('alert:' + m); };
window.confirm = window.prompt = window.alert;
window.addEventListener('error', function (e) {
  if (e && e.target && e.target !== window && e.target.tagName === 'IMG') window.__xss.push('img-error');
}, true);
new MutationObserver(function (muts) {
  muts.forEach(function (m) { m.addedNodes.forEach(function (n) {
    if (n.nodeType !== 1) return;
    var all = [n].concat(Array.prototype.slice.call(n.querySelectorAll('*')));
    all.forEach(function (e) {
      if (e.tagName === 'IMG' || e.tagName === 'IFRAME' || (e.tagName === 'SCRIPT' && !e.src)) window.__xss.push('injected:' + e.tagName);
      for (var i = 0; i < e.attributes.length; i++) {
        if (/^on/i.test(e.attributes[i].name)) window.__xss.push('handler:' + e.attributes[i].name);
      }
    });
  }); });
}).observe(document, {childList: true, subtree: true});
"""
