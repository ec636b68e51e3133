"""The harvest: text → model → one store per hook, resumable and crash-safe."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.common.atomic import write_json_atomic
from llm_sae.common.device import resolve_device
from llm_sae.common.dtypes import dtype_name, quant_block
from llm_sae.common.outdir import check_output, claim_output
from llm_sae.errors import DataError, ModelError, StoreError
from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.loop import run_loop
from llm_sae.lm.hooks import check_hooks, load_model, run_to_hooks, special_token_ids, stop_layer
from llm_sae.lm.text import (
    LOCAL_BUILDERS,
    chat_renderer,
    dataset_spec,
    iter_documents,
    pack_contexts,
    template_special_ids,
)
from llm_sae.store.format import MANIFEST, settings_diff
from llm_sae.store.norms import check_multiple
from llm_sae.store.writer import StoreWriter


def merge_rank_manifests(out: Path, world: int) -> dict[str, Any]:
    """Rank 0's job at the end of a distributed harvest: one manifest for all ranks' shards."""
    parts = [json.loads((out / f"manifest.rank{r}.json").read_text()) for r in range(world)]
    m = dict(parts[0])
    m["shards"] = [s for p in parts for s in p["shards"]]
    m["n_rows"] = sum(p["n_rows"] for p in parts)
    m["n_sequences"] = sum(p["n_sequences"] for p in parts)
    m["next_sequence_id"] = max(p["next_sequence_id"] for p in parts)
    # Where the text was left: the rank that took the last batch got furthest.
    furthest = max((p["progress"] for p in parts), key=lambda q: q.get("contexts", 0))
    m["progress"] = {**furthest, "ranks": [p["progress"] for p in parts]}
    count = sum(p["stats"]["count"] for p in parts)
    sum_norm = sum(p["stats"]["sum_norm"] for p in parts)
    sum_x = np.sum([np.asarray(p["stats"]["sum"]) for p in parts], axis=0)
    m["stats"] = {
        "count": count, "sum_norm": sum_norm, "sum": sum_x.tolist(),
        "mean_norm": sum_norm / max(count, 1), "mean": (sum_x / max(count, 1)).tolist(),
    }
    m["complete"] = all(p["complete"] for p in parts)
    write_json_atomic(out / MANIFEST, m)
    return m


def store_dirs(cfg: HarvestConfig) -> dict[str, Path]:
    """Where each hook's store goes: ``out`` itself for one hook, ``out/<hook>`` for several."""
    hooks = _hooks(cfg)
    out = Path(cfg.out)
    return {hooks[0]: out} if len(hooks) == 1 else {h: out / h for h in hooks}


def _pairs(cfg: HarvestConfig) -> dict[str, dict[str, str]]:
    """{hook: its manifest's "pair" entry} for every hook named in ``cfg.pair``."""
    specs = [cfg.pair] if isinstance(cfg.pair, str) else list(cfg.pair or [])
    out: dict[str, dict[str, str]] = {}
    for spec in (p for part in specs for p in part.split(",") if p):
        a, sep, b = spec.partition(":")
        if not sep or not a or not b or a == b:
            raise ModelError(f"--pair {spec!r} must be IN_HOOK:OUT_HOOK, two different hooks")
        for h, role, other in ((a, "input", b), (b, "output", a)):
            if h in out:
                raise ModelError(f"hook {h!r} is in two --pair entries; give each hook one partner")
            out[h] = {"role": role, "partner_hook": other}
    return out


def _hooks(cfg: HarvestConfig) -> list[str]:
    hooks = [cfg.hook] if isinstance(cfg.hook, str) else list(cfg.hook or [])
    hooks = [h for part in hooks for h in part.split(",") if h]
    hooks += [h for h in _pairs(cfg) if h not in hooks]
    if not hooks:
        raise ModelError("no hook given; pass --hook blocks.L.hook_resid_post (or another hook point)")
    if len(set(hooks)) != len(hooks):
        raise ModelError(f"hook names repeat in {hooks}; give each once")
    return hooks


