"""Which model and hook point a saved SAE reads: one reader for every folder format.

The live view, ``llm-sae steer`` and anything else that runs an SAE on its model ask here,
so a new metadata file or a SAELens key is learnt in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_sae.errors import LlmSaeError

META_FILES = ("cfg.json", "train_cfg.json", "train_config.json", "meta.json", "store.json")
MODEL_KEYS = ("model", "model_name", "model_path")
HOOK_KEYS = ("hook_name", "hook", "hook_point", "hooks")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sae_meta(sae_dir: str | Path) -> dict[str, Any]:
    """The metadata an SAE folder records, merged (the first file to name a key wins).

    Nested ``store``/``manifest``/``meta``/``metadata`` dicts are flattened in: SAELens v6
    keeps model_name and hook_name under "metadata". When `llm-sae train` recorded the
    store it read (train_cfg.json), that store's manifest.json (the store's on-disk
    contract, docs/internals.md) fills in what the SAE folder lacks.
    """
    sae_dir = Path(sae_dir)
    meta: dict[str, Any] = {}
    for name in META_FILES:
        data = _read_json(sae_dir / name)
        # "source": what `llm-sae train` records of the data it read (model, hook, ...).
        nested = [data[n] for n in ("source", "store", "manifest", "meta", "metadata")
                  if isinstance(data.get(n), dict)]
        for part in (data, *nested):
            for k, v in part.items():
                if meta.get(k) in (None, ""):  # a null (train_cfg's unused --model) names nothing
                    meta[k] = v
    store_path = meta.get("store")
    if isinstance(store_path, str):
        manifest = _read_json(Path(store_path) / "manifest.json")  # a moved store: {}
        for key in ("hook", "model"):
            if isinstance(manifest.get(key), str):
                meta.setdefault(key + "_name", manifest[key])
    return meta


def first_str(meta: dict[str, Any], *keys: str) -> str | None:
    """The first of ``keys`` holding a non-empty string (a one-element list counts)."""
    for k in keys:
        v = meta.get(k)
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if isinstance(v, str) and v:
            return v
    return None


def recorded_model_and_hook(sae_dir: str | Path) -> tuple[str | None, str | None]:
    """(model, hook) the SAE in ``sae_dir`` was trained on; None for what it does not record."""
    meta = sae_meta(sae_dir)
    return first_str(meta, *MODEL_KEYS), first_str(meta, *HOOK_KEYS)


def recorded_target_hook(sae_dir: str | Path) -> str | None:
    """The hook a transcoder predicts (its decoder writes there): the target store's
    manifest for our runs (train_cfg.json's ``target_store``), SAELens's ``hook_name_out``;
    None for an SAE, or where nothing records it."""
    meta = sae_meta(sae_dir)
    target = meta.get("target_store")
    if isinstance(target, str):
        hook = _read_json(Path(target) / "manifest.json").get("hook")
        if isinstance(hook, str) and hook:
            return hook
    return first_str(meta, "hook_name_out")


class MismatchError(LlmSaeError):
    """An SAE and a store (or model) that come from different places."""


def recorded_source(sae_dir: str | Path) -> dict[str, Any]:
    """What `llm-sae train` recorded of its data in train_cfg.json (model, hook, d_in,
    context_length, fingerprint: resolved, not where the command ran); {} otherwise."""
    src = _read_json(Path(sae_dir) / "train_cfg.json").get("source")
    return {k: v for k, v in src.items() if v not in (None, "")} if isinstance(src, dict) else {}


def recorded_store(sae_dir: str | Path) -> str | None:
    """The store `llm-sae train` read (train_cfg.json's ``store``, made absolute when it
    ran); None for a run from a model (on the fly), another tool's SAE, or no record."""
    store = _read_json(Path(sae_dir) / "train_cfg.json").get("store")
    return store if isinstance(store, str) and store else None


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def check_same_source(sae_dir: str | Path, store_dir: str | Path, hook: str | None, model: str | None) -> None:
    """MismatchError naming both values when the SAE was trained at another hook (or, for
    our own runs, on another model) than the store's: an SAE of one hook would otherwise
    "evaluate" on a store of another hook of the same width. Silent where either side
    records nothing. The model only from our own record: a SAELens model_name is a hub
    name that a store harvested from a local copy of the same model does not repeat."""
    _, rec_hook = recorded_model_and_hook(sae_dir)
    if rec_hook and hook and rec_hook != hook:
        raise MismatchError(
            f"the SAE at {sae_dir} was trained at hook {rec_hook} but the store at {store_dir} "
            f"holds hook {hook}; give a store harvested at {rec_hook}"
        )
    own = recorded_source(sae_dir).get("model")
    if isinstance(own, str) and model and not _same_model(own, str(model)):
        raise MismatchError(
            f"the SAE at {sae_dir} was trained on model {own} but the store at {store_dir} comes "
            f"from model {model}; give a store harvested from {own}"
        )
