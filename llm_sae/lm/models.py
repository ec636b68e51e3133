"""Which model a name means, and loading it as a TransformerLens ``TransformerBridge``.

Short names ("tiny-stdlib", or just "tiny") mean the models shipped inside the package,
so the toolkit works with no network and no downloaded model. Anything else is passed
through unchanged: a local ``save_pretrained`` directory or a Hugging Face hub name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from llm_sae.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

ASSETS_DIR = Path(__file__).parent.parent / "assets"

#: Shipped models: short name → directory name under ``llm_sae/assets``.
SHIPPED = {"tiny-stdlib": "tiny-stdlib"}
#: Other spellings accepted for a shipped model.
ALIASES = {"tiny": "tiny-stdlib", "tiny_stdlib": "tiny-stdlib"}

DEFAULT_MODEL = "tiny-stdlib"

_RETRAIN_HINT = (
    "reinstall llm_sae (the weights ship inside the package), or rebuild them with "
    "`python scripts/train_tiny_lm.py --out {path}`"
)


def list_models() -> dict[str, Path]:
    """The shipped models present in this installation: short name → directory."""
    out = {}
    for name, sub in SHIPPED.items():
        path = ASSETS_DIR / sub
        if (path / "config.json").is_file():
            out[name] = path
    return out


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-with-dots, or with a
    # home tilde or backslash can only be a path.
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A shipped model's short name → its directory; anything else is returned unchanged.

    Raises ModelError for a shipped name whose files are missing from this installation,
    or for something that can only be a local path but does not exist.
    """
    name = str(name_or_path)
    key = ALIASES.get(name, name)
    if key in SHIPPED:
        path = ASSETS_DIR / SHIPPED[key]
        if not (path / "config.json").is_file():
            raise ModelError(
                f"the shipped model {key!r} is missing its files under {path}; "
                + _RETRAIN_HINT.format(path=path)
            )
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json, so it is not a saved model; pass the directory "
                "that model.save_pretrained() and tokenizer.save_pretrained() wrote"
            )
        return str(path)
    if _looks_local(name):
        raise ModelError(
            f"model directory {name} does not exist; check the path, or use a hub name or "
            f"one of the shipped models: {', '.join(SHIPPED)}"
        )
    return name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _check_cached(name: str) -> None:
    """Under HF_HUB_OFFLINE, fail early and clearly if a hub model is not in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return
    try:
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is reported below the same way
        hit = None
    if not isinstance(hit, str):
        raise ModelError(
            f"{name!r} is not a shipped model, not a local directory, and not in the Hugging "
            "Face cache, and HF_HUB_OFFLINE is set so it cannot be downloaded; unset "
            f"HF_HUB_OFFLINE (once, to download it), pass a local model directory, or use "
            f"{DEFAULT_MODEL!r} (ships with llm_sae)"
        )


def load_bridge(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> TransformerBridge:
    """Resolve ``name_or_path`` and boot it as a ``TransformerBridge`` on ``device``, in eval
    mode: the one model loader every stage uses (through ``lm.hooks.load_model``).

    ``dtype`` is a torch dtype or its name ("float32", "bfloat16", ...); None means float32.
    """
    import torch

    resolved = resolve_model(name_or_path)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    local = Path(resolved).exists()
    if not local and _hub_offline():
        _check_cached(resolved)
    import transformers
    from transformer_lens.model_bridge import TransformerBridge  # slow import: after the checks

    transformers.logging.set_verbosity_error()
    try:
        bridge = TransformerBridge.boot_transformers(resolved, device=device, dtype=dtype or torch.float32)
    except Exception as e:  # OSError for a missing repo or files; anything else from the model code
        raise ModelError(
            f"could not load model {resolved!r} ({type(e).__name__}: {' '.join(str(e).split())}). "
            "Check the name (a hub "
            f"id such as 'gpt2', a local save_pretrained directory, or {DEFAULT_MODEL!r}), cached "
            "if offline"
        ) from e
    bridge.eval()
    return bridge
