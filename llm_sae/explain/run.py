"""`llm-sae explain`: explanations and scores for an analysis's features, resumable.

Output (default ``ANALYSIS/explanations/``):

```
run.json                          the settings that shape results (model, prompt versions, …)
features/000/f_000123.json        one feature: explanation, scores, usage; rewritten atomically
summary.json                      means over the run's features, token and cost totals
```

Each result is written atomically the moment it arrives (the explanation, then each
score), so a killed run loses only the requests in flight, and a rerun with the same
settings continues: it asks only for what is missing. A rerun with different settings
(another model, prompt version or seed) is refused rather than mixing two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_sae.common.analysis_files import load_feature, load_index, load_summary
from llm_sae.common.atomic import write_json_atomic
from llm_sae.common.explanation_files import RUN_FILE, read_result, result_path
from llm_sae.config import add_arguments, from_args
from llm_sae.errors import ExplainError, LlmSaeError
from llm_sae.explain.client import ChatBackend, ChatClient, HFChatBackend
from llm_sae.explain.examples import NegativeContexts, split_examples, vocab_strings
from llm_sae.explain.prompts import VERSIONS, explain_messages, parse_explanation
from llm_sae.explain.scorers import SCORERS, detection, fuzzing


@dataclass
class ExplainConfig:
    """Explain an analysis's features with an LLM and score the explanations."""

    analysis: str
    """The analysis directory written by `llm-sae analyze`."""
    model: str | None = None
    """The explainer/scorer model: its name at --endpoint, or with --backend hf a local HF causal LM."""
    backend: str = "openai"
    """openai (any OpenAI-compatible chat endpoint: vLLM, Ollama, llama.cpp, OpenAI) or hf (a local transformers model)."""
    endpoint: str = "http://127.0.0.1:8000/v1"
    """API base of the chat endpoint (…/v1)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset is fine for local servers)."""
    out: str | None = None
    """Output directory (default: ANALYSIS/explanations)."""
    features: list[int] = field(default_factory=list)
    """Explain only these feature ids (e.g. 3,17,42)."""
    top: int | None = None
    """Explain only the N features that fire most often."""
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    """Scorers to run: detection, fuzzing (none: --scorers '')."""
    explain_examples: int = 10
    """Top examples shown to the explainer (every other top example, strongest first)."""
    score_examples: int = 10
    """Held-out activating examples per scorer (detection adds as many negatives)."""
    batch: int = 10
    """Examples per scoring prompt."""
    concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 6
    """Retries of a request that failed with 408/409/429/5xx, a timeout or a dropped connection
    (back-off 0.5 s doubling to 8 s, with jitter; the server's Retry-After wins)."""
    timeout: float = 120.0
    """Seconds to wait for one answer."""
    max_tokens: int = 400
    """Most tokens the model may write per answer."""
    temperature: float = 0.0
    """Sampling temperature of the explainer (scorers always use 0)."""
    seed: int = 0
    """Seed of the example splits, the negatives and the endpoint's sampling."""
    store: str | None = None
    """Activation store for detection's negatives (default: the one the analysis read)."""
    sae: str | None = None
    """SAE that encodes the negatives (default: the one the analysis read)."""
    negative_windows: int = 500
    """Random store windows encoded to find each feature's non-activating contexts."""
    price_in: float = 0.0
    """USD per million prompt tokens, for the cost shown (0: no cost)."""
    price_out: float = 0.0
    """USD per million completion tokens."""
    device: str = "cpu"
    """Device for the SAE that finds negatives, and for --backend hf."""
    overwrite: bool = False
    """Start again, deleting results a run with other settings left in --out."""
    progress: bool = True
    """Show a progress bar."""


def _settings(cfg: ExplainConfig) -> dict[str, Any]:
    return {"backend": cfg.backend, "model": cfg.model, "prompts": VERSIONS, "seed": cfg.seed,
            "explain_examples": cfg.explain_examples, "score_examples": cfg.score_examples,
            "batch": cfg.batch, "temperature": cfg.temperature}


