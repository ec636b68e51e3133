"""`llm-sae demo`: the whole pipeline on the embedded model and corpus, offline, in minutes.

harvest → train → analyze → dashboard → eval, each stage through its own public entry
point and config (nothing here reaches into a stage's internals), so the demo is also the
shortest worked example of the Python API. Every stage resumes, so rerunning the demo
after an interruption picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_sae.config import add_arguments, from_args


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Folder for everything the demo makes: store/, sae/, analysis/, site/, eval/."""
    model: str = "tiny-stdlib"
    """Model to harvest from: the embedded model's short name, a local HF directory or a hub name."""
    dataset: str = "stdlib"
    """Text to harvest: `stdlib` (the Python standard library's own source) or any --dataset that harvest takes."""
    hook: str | None = None
    """Hook point to study; default: the residual stream after the model's middle block."""
    tokens: int = 1_000_000
    """Tokens to harvest into the store."""
    context_length: int = 128
    """Tokens per context (at most the model's positions)."""
    train_tokens: int = 4_000_000
    """Tokens to train the SAE on (the store is cycled when this exceeds its size)."""
    expansion: int = 16
    """Latents per input dimension."""
    k: int = 16
    """Active latents per token (TopK)."""
    analyze_tokens: int | None = None
    """Tokens the analysis pass reads (default: the whole store)."""
    small: bool = False
    """A reduced size that runs in well under a minute (for CI and a first look)."""
    eval: bool = True
    """Also run the evaluation (reconstruction and loss recovered with the SAE spliced in)."""
    device: str = "auto"
    """Device for every stage: auto, cpu, cuda, cuda:1, …"""


def middle_hook(model: str) -> str:
    """The residual stream after the middle block; AutoConfig knows every architecture's
    layer count (``n_layer``, ``num_hidden_layers``, …) for local directories and hub names."""
    from transformers import AutoConfig

    from llm_sae.lm.models import resolve_model

    n_layers = AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers
    return f"blocks.{n_layers // 2}.hook_resid_post"


def _sizes(cfg: DemoConfig) -> DemoConfig:
    if not cfg.small:
        return cfg
    from dataclasses import replace

    return replace(
        cfg, tokens=min(cfg.tokens, 40_000), train_tokens=min(cfg.train_tokens, 200_000),
        expansion=min(cfg.expansion, 4), analyze_tokens=min(cfg.analyze_tokens or 20_000, 20_000),
    )


def demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage into ``cfg.out``; returns the summary that is also printed."""
    from llm_sae.analyze.config import AnalyzeConfig
    from llm_sae.analyze.run import analyze
    from llm_sae.dashboard.build import build_dashboard
    from llm_sae.dashboard.config import DashboardConfig
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import train

    cfg = _sizes(cfg)
    out = Path(cfg.out)
    hook = cfg.hook or middle_hook(cfg.model)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, fn, *args):
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    stores = stage("harvest", harvest, HarvestConfig(
        model=cfg.model, hook=[hook], dataset=cfg.dataset, tokens=cfg.tokens,
        out=str(out / "store"), context_length=cfg.context_length, device=cfg.device,
    ))
    store_dir = str(stores[hook])
    sae_dir = stage("train", train, TrainConfig(
        store=store_dir, out=str(out / "sae"), arch="topk", expansion=cfg.expansion, k=cfg.k,
        tokens=cfg.train_tokens, batch_size=1024 if cfg.small else 4096,
        log_every=50, checkpoint_every=max(cfg.train_tokens // 4, 1), device=cfg.device,
    ))
    stage("analyze", analyze, AnalyzeConfig(
        sae=str(sae_dir), store=store_dir, out=str(out / "analysis"), tokens=cfg.analyze_tokens,
        model=cfg.model, device=None if cfg.device == "auto" else cfg.device,
    ))
    stage("dashboard", build_dashboard, DashboardConfig(
        analysis=str(out / "analysis"), out=str(out / "site"),
    ))
    summary: dict[str, Any] = {
        "model": cfg.model, "hook": hook, "tokens_harvested": _store_rows(store_dir),
        "tokens_trained": cfg.train_tokens, "sae": str(sae_dir),
        "dashboard": str((out / "site" / "index.html").resolve()),
    }
    analysis_summary = json.loads((out / "analysis" / "summary.json").read_text())
    summary["n_features"] = analysis_summary.get("n_features")
    if cfg.eval:
        from llm_sae.evaluate.config import EvalConfig
        from llm_sae.evaluate.run import evaluate

        report = stage("eval", evaluate, EvalConfig(
            sae=[str(sae_dir)], store=store_dir, out=str(out / "eval"), device=cfg.device,
            n_contexts=16 if cfg.small else 64, amortization=not cfg.small, amortization_rows=256,
            eval_rows=8192 if cfg.small else 65536,
        ))
        (entry,) = report["saes"].values()
        summary.update(_headline(entry))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["stage_seconds"] = timings
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _store_rows(store_dir: str) -> int:
    from llm_sae.store.store import open_store

    return open_store(store_dir).n_rows


def _headline(entry: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a first look needs, from one SAE's eval entry."""
    out: dict[str, Any] = {
        "fvu": entry["reconstruction"]["fvu"],
        "l0": entry["sparsity"]["l0"].get("mean"),
        "dead_fraction": entry["sparsity"]["dead_frac"],
    }
    for key in ("loss_recovered_zero", "loss_recovered_mean"):
        if key in entry.get("downstream", {}):
            out[key] = entry["downstream"][key]
    return out


def format_summary(s: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [
        ("model / hook", f"{s['model']} / {s['hook']}"),
        ("tokens harvested", num(s["tokens_harvested"])),
        ("tokens trained", num(s["tokens_trained"])),
        ("features", num(s.get("n_features"))),
    ]
    for key, label in (("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"),
                       ("loss_recovered_zero", "loss recovered (vs zero-ablation)"),
                       ("loss_recovered_mean", "loss recovered (vs mean-ablation)")):
        if key in s:
            rows.append((label, num(s[key])))
    rows.append(("time", f"{s['seconds']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in s['stage_seconds'].items())})"))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {a:<{width}}  {b}" for a, b in rows]
    lines.append(f"\nOpen the dashboard: {s['dashboard']}")
    lines.append(f"  or serve it:      llm-sae serve {Path(s['dashboard']).parent}")
    return "\n".join(["", "llm_sae demo: done", *lines, ""])


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, DemoConfig)


def run_cli(args: argparse.Namespace) -> int:
    summary = demo(from_args(DemoConfig, args))
    print(format_summary(summary))
    return 0
