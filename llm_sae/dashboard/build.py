"""``llm-sae dashboard``: an analysis folder into a static site."""

from __future__ import annotations

import argparse
import os
from typing import Any

from llm_sae.common.outdir import staged
from llm_sae.config import add_arguments, from_args
from llm_sae.dashboard.config import DashboardConfig, DashboardError
from llm_sae.dashboard.read import read_analysis
from llm_sae.dashboard.site import SITE_MARKER, write_site


def build_dashboard(cfg: DashboardConfig) -> dict[str, Any]:
    """Write the site for ``cfg.analysis`` into ``cfg.out``; returns size statistics.

    The site is built in a temp folder and swapped in whole: a killed rebuild leaves the
    previous site as it was, and a rerun finds a site, not a half-deleted folder.
    """
    check_dashboard_config(cfg)
    meta, n, feats = read_analysis(cfg.analysis)
    with staged(cfg.out, "site", legacy=(SITE_MARKER,)) as tmp:
        return write_site(tmp, meta, feats, cfg, n_features=n)


def check_dashboard_config(cfg: DashboardConfig) -> None:
    """Numbers that cannot work, and an --out that would overwrite the analysis itself."""
    for name in ("top_tokens", "max_examples", "max_interval_examples", "max_logits", "max_neighbours"):
        if getattr(cfg, name) < 0:
            raise DashboardError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is negative; use 0 or more")
    if cfg.digits < 1:
        raise DashboardError(f"--digits {cfg.digits} keeps no digits; use 1 or more (default 3)")
    if not cfg.max_feature_kb > 0:
        raise DashboardError(f"--max-feature-kb {cfg.max_feature_kb} must be positive; use e.g. 30")
    if os.path.realpath(cfg.out) == os.path.realpath(cfg.analysis):
        raise DashboardError(f"--out {cfg.out} is the analysis folder itself; give the site its own folder")


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
