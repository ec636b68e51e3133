"""``llm-sae export``: an SAE or an analysis in another library's format."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from llm_sae.common.outdir import staged
from llm_sae.config import ConfigError, add_arguments, from_args
from llm_sae.interop.circuit_tracer import export_circuit_tracer
from llm_sae.interop.neuronpedia import export_neuronpedia
from llm_sae.interop.saelens import export_saelens


@dataclass
class ExportConfig:
    """Write an SAE in SAELens's format, or an analysis in Neuronpedia's batch JSONL format."""

    format: str
    """Target format: saelens (needs --sae), circuit-tracer (--sae, a train-clt output) or
    neuronpedia (needs --analysis)."""
    out: str
    """Output directory."""
    sae: str | None = None
    """Saved SAE directory to export (for --format saelens)."""
    analysis: str | None = None
    """Analysis directory (`llm-sae analyze --out`) to export (for --format neuronpedia)."""
    push_to_hub: str | None = None
    """saelens: also upload the export to this hub repository (ORG/NAME, created if missing) with a generated model card; needs `hf auth login`."""
    hub_subfolder: str | None = None
    """saelens --push-to-hub: folder of the SAE in the repository (default: its hook name)."""
    private: bool = False
    """saelens --push-to-hub: create the repository private."""
    hook_name: str | None = None
    """saelens: metadata.hook_name (default: the hook of the store the SAE was trained on)."""
    model_name: str | None = None
    """Model name: SAELens metadata.model_name, Neuronpedia's modelId (default: from the store or analysis)."""
    layer: int | None = None
    """neuronpedia: layer number of the source id (default: parsed from blocks.L.* hooks)."""
    source_set: str = "llm-sae"
    """neuronpedia: source set name; the source id is LAYER-SOURCE_SET."""
    release: str = "llm-sae"
    """neuronpedia: release name."""
    creator_name: str = "llm_sae"
    """neuronpedia: creator name written into the records."""
    creator_id: str = "llm-sae"
    """neuronpedia: creatorId written into the records (Neuronpedia's importer maps it to a user)."""
    features_per_batch: int = 1000
    """neuronpedia: features per batch-i.jsonl.gz file."""
    explanations: str | None = None
    """neuronpedia: `llm-sae explain` output to include (default: ANALYSIS/explanations when it exists)."""


def export(cfg: ExportConfig) -> Path:
    """Run one export; returns the directory written."""
    if cfg.format not in ("saelens", "circuit-tracer", "neuronpedia"):
        raise ConfigError(f"unknown --format {cfg.format!r}; choose saelens, circuit-tracer or neuronpedia")
    if cfg.format == "saelens" and not cfg.sae:
        raise ConfigError("--format saelens needs --sae DIR (a saved SAE)")
    if cfg.format == "circuit-tracer" and not cfg.sae:
        raise ConfigError("--format circuit-tracer needs --sae DIR (a cross-layer transcoder from train-clt)")
    if cfg.format == "neuronpedia" and not cfg.analysis:
        raise ConfigError("--format neuronpedia needs --analysis DIR (the output of `llm-sae analyze`)")
    if cfg.push_to_hub and cfg.format != "saelens":
        raise ConfigError("--push-to-hub uploads SAEs: use it with --format saelens")
    # Written whole into a temp folder and swapped in: never new weights beside an old cfg.json.
    with staged(cfg.out, "export", legacy=EXPORT_FILES) as tmp:
        written = Path(cfg.out) / _export_into(cfg, tmp).relative_to(tmp)
    if cfg.push_to_hub:
        from llm_sae.interop.hub import push_saelens_folder

        url = push_saelens_folder(written, cfg.push_to_hub, subfolder=cfg.hub_subfolder, private=cfg.private)
        print(f"uploaded to {url}")
    return written


# What an export folder holds (marks one written before output folders carried a marker).
EXPORT_FILES = ("cfg.json", "sae_weights.safetensors", "batch-0.jsonl.gz")


def _export_into(cfg: ExportConfig, out: Path) -> Path:
    if cfg.format == "saelens":
        assert cfg.sae is not None
        return export_saelens(cfg.sae, out, hook_name=cfg.hook_name, model_name=cfg.model_name)
    if cfg.format == "circuit-tracer":
        assert cfg.sae is not None
        return export_circuit_tracer(cfg.sae, out)
    assert cfg.analysis is not None
    return export_neuronpedia(
        cfg.analysis,
        out,
        model_id=cfg.model_name,
        layer=cfg.layer,
        source_set=cfg.source_set,
        release=cfg.release,
        creator_name=cfg.creator_name,
        creator_id=cfg.creator_id,
        features_per_batch=cfg.features_per_batch,
        explanations=cfg.explanations,
    )


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ExportConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(ExportConfig, args)
    out = export(cfg)
    print(f"wrote {cfg.format} export to {out}")
    return 0
