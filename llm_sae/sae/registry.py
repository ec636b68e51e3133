"""Architectures by name: each file in ``sae/archs`` registers its class here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_sae.sae.base import SAE

REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    REGISTRY[cls.arch] = cls
    return cls
