"""``llm-sae harvest``."""

from __future__ import annotations

import argparse
import os

from llm_sae.config import add_arguments, from_args
from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.run import harvest


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, HarvestConfig, exclude=("extra",))


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(HarvestConfig, args)
    dirs = harvest(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        for h, d in dirs.items():
            print(f"{h}\t{d}")
    return 0
