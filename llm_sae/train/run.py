"""``train``: a store (or a model on the fly) in, a saved SAE out, resumable."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.common.atomic import write_json_atomic
from llm_sae.common.outdir import check_output, claim_output
from llm_sae.config import ConfigError, to_dict
from llm_sae.distributed.env import report_rank_failure
from llm_sae.distributed.parallel import Parallel, make_parallel
from llm_sae.errors import CheckpointError
from llm_sae.sae.base import SAE
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY
from llm_sae.sources.base import ActivationSource
from llm_sae.sources.paired import PairedStoreSource, target_scale
from llm_sae.sources.store import StoreSource
from llm_sae.train.checkpoint import find_checkpoint
from llm_sae.train.config import TrainConfig, check_train_config
from llm_sae.train.loop import fit_together
from llm_sae.train.trainer import Trainer

# What a run folder holds (marks one written before output folders carried a marker).
RUN_FILES = ("train_cfg.json", "checkpoint/meta.json", "checkpoint.old/meta.json")


def sae_config(cfg: TrainConfig, d_in: int, d_out: int | None = None) -> SAEConfig:
    """The checked SAEConfig a TrainConfig asks for on an input of width ``d_in`` (a
    transcoder to width ``d_out`` when given); ConfigError naming the flag to change,
    before anything is built."""
    n = cfg.n_latents or cfg.expansion * d_in
    return dataclasses.replace(cfg, d_in=d_in, n_latents=n, d_out=d_out).resolved()


def build_sae(cfg: TrainConfig, d_in: int, d_out: int | None = None) -> SAE:
    """The SAE a TrainConfig asks for, on an input of width ``d_in`` (a transcoder to
    width ``d_out`` when given)."""
    sae_cfg = sae_config(cfg, d_in, d_out)
    return REGISTRY[sae_cfg.arch](sae_cfg)


def train(cfg: TrainConfig) -> Path:
    """Train an SAE from ``cfg.store`` into ``cfg.out``; returns the output directory.

    Under ``torchrun`` every rank runs this: data parallel, latent-sharded with
    ``cfg.shard_latents`` > 1, or both (docs/distributed.md).
    """
    par = make_parallel(cfg.shard_latents)
    with report_rank_failure("training") if par.world_size > 1 else contextlib.nullcontext():
        return train_with(cfg, par)


def train_with(cfg: TrainConfig, par: Parallel, source: ActivationSource | None = None) -> Path:
    """``train`` on a given parallel strategy, from ``source`` (default: the one ``cfg``
    names: a store, a transcoder's pair of stores, or a model run on the fly)."""
    check_train_config(cfg)
    out = check_output(cfg.out, "train", legacy=RUN_FILES)  # before the source is read
    if source is None:
        source = make_source(cfg, par)
    source.check()
    check_run(cfg, par, source)
    trainer = start_trainer(cfg, par, source, out)
    run_trainers([trainer], source, cfg, par)
    if par.is_main and trainer.skipped_rows:
        print(f"train: left out {trainer.skipped_rows:,} rows with NaN/Inf ({trainer.skipped_batches} "
              f"whole batches); `llm-sae store verify {cfg.store}` names them", file=sys.stderr)
    trainer.export(out)
    return out


def make_source(cfg: TrainConfig, par: Parallel) -> ActivationSource:
    """The source ``cfg`` asks for: ``--store``, or ``--model``/``--dataset``/``--hook``."""
    if bool(cfg.store) == bool(cfg.model):
        raise ConfigError(
            "give either --store (a harvested activation store) or --model with --dataset and "
            "--hook (activations on the fly), not " + ("both" if cfg.store else "neither")
        )
    if cfg.store and cfg.target_store:
        return PairedStoreSource(cfg.store, cfg.target_store, verify=cfg.verify_store)
    if cfg.store:
        return StoreSource(cfg.store, verify=cfg.verify_store)
    from llm_sae.sources.model import ModelSource

    return ModelSource.from_config(cfg, par.device(cfg.device))


def check_run(cfg: TrainConfig, par: Parallel, source: ActivationSource) -> None:
    """ConfigError for a run that cannot go, before anything is built."""
    if getattr(source, "d_out", None) is not None and (cfg.dead_latents == "resample" or par.n_shards > 1):
        raise ConfigError(
            "transcoders train with --dead-latents auxk or none and without --shard-latents "
            "(resampling and the sharded TopK assume the output is the input)"
        )
    if cfg.tokens // cfg.batch_size <= 0:
        raise ConfigError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    if cfg.batch_size % par.dp_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} does not split over {par.dp_size} data-parallel ranks; "
            "use a multiple of that number"
        )
    if par.n_shards > 1 and cfg.dead_latents == "resample":
        raise ConfigError(
            "--dead-latents resample does not work with --shard-latents > 1 (a rank sees only "
            "its own latents); use auxk, the topk default, or none"
        )


