"""A sweep is one run: many SAEs trained from one stream of batches.

Researchers compare SAEs along L0, width and architecture, and a sweep of 8 that reads
its store 8 times pays for the data 8 times. Here every batch is read and shuffled once
and handed to each SAE's own ``Trainer`` (its own optimiser, dead latents, schedule, log
and checkpoints), writing ``OUT/<name>/`` per SAE and ``OUT/sweep.json``.

What may vary between the SAEs of a sweep is everything of the SAE and its optimisation
(``--k``, ``--expansion``, ``--arch``, ``--lr``, …); what defines the stream (the source,
``--tokens``, ``--batch-size``, ``--seed``, the device) is one for all. Each SAE is seeded
from ``--seed`` as if trained alone, so an SAE of a sweep equals the same SAE trained by
itself. A killed sweep resumes exactly: each SAE from its own checkpoint, the stream from
the SAE furthest behind (``train/loop.py``). Under torchrun the whole sweep is data
parallel, or with ``--distribute-saes`` each SAE lives on one rank (``train/spread.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

from llm_sae.common.atomic import write_json_atomic
from llm_sae.config import ConfigError, from_dict, to_dict
from llm_sae.distributed.env import report_rank_failure
from llm_sae.distributed.parallel import Parallel, make_parallel
from llm_sae.sources.base import ActivationSource
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import (
    InitSample,
    check_run,
    make_source,
    run_trainers,
    sae_config,
    start_trainer,
)
from llm_sae.train.spread import train_spread

MANIFEST = "sweep.json"
# One value for the whole sweep: they define the stream of batches, or the process.
SHARED = ("out", "store", "target_store", "model", "dataset", "hook", "dataset_config", "split", "text_column",
          "context_length", "model_batch_size", "model_dtype", "buffer_rows", "tokens", "batch_size",
          "seed", "init_rows", "device", "verify_store", "shard_latents", "distribute_saes", "resume",
          "on_nonfinite")
SHORT = {"arch": "", "expansion": "x", "n_latents": "n"}  # in folder names


def sweep_configs(base: TrainConfig, axes: dict[str, list[str]] | None = None,
                  specs: list[dict[str, Any]] | None = None) -> list[TrainConfig]:
    """Every SAE of a sweep: each of ``specs`` (overrides of ``base``; default one, empty)
    crossed with the grid of ``axes`` (field → values, e.g. from ``--k 16,32``)."""
    axes = axes or {}
    specs = specs or [{}]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in [*axes, *(k for s in specs for k in s)]:
        if key not in fields:
            raise ConfigError(f"unknown sweep field {key!r}; sweep over SAE fields such as k, expansion, arch, lr")
        if key in SHARED:
            raise ConfigError(
                f"--{key.replace('_', '-')} is one for the whole sweep (it defines the stream of "
                "batches); give a single value, or run separate sweeps"
            )
    grid = [dict(zip(axes, vals, strict=True)) for vals in itertools.product(*axes.values())]
    base_d = to_dict(base)
    return [from_dict(TrainConfig, {**base_d, **spec, **point}) for spec in specs for point in grid]


def sweep_names(cfgs: list[TrainConfig]) -> list[str]:
    """A folder name per SAE: its arch and the fields that vary and it sets (``topk-k16-x8``;
    a field left at its unset default, None, is not named); unique."""
    dicts = [to_dict(c) for c in cfgs]
    varying = _varying(cfgs)
    names = []
    for d in dicts:
        parts = [d["arch"]] + [f"{SHORT.get(k, k)}{d[k]}" for k in varying if k != "arch" and d[k] is not None]
        names.append(re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts)))
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"the sweep lists the same SAE more than once ({', '.join(dup)}); drop the repeats")
    return names


def train_sweep(cfgs: list[TrainConfig], par: Parallel | None = None,
                source: ActivationSource | None = None) -> Path:
    """Train every SAE of ``cfgs`` (from ``sweep_configs``) from one stream; returns the
    sweep folder. Under torchrun every rank runs this, data parallel as ``train``."""
    if not cfgs:
        raise ConfigError("the sweep has no SAEs")
    par = par or make_parallel(cfgs[0].shard_latents)
    with report_rank_failure("training") if par.world_size > 1 else contextlib.nullcontext():
        return _train_sweep(cfgs, par, source)


def _train_sweep(cfgs: list[TrainConfig], par: Parallel, source: ActivationSource | None) -> Path:
    base = cfgs[0]
    for c in cfgs:
        diff = [k for k in SHARED if getattr(c, k) != getattr(base, k)]
        if diff:
            raise ConfigError(f"SAEs of one sweep must share {', '.join(diff)}; run separate sweeps")
    names = sweep_names(cfgs)
    out = Path(base.out)
    manifest = {
        "format": 1, "complete": False, "shared": {k: getattr(base, k) for k in SHARED},
        "saes": [{"name": n, "dir": n, "arch": c.arch, "k": c.k, "spec": {k: getattr(c, k) for k in _varying(cfgs)}}
                 for n, c in zip(names, cfgs, strict=True)],
    }
    old = read_sweep(out) if (out / MANIFEST).exists() else None
    if base.resume and old is not None and [s["name"] for s in old["saes"]] != names:
        raise ConfigError(
            f"{out} holds another sweep ({', '.join(s['name'] for s in old['saes'])}); "
            "choose another --out, or --no-resume to start it over"
        )
    if source is None:
        source = make_source(base, par)
    source.check()
    for c in cfgs:  # every SAE's settings checked before any is built
        check_run(c, par, source)
        sae_config(c, source.d_in, getattr(source, "d_out", None))
    out.mkdir(parents=True, exist_ok=True)
    if par.is_main:
        write_json_atomic(out / MANIFEST, manifest)
    if base.distribute_saes and par.world_size > 1:
        train_spread(cfgs, names, par, source, out)
    else:
        init = InitSample(source)  # one b_dec sample and median for every SAE
        trainers = [start_trainer(c, par, source, out / n, init) for c, n in zip(cfgs, names, strict=True)]
        run_trainers(trainers, source, base, par)
        for t, n in zip(trainers, names, strict=True):
            t.export(out / n)
    if par.is_main:
        write_json_atomic(out / MANIFEST, {**manifest, "complete": True})
    par.barrier()
    return out


def _varying(cfgs: list[TrainConfig]) -> list[str]:
    """The fields whose value differs between SAEs of the sweep, arch first."""
    dicts = [to_dict(c) for c in cfgs]
    varying = [k for k in dicts[0] if k not in SHARED and len({repr(d[k]) for d in dicts}) > 1]
    return sorted(varying, key=lambda k: (k != "arch", k))


def read_sweep(path: str | Path) -> dict[str, Any]:
    """The parsed sweep.json of a sweep folder; ConfigError naming the fix if unreadable."""
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
        assert isinstance(m.get("saes"), list)
    except (OSError, ValueError, AssertionError) as e:
        raise ConfigError(f"{p} is not a readable sweep manifest ({e}); point at a folder written by a sweep") from None
    return m
