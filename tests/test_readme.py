"""README's architecture table stays in step with the registry and the config it documents."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from llm_sae.sae.archs import PARAMS
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY
from llm_sae.train.config import TrainConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def architecture_section() -> str:
    text = README.read_text()
    start = text.index("## Architectures")
    return text[start : text.index("\n## ", start + 1)]


def test_the_table_names_every_registered_architecture():
    section = architecture_section()
    missing = [arch for arch in REGISTRY if f"`{arch}`" not in section]
    assert not missing, f"README's architecture table lacks {missing}"


def test_every_flag_in_the_table_exists_and_every_modern_knob_is_listed():
    section = architecture_section()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = set(re.findall(r"`--([a-z0-9-]+)", section))
    assert flags, "no flags found in the table"
    unknown = sorted(f for f in flags if f.replace("-", "_") not in fields)
    assert not unknown, f"README names flags that do not exist: {unknown}"
    # The knobs of the architectures researchers train now are all in the table.
    modern = [p for p in PARAMS if p.__name__ in ("BatchTopKParams", "MatryoshkaParams", "JumpReLUParams")]
    assert len(modern) == 3
    knobs = {f.name.replace("_", "-") for p in modern for f in dataclasses.fields(p)} - {"stat-momentum"}
    assert knobs <= flags, f"README's table lacks {sorted(knobs - flags)}"
    assert "target_l0" in {f.name for f in dataclasses.fields(SAEConfig)}
