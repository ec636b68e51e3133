"""``llm-sae train``."""

from __future__ import annotations

import argparse
import os

from llm_sae.common.process import return_large_blocks_to_os
from llm_sae.config import add_arguments, from_args
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, TrainConfig, exclude=("d_in",))


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(TrainConfig, args)
    if cfg.device in ("cpu", "auto"):
        return_large_blocks_to_os()  # process-wide, so the command opts in, not the library
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(f"saved SAE to {out} (load with llm_sae.sae.load_sae)")
    return 0
