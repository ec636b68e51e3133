"""Publishing our SAEs on the hub in SAELens's layout, with a generated model card.

The repository gets ``README.md`` at its root and the SAE in ``SUBFOLDER/`` (cfg.json +
sae_weights.safetensors, as ``export_saelens`` writes them), in one commit. Anyone can
then load it with ``llm-sae analyze --sae hf://REPO/SUBFOLDER`` or with SAELens
(``SAE.load_from_disk`` on the downloaded folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_sae.common.atomic import atomic_write_bytes
from llm_sae.sae.formats.saelens import SAELENS_CFG, SAELENS_WEIGHTS
from llm_sae.sae.formats.weights import InteropError


def model_card(repo_id: str, subfolder: str, cfg: dict[str, Any]) -> str:
    """A README.md: hub metadata, what the SAE is, and how to load it."""
    meta = cfg.get("metadata") or {}
    model, hook = meta.get("model_name") or "unknown", meta.get("hook_name") or "unknown"
    rows = [("architecture", cfg.get("architecture")), ("model", model), ("hook", hook),
            ("d_in", cfg.get("d_in")), ("latents (d_sae)", cfg.get("d_sae")),
            ("k", cfg.get("k")), ("context size", meta.get("context_size")),
            ("dtype", cfg.get("dtype"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    base = "" if model == "unknown" else f"base_model: {model}\n"
    return f"""---
library_name: saelens
tags:
- sparse-autoencoder
- interpretability
- llm_sae
{base}---

# {repo_id}

A sparse autoencoder trained with llm_sae on the
activations of `{model}` at `{hook}`, saved in SAELens's layout in `{subfolder}/`.

| | |
|---|---|
{table}

## Load it

```bash
llm-sae analyze --sae hf://{repo_id}/{subfolder} --store STORE --out analysis
```

```python
from huggingface_hub import snapshot_download
from sae_lens import SAE

path = snapshot_download("{repo_id}", allow_patterns=["{subfolder}/*"])
sae = SAE.load_from_disk(f"{{path}}/{subfolder}")
```
"""


def push_saelens_folder(folder: str | Path, repo_id: str, *, subfolder: str | None = None,
                        private: bool = False) -> str:
    """Upload an exported SAELens folder to ``repo_id`` (created if missing); its URL."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InteropError(f"--push-to-hub {repo_id!r}: name the repository as ORG/NAME")
    folder = Path(folder)
    cfg = json.loads((folder / SAELENS_CFG).read_text())
    sub = subfolder or (cfg.get("metadata") or {}).get("hook_name") or "sae"
    atomic_write_bytes(folder / "README.md", model_card(repo_id, sub, cfg).encode())
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise InteropError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(folder / "README.md"))]
    ops += [CommitOperationAdd(path_in_repo=f"{sub}/{f}", path_or_fileobj=str(folder / f))
            for f in (SAELENS_CFG, SAELENS_WEIGHTS)]
    api.create_commit(repo_id, operations=ops, commit_message=f"llm_sae: upload {sub}", repo_type="model")
    return f"https://huggingface.co/{repo_id}/tree/main/{sub}"
