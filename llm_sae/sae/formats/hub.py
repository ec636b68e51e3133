"""SAEs named by where they are published: ``hf://ORG/REPO[/SUBFOLDER]`` and
``saelens://RELEASE/SAE_ID``, resolved to a local folder that ``load_sae`` reads.

Downloads go through ``huggingface_hub`` and its cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``), fetching only the files an SAE folder can hold, so a Gemma Scope repo of
hundreds of SAEs costs one SAE's bytes; once cached it loads offline (``HF_HUB_OFFLINE=1``).
The folder is then converted exactly as a local SAELens, sparsify or Gemma Scope folder is.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm_sae.sae.formats.weights import InteropError

HF, SAELENS = "hf://", "saelens://"


# Every file a published SAE folder of a known layout may need (ours, SAELens, sparsify,
# Gemma Scope); nothing else in the repo is downloaded.
SAE_FILES = ("cfg.json", "sae.safetensors", "sae_weights.safetensors", "params.npz",
             "train_cfg.json", "sparsity.safetensors")


def is_hub_spec(spec: object) -> bool:
    """Whether ``spec`` names a published SAE rather than a local folder."""
    return isinstance(spec, str) and spec.startswith((HF, SAELENS))


def hub_cache_dir() -> str | None:
    """The hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_sae(spec: str | Path) -> Path:
    """A local folder for ``spec``: a path as it is, or a published SAE fetched (or found in
    the cache). CheckpointError (InteropError) naming the fix when it cannot be had."""
    if not is_hub_spec(spec):
        return Path(spec)
    spec = str(spec)
    if spec.startswith(SAELENS):
        return resolve_saelens(spec)
    parts = [p for p in spec[len(HF):].split("/") if p]
    if len(parts) < 2:
        raise InteropError(f"{spec!r} names no repository; write hf://ORG/REPO or hf://ORG/REPO/SUBFOLDER")
    return hub_folder("/".join(parts[:2]), "/".join(parts[2:]))


def hub_folder(repo_id: str, subfolder: str = "") -> Path:
    """Download (or find in the cache) the SAE files of ``repo_id/subfolder``; its local path."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise InteropError("loading SAEs from the hub needs huggingface_hub: pip install huggingface_hub") from None
    prefix = f"{subfolder}/" if subfolder else ""
    where = f"hf://{repo_id}/{subfolder}".rstrip("/")
    try:
        root = snapshot_download(repo_id, allow_patterns=[prefix + f for f in SAE_FILES],
                                 cache_dir=hub_cache_dir())
    except LocalEntryNotFoundError:
        raise InteropError(
            f"{where} is not in the hub cache ({hub_cache_dir() or 'the default'}) and the hub "
            "cannot be reached; run once with network access (unset HF_HUB_OFFLINE) to cache it"
        ) from None
    except RepositoryNotFoundError:
        raise InteropError(f"no repository {repo_id!r} on the hub (or it is private: log in with `hf auth login`)") from None
    folder = Path(root) / subfolder
    if not any((folder / f).is_file() for f in SAE_FILES):
        found = sorted({str(p.parent.relative_to(root)) for f in SAE_FILES for p in Path(root).rglob(f)})
        hint = f"; SAE folders here: {', '.join(found[:5])}" if found else ""
        raise InteropError(
            f"{where} holds no SAE (none of {', '.join(SAE_FILES[:4])}); name the SAE's "
            f"subfolder, hf://{repo_id}/SUBFOLDER{hint}"
        )
    return folder


def resolve_saelens(spec: str) -> Path:
    """``saelens://RELEASE/SAE_ID`` through SAELens's own pretrained registry.

    Releases stored in a layout we read (SAELens's, sparsify's, Gemma Scope's) are fetched
    like ``hf://`` (only that SAE's files); any other release is loaded by SAELens itself
    and saved in its own layout under the hub cache, which we then convert.
    """
    release, _, sae_id = spec[len(SAELENS):].partition("/")
    if not release or not sae_id:
        raise InteropError(f"{spec!r}: write saelens://RELEASE/SAE_ID (e.g. saelens://gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71)")
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise InteropError(
            f"{spec} needs SAELens's registry: pip install sae-lens, or name the repository "
            "directly as hf://ORG/REPO/SUBFOLDER"
        ) from None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = sorted(r for r in directory if release.split("-")[0] in r)[:5]
        raise InteropError(f"SAELens has no release {release!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        raise InteropError(
            f"release {release!r} has no SAE {sae_id!r}; it has e.g. {', '.join(list(lookup.saes_map)[:3])}"
        )
    conversion = getattr(lookup, "conversion_func", None)
    if conversion in (None, "sparsify", "gemma_2"):
        return hub_folder(lookup.repo_id, lookup.saes_map[sae_id])
    return _saved_by_saelens(release, sae_id)


def _saved_by_saelens(release: str, sae_id: str) -> Path:
    """A release in a layout only SAELens reads: load it there, save it in SAELens's layout."""
    from sae_lens import SAE as SaeLensSAE

    out = Path(hub_cache_dir() or Path.home() / ".cache" / "huggingface" / "hub")
    out = out / "llm_sae-saelens" / release / sae_id.replace("/", "__")
    if not (out / "sae_weights.safetensors").is_file():
        loaded = SaeLensSAE.from_pretrained(release, sae_id, device="cpu")
        loaded = loaded[0] if isinstance(loaded, tuple) else loaded
        loaded.save_model(str(out))
    return out
