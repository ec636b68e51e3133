"""The config machinery: one dataclass gives the CLI flags, their help, and YAML/JSON loading."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from llm_sae.config import ConfigError, add_arguments, field_docs, from_args, load_config, to_dict


@dataclass
class DemoConfig:
    store: str
    """Directory of the activation store."""
    k: int = 32
    """Active latents per token."""
    lr: float | None = None
    """Learning rate; derived from the width when left out."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.0.hook_resid_post"])
    """Hook points to record."""
    wandb: bool = False
    """Log to Weights & Biases."""


def parse(argv: list[str]) -> DemoConfig:
    p = argparse.ArgumentParser()
    add_arguments(p, DemoConfig)
    return from_args(DemoConfig, p.parse_args(argv))


def test_docstrings_become_help():
    docs = field_docs(DemoConfig)
    assert docs["k"] == "Active latents per token."
    p = argparse.ArgumentParser()
    add_arguments(p, DemoConfig)
    text = p.format_help()
    assert "Active latents per token. (default: 32)" in text
    assert "Directory of the activation store. (required)" in text


def test_flags_are_typed_and_defaults_kept():
    cfg = parse(["--store", "s", "--k", "8", "--lr", "3e-4", "--wandb"])
    assert cfg == DemoConfig(store="s", k=8, lr=3e-4, wandb=True)
    assert parse(["--store", "s"]).hooks == ["blocks.0.hook_resid_post"]


def test_list_flags_repeat_or_split_on_commas():
    assert parse(["--store", "s", "--hooks", "a", "--hooks", "b,c"]).hooks == ["a", "b", "c"]


def test_missing_required_flag_is_named():
    with pytest.raises(ConfigError, match="--store"):
        parse([])


def test_bad_value_names_field_and_type():
    with pytest.raises(ConfigError, match="'k'.*int"):
        parse(["--store", "s", "--k", "lots"])


def test_config_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("store: from_file\nk: 16\nhooks: [x, y]\n")
    cfg = parse(["--config", str(f), "--k", "4"])
    assert (cfg.store, cfg.k, cfg.hooks) == ("from_file", 4, ["x", "y"])


def test_json_round_trip_and_unknown_keys(tmp_path):
    cfg = DemoConfig(store="s", k=3)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(to_dict(cfg)))
    assert load_config(DemoConfig, f) == cfg
    f.write_text(json.dumps({"store": "s", "kk": 3}))
    with pytest.raises(ConfigError, match=r"unknown DemoConfig field\(s\) \['kk'\].*valid fields"):
        load_config(DemoConfig, f)
