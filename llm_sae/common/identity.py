"""What data an SAE was trained on (model, hook, store fingerprint), read from its folder.

``llm-sae train`` records it in ``train_cfg.json`` under ``source``; a SAELens folder keeps
``model_name`` and ``hook_name`` in ``cfg.json`` (or its ``metadata``). Analyze and eval
compare it with the store they are given, so an SAE trained at one hook is never measured
"successfully" on a store of another hook that happens to have the same width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_sae.errors import LlmSaeError


class MismatchError(LlmSaeError):
    """An SAE and a store (or model) that come from different places."""


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sae_source(sae_dir: str | Path) -> dict[str, Any]:
    """``{"model", "hook", "fingerprint", ...}`` of the data the SAE was trained on; keys
    that no file records are absent."""
    d = Path(sae_dir)
    run = _read(d / "train_cfg.json")
    src = dict(run.get("source") or {}) if isinstance(run.get("source"), dict) else {}
    recorded_model = src.get("model")  # as our own harvest wrote it, comparable with a store's
    cfg = _read(d / "cfg.json")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for key, names in (("model", ("model_name",)), ("hook", ("hook_name",))):
        if not src.get(key):
            found = next((c.get(n) for c in (cfg, meta) for n in names if c.get(n)), None)
            if found:
                src[key] = found
    store = run.get("store")
    if (not src.get("model") or not src.get("hook")) and isinstance(store, str) and store:
        # A run recorded before train_cfg.json carried "source": its store, if still there.
        sp = Path(store)
        manifest = _read((sp if sp.is_absolute() else d / sp) / "manifest.json") or _read(sp / "manifest.json")
        for key in ("model", "hook"):
            if not src.get(key) and manifest.get(key):
                src[key] = manifest[key]
    src["recorded_model"] = recorded_model
    return {k: v for k, v in src.items() if v not in (None, "")}


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_same_source(sae_dir: str | Path, store_dir: str | Path, hook: str | None, model: str | None) -> None:
    """MismatchError naming both values when the SAE's recorded hook or model differs
    from the store's; silent when either side does not record it."""
    src = sae_source(sae_dir)
    if src.get("hook") and hook and src["hook"] != hook:
        raise MismatchError(
            f"the SAE at {sae_dir} was trained at hook {src['hook']} but the store at {store_dir} "
            f"holds hook {hook}; give a store harvested at {src['hook']}"
        )
    # The model only when our own training recorded it: a SAELens model_name is a hub
    # name that a store harvested from a local copy of the same model does not repeat.
    if src.get("recorded_model") and model and not _same_model(str(src["recorded_model"]), str(model)):
        raise MismatchError(
            f"the SAE at {sae_dir} was trained on model {src['recorded_model']} but the store at "
            f"{store_dir} comes from model {model}; give a store harvested from {src['recorded_model']}"
        )
