"""Checkpoints: the whole training state, written atomically, read without executing anything.

A checkpoint is a folder: ``state.safetensors`` (every tensor: the SAE, Adam's moments,
the dead-latent counts, the torch and numpy RNG states) and ``meta.json`` (counters, Adam's
hyper-parameters, Python's RNG state, the configs, and the sha256 of the tensors). Neither
can run code when read. Checkpoints written by release 0.1 (a pickled ``state.pt``) still
load, through ``torch.load(weights_only=True)``, which builds only tensors, containers and
the numpy arrays of an RNG state.

It is written under a temporary name, fsynced, then swapped in: a kill at any moment leaves
either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from llm_sae.common.atomic import swap_in_folder
from llm_sae.config import to_dict
from llm_sae.errors import CheckpointError

if TYPE_CHECKING:
    from llm_sae.train.trainer import Trainer

FORMAT = 2
STATE = "state.safetensors"
LEGACY_DEFAULTS = {"matryoshka_inner_weight": 1.0, "relative_fade": 0.0}
"""SAE settings a checkpoint written before they existed trained with: resuming one
under another value is refused like any other changed setting."""
LEGACY_STATE = "state.pt"  # release 0.1: a pickle, read with weights_only=True
COUNTERS = ("step_idx", "batches_seen", "tokens", "skipped_batches", "skipped_rows",
            "last_resample_tokens", "n_resampled", "input_scale", "target_scale")
DEAD_COUNTERS = ("last_resample_tokens", "n_resampled")  # kept by the trainer's DeadLatents


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({e}); delete it to start over, or use --no-resume"
        ) from e


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: OUT/checkpoint, or .old if a swap was interrupted."""
    out_dir = Path(out_dir)
    for name in ("checkpoint", "checkpoint.old"):
        p = out_dir / name
        if (p / "meta.json").exists():
            return p
    return None


# ------------------------------------------------------------------ state <-> trainer
def trainer_state(tr: Trainer) -> dict[str, Any]:
    """The trainer's whole state, unsharded and rank-independent (a run resumes with any
    number of ranks). A collective when distributed: every rank calls it."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    sae_state, opt_state, dead_N = tr.par.full_state(tr.sae, tr.opt, tr.dead.tokens_since_fired_N)
    return {
        "sae": sae_state, "opt": opt_state, "tokens_since_fired_N": dead_N,
        "counters": {k: getattr(tr.dead if k in DEAD_COUNTERS else tr, k) for k in COUNTERS},
        "rng": rng,
    }


def restore_trainer(tr: Trainer, state: dict[str, Any]) -> None:
    tr.par.load_full_state(tr.sae, tr.opt, tr.dead.tokens_since_fired_N, state)
    for k, v in state["counters"].items():
        setattr(tr.dead if k in DEAD_COUNTERS else tr, k, v)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ------------------------------------------------------------ state <-> files, no pickle
def encode_state(state: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(safetensors bytes of every tensor, the JSON-safe rest)."""
    tensors: dict[str, torch.Tensor] = {f"sae.{k}": v for k, v in state["sae"].items()}
    opt = state["opt"]
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v
    tensors["tokens_since_fired_N"] = state["tokens_since_fired_N"]
    rng = state["rng"]
    tensors["rng.torch"] = rng["torch"]
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, py_gauss = rng["python"]
    rest = {
        "opt_param_groups": opt["param_groups"],
        "counters": state["counters"],
        "rng": {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, list(py_state), py_gauss],
                "n_cuda": len(rng.get("cuda", []))},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(tensors), rest


def decode_state(blob: bytes, rest: dict[str, Any]) -> dict[str, Any]:
    t = st_load(blob)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in t.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = v
    name, pos, has_gauss, gauss = rest["rng"]["numpy"]
    version, py_state, py_gauss = rest["rng"]["python"]
    rng: dict[str, Any] = {
        "torch": t["rng.torch"],
        "numpy": (name, t["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss),
        "python": (version, tuple(py_state), py_gauss),
    }
    if rest["rng"]["n_cuda"]:
        rng["cuda"] = [t[f"rng.cuda.{i}"] for i in range(rest["rng"]["n_cuda"])]
    return {
        "sae": {k[4:]: v for k, v in t.items() if k.startswith("sae.")},
        "opt": {"state": dict(sorted(opt_state.items())),
                "param_groups": [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
                                 for g in rest["opt_param_groups"]]},
        "tokens_since_fired_N": t["tokens_since_fired_N"],
        "counters": rest["counters"],
        "rng": rng,
    }


def load_legacy_state(blob: bytes) -> dict[str, Any]:
    """A release-0.1 ``state.pt``, unpickled by torch's weights-only loader: tensors,
    containers, numbers and the numpy pieces of an RNG state, nothing that can run code."""
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    allowed += [getattr(np, "_core", np.core).multiarray._reconstruct]
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------- write / read
def save_checkpoint(tr: Trainer, path: str | Path) -> Path:
    """Atomically write the trainer's state to folder ``path``."""
    tr.check_loss()  # never write the state of a diverged run
    path = Path(path)
    state = trainer_state(tr)  # a collective when distributed: every rank calls it
    if not tr.par.is_main:
        tr.par.barrier()
        return path
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    blob, rest = encode_state(state)
    meta = {
        "format": FORMAT, "step": tr.step_idx, "tokens": tr.tokens, "batches_seen": tr.batches_seen,
        "sha256": hashlib.sha256(blob).hexdigest(), "sae": to_dict(tr.sae.cfg), "train": to_dict(tr.cfg),
        **rest,
    }
    for name, data in ((STATE, blob), ("meta.json", json.dumps(meta, indent=2).encode())):
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    swap_in_folder(tmp, path, old)  # find_checkpoint looks at checkpoint.old too
    tr.par.barrier()
    return path


def load_checkpoint(tr: Trainer, path: str | Path) -> None:
    """Restore what ``save_checkpoint`` (or release 0.1) wrote; CheckpointError if unusable."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    legacy = meta.get("format", 1) == 1
    state_file = path / (LEGACY_STATE if legacy else STATE)
    try:
        blob = state_file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} has no readable {state_file.name} ({e}); delete it or use --no-resume") from e
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({state_file.name} checksum mismatch); delete {path} "
            "to start over, or rerun with --no-resume"
        )
    saved, mine = meta.get("sae", {}), to_dict(tr.sae.cfg)
    # Every SAE setting, not only the widths: resuming (or rerunning a finished run) with
    # another --k would otherwise write cfg.json with the new k over weights trained with
    # the old one.
    legacy_keys = sorted(k for k in LEGACY_DEFAULTS if k not in saved and mine.get(k) is not None)
    for key in ("arch", "d_in", "n_latents", *sorted(k for k in mine if k in saved), *legacy_keys):
        if saved.get(key, LEGACY_DEFAULTS.get(key)) != mine[key]:
            raise CheckpointError(
                f"checkpoint {path} has {key}={saved.get(key, LEGACY_DEFAULTS.get(key))} but this run "
                f"has {key}={mine[key]}; "
                "use the original settings, another --out, or --no-resume to start over"
            )
    try:
        # On the CPU first: loading copies each tensor to its parameter's device, and a
        # latent-sharded rank keeps only its slice, so the full state never sits on it.
        state = load_legacy_state(blob) if legacy else decode_state(blob, meta)
        restore_trainer(tr, state)
    except Exception as e:  # anything raised on a damaged or foreign file
        raise CheckpointError(f"cannot restore checkpoint {path}: {e}; delete it or use --no-resume") from e
