"""``llm-sae dashboard``: an analysis folder into a static site."""

from __future__ import annotations

import argparse
import os
from typing import Any

from llm_sae.config import add_arguments, from_args
from llm_sae.dashboard.config import DashboardConfig
from llm_sae.dashboard.read import read_analysis
from llm_sae.dashboard.site import write_site


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
