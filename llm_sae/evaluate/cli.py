"""``llm-sae eval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from llm_sae.config import add_arguments, from_args
from llm_sae.evaluate.config import EvalConfig
from llm_sae.evaluate.report import format_table
from llm_sae.evaluate.run import evaluate


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, EvalConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(EvalConfig, args)
    report = evaluate(cfg)
    print(format_table(report), end="")
    out = Path(cfg.out) if cfg.out else Path(cfg.sae[0]) / "eval"
    print(f"\nwrote {out / 'eval.json'}" + (f" and {out / 'frontier.png'}" if len(report["saes"]) > 1 else ""))
    return 0