def _check(cfg: ExplainConfig, summary: dict[str, Any]) -> tuple[list[int], Path]:
    """Everything that can be wrong with the request, found before any long work."""
    if not cfg.model:
        raise ExplainError("give --model: the model's name at --endpoint, or a local model with --backend hf")
    if cfg.backend not in ("openai", "hf"):
        raise ExplainError(f"--backend {cfg.backend!r} is unknown; use openai or hf")
    bad = [s for s in cfg.scorers if s not in SCORERS]
    if bad:
        raise ExplainError(f"unknown scorer(s) {bad}; choose from {', '.join(SCORERS)}")
    n = int(summary["n_features"])
    if any(not 0 <= f < n for f in cfg.features):
        raise ExplainError(f"--features must lie in 0..{n - 1} (this analysis has {n} features)")
    index = load_index(cfg.analysis)
    live = [r for r in index if not r.get("dead") and r.get("count")]
    if cfg.features:
        chosen = sorted(set(cfg.features))
    elif cfg.top:
        chosen = sorted(r["id"] for r in sorted(live, key=lambda r: -int(r["count"]))[: cfg.top])
    else:
        chosen = [int(r["id"]) for r in live]
    out = Path(cfg.out or Path(cfg.analysis) / "explanations")
    prev = out / RUN_FILE
    if prev.is_file() and not cfg.overwrite:
        old = json.loads(prev.read_text()).get("settings", {})
        diff = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in _settings(cfg).items() if old.get(k) != v]
        if diff:
            raise ExplainError(f"{out} holds a run with other settings ({'; '.join(diff)}); pass "
                               "another --out, or --overwrite to delete it and start again")
    return chosen, out


def _negatives(cfg: ExplainConfig, summary: dict[str, Any], features: list[int]) -> NegativeContexts:
    from llm_sae.sae import load_sae
    from llm_sae.store import open_store

    store_path = cfg.store or (summary.get("store") or {}).get("path")
    sae_path = cfg.sae or (summary.get("sae") or {}).get("path")
    try:
        store, sae = open_store(store_path), load_sae(sae_path, device=cfg.device)
    except (LlmSaeError, TypeError) as e:
        raise ExplainError(f"detection needs the store and SAE the analysis read ({e}); pass "
                           "--store and --sae, or score with --scorers fuzzing only") from None
    opts = summary.get("options") or {}
    width = int(opts.get("context_before", 10)) + int(opts.get("context_after", 5)) + 1
    return NegativeContexts(store, sae, features, width=width, n_windows=cfg.negative_windows,
                            seed=cfg.seed, vocab=vocab_strings(cfg.analysis), device=cfg.device)


def make_backend(cfg: ExplainConfig) -> ChatBackend:
    if cfg.backend == "hf":
        return HFChatBackend(str(cfg.model), device=cfg.device)
    return ChatClient(cfg.endpoint, str(cfg.model), api_key=os.environ.get(cfg.api_key_env) or None,
                      concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout=cfg.timeout,
                      seed=cfg.seed)