def check_harvest_config(cfg: HarvestConfig) -> None:
    """Settings that cannot work, refused before the model loads, naming the flag."""
    if cfg.tokens <= 0:
        raise DataError(f"--tokens must be positive, got {cfg.tokens}; give the number of rows to store")
    for flag, v, least in (("batch-size", cfg.batch_size, 1), ("context-length", cfg.context_length, 2),
                           ("shard-rows", 1 if cfg.shard_rows is None else cfg.shard_rows, 1)):
        if v < least:
            raise DataError(f"--{flag} {v} is too small; use at least {least}")
    dtype_name(cfg.dtype)  # StoreError naming the store dtypes there are
    try:
        dtype_name(cfg.model_dtype)
    except StoreError:
        raise DataError(f"--model-dtype {cfg.model_dtype!r} is not a dtype; use float32, float16 or "
                        "bfloat16") from None
    ds = cfg.dataset
    if isinstance(ds, str | Path) and Path(ds).suffix in LOCAL_BUILDERS and not Path(ds).exists():
        raise DataError(f"--dataset {ds} does not exist; check the path, or give a hub dataset name")


def _settings(cfg: HarvestConfig, world: int) -> dict[str, Any]:
    """Settings that decide what a store holds; a resumed run must match them."""
    return {
        "tokens": int(cfg.tokens),
        "skip_special": bool(cfg.skip_special),
        "model_dtype": dtype_name(cfg.model_dtype),
        "world_size": world,
        "max_norm_multiple": cfg.max_norm_multiple,
        "chat_template": cfg.chat_template or None,  # None: stores from before it match
    }


def _existing(dirs: dict[str, Path], metas: dict[str, dict], manifest_name: str) -> dict[str, dict]:
    """Manifests already on disk; StoreError naming any setting that differs."""
    found = {}
    for h, d in dirs.items():
        p = d / manifest_name
        if not p.exists():
            continue
        m = json.loads(p.read_text())
        diffs = settings_diff(m, metas[h])
        if diffs:
            raise StoreError(
                f"{d} holds a store made with other settings: {'; '.join(diffs)}. Rerun with "
                "the original settings to resume it, or choose another --out"
            )
        found[h] = m
    return found


