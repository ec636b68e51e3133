"""``llm-sae train``: one SAE, or a sweep of many from one stream of batches."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

from llm_sae.common.process import return_large_blocks_to_os
from llm_sae.config import ConfigError, add_arguments, from_args
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train
from llm_sae.train.sweep import SHARED, sweep_configs, train_sweep


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, TrainConfig, exclude=("d_in",))
    parser.add_argument(
        "--sweep", metavar="FILE",
        help="YAML list of SAE specs (mappings of the fields above, e.g. {arch: topk, k: 32}) "
        "trained together from one stream into OUT/<name>/; comma lists of one field "
        "(--k 16,32,64 --expansion 8,32 --arch topk,batchtopk) sweep its grid too",
    )


def sweep_axes(args: argparse.Namespace) -> dict[str, list[str]]:
    """Scalar fields given as comma lists (``--k 16,32``): the sweep's grid. Removed from
    ``args`` so the base config parses."""
    hints = typing.get_type_hints(TrainConfig)
    axes = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        scalar = typing.get_origin(hints[f.name]) not in (list, tuple)
        # Fields one for the whole sweep (a path, the batch size) keep their commas.
        if scalar and f.name not in SHARED and isinstance(value, str) and "," in value:
            axes[f.name] = [v for v in value.split(",") if v]
            setattr(args, f.name, None)
    return axes


def load_specs(path: str) -> list[dict]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--sweep {path} does not exist")
    specs = yaml.safe_load(p.read_text())
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise ConfigError(f"--sweep {path} must hold a YAML list of mappings (one per SAE), e.g. - {{arch: topk, k: 32}}")
    return specs


def run_cli(args: argparse.Namespace) -> int:
    axes = sweep_axes(args)
    cfg = from_args(TrainConfig, args)
    specs = load_specs(args.sweep) if getattr(args, "sweep", None) else None
    if cfg.device in ("cpu", "auto"):
        return_large_blocks_to_os()  # process-wide, so the command opts in, not the library
    if axes or specs:
        cfgs = sweep_configs(cfg, axes, specs)
        out = train_sweep(cfgs)
        what = f"saved a sweep of {len(cfgs)} SAEs to {out} (sweep.json lists them; `llm-sae eval --sae {out}`)"
    else:
        out = train(cfg)
        what = f"saved SAE to {out} (load with llm_sae.sae.load_sae)"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(what)
    return 0