def explain_feature(cfg: ExplainConfig, backend: ChatBackend, out: Path, feature: int,
                    negatives: NegativeContexts | None) -> dict[str, Any]:
    """Explain and score one feature, saving after every answer; skips what is saved."""
    rec = load_feature(cfg.analysis, feature)
    res = read_result(out, feature) or {"id": feature, "model": cfg.model, "scores": {},
                                        "usage": {"prompt_tokens": 0, "completion_tokens": 0}}
    shown, held = split_examples(rec, cfg.explain_examples, cfg.score_examples, cfg.seed)

    def save(usage: dict[str, int]) -> None:
        for k in ("prompt_tokens", "completion_tokens"):
            res["usage"][k] += int(usage.get(k, 0))
        result_path(out, feature).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result_path(out, feature), res)

    if "explanation" not in res:
        msgs = explain_messages([(w.tokens, w.acts) for w in shown], float(rec.get("max_act") or 0))
        reply = backend.complete(msgs, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        res.update(explanation=parse_explanation(reply.text), prompt=VERSIONS["explain"],
                   reply=reply.text[-2000:], explained_on=[w.row for w in shown])
        save({"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens})
    for name in cfg.scorers:
        if name in res["scores"]:
            continue
        kw = {"feature": feature, "seed": cfg.seed, "batch": cfg.batch, "max_tokens": cfg.max_tokens}
        if name == "detection":
            assert negatives is not None
            neg = negatives.for_feature(feature, len(held), cfg.seed)
            score = detection(backend, res["explanation"], held, neg, **kw)
        else:
            score = fuzzing(backend, res["explanation"], held, **kw)
        usage = score.pop("usage")
        res["scores"][name] = score
        save(usage)
    return res


def _todo(cfg: ExplainConfig, out: Path, features: list[int]) -> list[int]:
    """Features with something left to ask for."""
    todo = []
    for f in features:
        res = read_result(out, f)
        if res is None or "explanation" not in res or any(s not in res["scores"] for s in cfg.scorers):
            todo.append(f)
    return todo


def summarize(out: Path, features: list[int], scorers: list[str]) -> dict[str, Any]:
    """Means of each score over the features that have it (the SAE-level number)."""
    results = [r for r in (read_result(out, f) for f in features) if r is not None]
    scores: dict[str, Any] = {}
    for name in scorers:
        vals = [r["scores"][name]["balanced_accuracy"] for r in results
                if name in r.get("scores", {}) and r["scores"][name]["balanced_accuracy"] is not None]
        scores[name] = {"mean_balanced_accuracy": round(sum(vals) / len(vals), 4) if vals else None,
                        "n_features": len(vals)}
    usage = {k: sum(int(r.get("usage", {}).get(k, 0)) for r in results)
             for k in ("prompt_tokens", "completion_tokens")}
    return {"n_features": len(features), "n_explained": sum("explanation" in r for r in results),
            "scores": scores, "usage": usage}


def explain(cfg: ExplainConfig) -> dict[str, Any]:
    """Explain and score ``cfg``'s features; returns the run summary (also in summary.json)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary = load_summary(cfg.analysis)
    features, out = _check(cfg, summary)
    if cfg.overwrite and out.is_dir():
        shutil.rmtree(out / "features", ignore_errors=True)
    todo = _todo(cfg, out, features)
    negatives = None
    if todo and "detection" in cfg.scorers:
        negatives = _negatives(cfg, summary, todo)
    backend = make_backend(cfg) if todo else None
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_FILE, {"analysis": str(cfg.analysis), "settings": _settings(cfg),
                                          "endpoint": cfg.endpoint if cfg.backend == "openai" else None})
    bar = tqdm(total=len(todo), desc="explain", unit="feat", disable=not cfg.progress or None)
    if todo:
        assert backend is not None
        with ThreadPoolExecutor(max(1, cfg.concurrency), thread_name_prefix="explain") as pool:
            futures = [pool.submit(explain_feature, cfg, backend, out, f, negatives) for f in todo]
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        fut.result()  # the first failure stops the run: re-raise it here
                        bar.update(1)
                    u = backend.usage
                    bar.set_postfix(tokens=u.prompt_tokens + u.completion_tokens, retries=u.retries, refresh=False)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    bar.close()
    result = summarize(out, features, cfg.scorers)
    run_usage = backend.usage.as_dict() if backend is not None else {}
    result.update(this_run=run_usage, elapsed_s=round(time.perf_counter() - t0, 3),
                  cost_usd=round((result["usage"]["prompt_tokens"] * cfg.price_in
                                  + result["usage"]["completion_tokens"] * cfg.price_out) / 1e6, 6))
    write_json_atomic(out / "summary.json", result)
    return result


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ExplainConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(ExplainConfig, args)
    s = explain(cfg)
    means = ", ".join(f"{k} {v['mean_balanced_accuracy']}" for k, v in s["scores"].items())
    tokens = s["usage"]["prompt_tokens"] + s["usage"]["completion_tokens"]
    print(f"explained {s['n_explained']}/{s['n_features']} features; mean balanced accuracy: "
          f"{means or 'not scored'}; {tokens:,} tokens" + (f", ${s['cost_usd']:.4f}" if s["cost_usd"] else "")
          + f"; wrote {cfg.out or Path(cfg.analysis) / 'explanations'}")
    return 0