def harvest(cfg: HarvestConfig) -> dict[str, Path]:
    """Run the harvest; returns {hook: store directory}. Resumes a killed run."""
    hooks = _hooks(cfg)
    check_harvest_config(cfg)
    check_multiple(cfg.max_norm_multiple)  # a misspelt --max-norm-multiple fails before the model loads
    if quant_block(cfg.model_dtype) is not None:
        raise DataError(f"--model-dtype {cfg.model_dtype} is a store dtype; run the model in float32, float16 or bfloat16")
    from llm_sae.distributed.env import init_from_env

    rank, world = init_from_env()
    dirs = store_dirs(cfg)
    pairs = _pairs(cfg)
    # Before the model loads: a file, an unwritable path or somebody else's folder is refused.
    if len(dirs) > 1:
        check_output(cfg.out, "harvest", legacy=tuple(hooks))
    for d in dirs.values():
        check_output(d, "store", legacy=(MANIFEST, "manifest.rank0.json"))
    manifest_name = MANIFEST if world == 1 else f"manifest.rank{rank}.json"
    prefix = "shard" if world == 1 else f"shard-r{rank}"
    say = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)

    # Finished already? Decide before loading the model, which is the slow part.
    if all((d / MANIFEST).exists() for d in dirs.values()):
        done = {h: json.loads((d / MANIFEST).read_text()) for h, d in dirs.items()}
        if all(m.get("complete") for m in done.values()):
            spec = dataset_spec(cfg.dataset, config=cfg.dataset_config, split=cfg.split,
                                text_column=cfg.column)
            for h, m in done.items():
                want = {"hook": h, "context_length": cfg.context_length, "dataset": spec,
                        "harvest": _settings(cfg, world), "dtype": dtype_name(cfg.dtype), "model": cfg.model}
                diffs = settings_diff(m, want)
                if diffs:
                    raise StoreError(
                        f"{dirs[h]} holds a finished store made with other settings: "
                        f"{'; '.join(diffs)}. Choose another --out"
                    )
            say(f"harvest: {', '.join(str(d) for d in dirs.values())} already complete "
                f"({cfg.tokens:,} tokens per hook); nothing to do")
            return dirs

    device = str(resolve_device(cfg.device, per_rank=world > 1))
    model = load_model(cfg.model, device=device, dtype=cfg.model_dtype)
    check_hooks(model, hooks, cfg.model)
    tok = model.tokenizer
    if tok is None:
        raise ModelError(f"model {cfg.model!r} has no tokenizer; save one next to the model")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and cfg.context_length > n_ctx:
        raise DataError(f"--context-length {cfg.context_length} exceeds the model's {n_ctx} positions; use at most {n_ctx}")
    stop = stop_layer(model, hooks)
    special = special_token_ids(tok)
    render = chat_renderer(tok) if cfg.chat_template else None
    if render is not None:  # the template's own tokens (<|im_start|>, …) are not text
        special = sorted(set(special) | set(template_special_ids(tok)))

    # One probe forward tells each hook's width, whatever kind of hook it is.
    probe = run_to_hooks(model, torch.tensor([[special[0] if special else 0] * 2], device=device), hooks, stop)
    spec = dataset_spec(cfg.dataset, config=cfg.dataset_config, split=cfg.split, text_column=cfg.column)
    metas = {
        h: {
            "d_in": int(probe[h].shape[-1]),
            "dtype": dtype_name(cfg.dtype),
            "model": cfg.model,
            "hook": h,
            "context_length": int(cfg.context_length),
            # The model's name as given, never the tokenizer's resolved path (for a shipped
            # model that is a path into the installed package): one loader loads both.
            "tokenizer": cfg.model,
            "dataset": spec,
            "harvest": _settings(cfg, world),
            "special_token_ids": special,
            **({"pair": {**pairs[h], "partner": os.path.relpath(dirs[pairs[h]["partner_hook"]], dirs[h])}}
               if h in pairs else {}),
            **({"extra": cfg.extra} if cfg.extra else {}),
        }
        for h in hooks
    }
    for h, x in probe.items():
        if x.ndim != 3:
            raise ModelError(f"hook {h!r} gives activations of shape {tuple(x.shape)}; only [batch, pos, d] hooks can be stored")
    existing = _existing(dirs, metas, manifest_name)
    if not existing:
        # Fail on unusable text before any store directory is created.
        docs = iter_documents(cfg.dataset, config=cfg.dataset_config, split=cfg.split,
                              text_column=cfg.column, streaming=cfg.streaming, render=render)
        if next(pack_contexts(docs, tok, cfg.context_length), None) is None:
            raise DataError(
                f"dataset {spec['name']!r} gives no complete context of {cfg.context_length} "
                "tokens: it is empty or too short; give more text or a smaller --context-length"
            )
    if world > 1:
        torch.distributed.barrier()  # every rank has checked before rank 0 marks the folders
    if rank == 0:
        if len(dirs) > 1:
            claim_output(cfg.out, "harvest", legacy=tuple(hooks))
        for d in dirs.values():
            claim_output(d, "store", legacy=(MANIFEST, "manifest.rank0.json"))
    if world > 1:
        torch.distributed.barrier()
    writers = {
        h: StoreWriter(dirs[h], metas[h], mode="resume" if h in existing else "new",
                       shard_rows=cfg.shard_rows, prefix=prefix, manifest_name=manifest_name,
                       max_norm_multiple=cfg.max_norm_multiple)
        for h in hooks
    }
    try:
        run_loop(cfg, model, hooks, writers, tok, special, stop, device, rank, world, say)
    except BaseException as e:
        # Keep every row already appended: committed shards stay, buffered rows are written
        # with their progress so a rerun continues after them.
        for w in writers.values():
            try:
                w.close(complete=False)
            except Exception:
                with contextlib.suppress(Exception):  # the same error again: e says it
                    w.abort()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"the disk holding {cfg.out} is full ({e.strerror}); every shard written so far is "
                "kept: free some space and rerun the same command, which continues where it stopped"
            ) from None
        raise
    if world > 1:
        torch.distributed.barrier()
        if rank == 0:
            for d in dirs.values():
                merge_rank_manifests(d, world)
        torch.distributed.barrier()
    return dirs