class InitSample:
    """Where a new SAE's b_dec starts: the geometric median of ``--init-rows`` rows drawn
    with their own seed (not from the training order), at the trainer's scale.

    Every SAE of a sweep would draw the same rows (the source, ``--seed`` and
    ``--init-rows`` are shared) and, at the same scale, compute the same median, bit for
    bit; this draws and computes each once for the whole sweep. At the default 16,384 rows
    that saves a read and up to 100 Weiszfeld passes over [16384, D] float64 per SAE (0.6 s
    each at D=256 on a CPU, BENCHMARKS.md).
    """

    def __init__(self, source: ActivationSource) -> None:
        self.source = source
        self._rows: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._b_dec: dict[tuple[Any, ...], torch.Tensor] = {}

    def start(self, trainer: Trainer, cfg: TrainConfig) -> None:
        """Set ``trainer``'s b_dec (and its scale, if it has none) from the sample."""
        key = (cfg.init_rows, cfg.seed)
        if key not in self._rows:
            seed = cfg.seed + 1_000_003
            pairs = getattr(self.source, "sample_pairs", None)  # a transcoder's b_dec starts at the targets
            self._rows[key] = pairs(cfg.init_rows, seed) if pairs else (self.source.sample(cfg.init_rows, seed),)
        scaled = (*key, trainer.input_scale, trainer.output_scale, str(trainer.device))
        if trainer.input_scale is not None and scaled in self._b_dec:
            trainer.init_from_sample(*self._rows[key], b_dec_E=self._b_dec[scaled])
            return
        trainer.init_from_sample(*self._rows[key])
        if scaled[2] is not None:
            self._b_dec[scaled] = trainer.sae.b_dec.detach().clone()


def start_trainer(cfg: TrainConfig, par: Parallel, source: ActivationSource, out: Path,
                  init: InitSample | None = None) -> Trainer:
    """A trainer for ``cfg`` writing to ``out``: resumed from its checkpoint there, or new
    (seeded from ``cfg.seed`` alone, so an SAE of a sweep starts as it would alone). The
    SAEs of a sweep pass one ``init``, so its sample is drawn once."""
    check_output(out, "train", legacy=RUN_FILES)
    ckpt = find_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and any((out / n).exists() for n in ("checkpoint", "checkpoint.old",
                                                                        "sae.safetensors")):
        raise CheckpointError(
            f"{out} holds a run but no usable checkpoint (no checkpoint/meta.json), so it cannot "
            "resume; pass --no-resume to start that run over (its checkpoint and log are replaced), "
            "or choose another --out"
        )
    device = par.device(cfg.device)
    d_out = getattr(source, "d_out", None)  # a paired source: train a transcoder
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Built whole (same seed on every rank), then cut to this rank's latents if sharded.
    sae = par.shard(build_sae(cfg, source.d_in, d_out)).to(device)
    trainer = Trainer(
        sae, cfg, total_steps=cfg.tokens // cfg.batch_size,
        input_scale=math.sqrt(source.d_in) / source.mean_norm, target_scale=target_scale(source),
        out_dir=out, parallel=par,
    )
    par.barrier()  # every rank has looked before rank 0 writes anything
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)  # refuses other SAE settings (--k, ...), naming both
    if par.is_main:
        claim_output(out, "train", legacy=RUN_FILES)
        if ckpt is None:
            # --no-resume (asked for): our own checkpoint and log of the earlier run go.
            for stale in ("checkpoint", "checkpoint.old", "log.jsonl"):
                p = out / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        write_json_atomic(out / "train_cfg.json", run_record(cfg, source))
    if ckpt is None:
        (init or InitSample(source)).start(trainer, cfg)
    return trainer


def run_record(cfg: TrainConfig, source: ActivationSource) -> dict[str, Any]:
    """train_cfg.json: the config with store paths made absolute, and what identifies the
    data (model, hook, width, store fingerprint), so `serve`, `eval` and `export` know the
    model and hook from any working directory, and refuse a store of another hook."""
    rec = to_dict(cfg)
    for key in ("store", "target_store"):
        if rec.get(key):
            rec[key] = str(Path(rec[key]).resolve())
    identity = getattr(source, "identity", None)
    rec["source"] = identity() if callable(identity) else {"d_in": source.d_in}
    return rec


def run_trainers(trainers: list[Trainer], source: ActivationSource, cfg: TrainConfig, par: Parallel) -> None:
    """Train every unfinished trainer from one stream of ``source`` and checkpoint each.

    Step t sees the same global batch whatever the world size, so resuming with another
    number of ranks continues the same run.
    """
    todo = [t for t in trainers if t.step_idx < t.total_steps]
    if not todo:
        return
    fit_together(todo, source.batches(
        cfg.batch_size, seed=cfg.seed, start_batch=min(t.batches_seen for t in todo),
        device=todo[0].device, dtype=max((_batch_dtype(source, t) for t in todo), key=lambda d: d.itemsize), batch_slice=par.batch_slice(),
    ))
    for t in todo:
        t.save_checkpoint(t.out_dir / "checkpoint")


def _batch_dtype(source: Any, trainer: Trainer) -> torch.dtype:
    """bf16 batches straight from a bf16 source when training in bf16 (half the bytes to
    copy to the device, no conversion on the host); float32 otherwise."""
    if trainer.precision == "bf16" and getattr(source, "dtype", None) == torch.bfloat16:
        return torch.bfloat16
    return torch.float32
