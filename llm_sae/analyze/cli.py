"""``llm-sae analyze``."""

from __future__ import annotations

import argparse

from llm_sae.analyze.config import AnalyzeConfig
from llm_sae.analyze.run import analyze
from llm_sae.config import add_arguments, from_args


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, AnalyzeConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(AnalyzeConfig, args)
    s = analyze(cfg)
    if not s:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(f"analysed {s['tokens_analysed']:,} tokens × {s['n_features']:,} features in {s['elapsed_s']:.1f}s: "
          f"{s['n_dead']} dead, {s['n_dense']} dense, mean L0 {s['l0']['mean']}; wrote {cfg.out}")
    return 0
