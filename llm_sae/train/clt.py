"""``llm-sae train-clt``: a cross-layer transcoder trained on every layer's pair at once.

The loop is the plain one (batch → loss → Adam step → renormalise decoders), kept apart from
the SAE trainer because a CLT's batch is [B, L, D] and its state is per layer; it resumes
exactly from a checkpoint written atomically as one safetensors file (weights, Adam's
moments, the step, the thresholds). Inputs and targets are scaled per layer so that
E‖x_l‖ = √D and E‖y_l‖ = √E (from the stores' norm statistics), folded away on save.
Under torchrun it is data parallel: each rank reads its slice of every global batch, the
per-layer BatchTopK is chosen over the global batch and gradients are averaged, so N ranks
train the one-process run (up to float rounding); ``--precision bf16`` runs the matmuls
under autocast. ``--shard-latents S`` splits each layer's latents over S ranks
(``distributed/sharded_clt.py``), dividing the memory per layer, printed at the start, by S;
checkpoints hold the whole CLT, so a run resumes on any number of ranks and shards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from llm_sae.common.atomic import atomic_write_bytes, write_json_atomic
from llm_sae.config import ConfigError, add_arguments, from_args, to_dict
from llm_sae.distributed.comm import all_gather_cat
from llm_sae.distributed.env import report_rank_failure
from llm_sae.distributed.parallel import Parallel, make_parallel
from llm_sae.distributed.sharded_clt import ShardedCLT
from llm_sae.sae.clt import CLTConfig, CrossLayerTranscoder, clt_memory_bytes
from llm_sae.sources.layers import LayerPairsSource
from llm_sae.train.config import resolve_precision

CKPT = "clt_checkpoint.safetensors"


@dataclass
class CLTTrainConfig:
    """Train a cross-layer transcoder from one harvest's per-layer (MLP input, MLP output) stores."""

    pair: list[str]
    """IN_STORE:OUT_STORE for each layer, in layer order (repeat or comma-separate)."""
    out: str
    """Output directory (cfg.json + clt.safetensors, the checkpoint, metrics.jsonl)."""
    n_latents: int | None = None
    """Latents per layer (default: expansion × d_in)."""
    expansion: int = 8
    """Latents per layer as a multiple of d_in, when --n-latents is not given."""
    k: int = 16
    """Active latents per token per layer (batch average: BatchTopK)."""
    batch_size: int = 1024
    """Rows (tokens) per step; each row carries every layer."""
    tokens: int = 1_000_000
    """Tokens to train on."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed of the initialisation and of the row order."""
    checkpoint_every: int = 500_000
    """Tokens between checkpoints (the run resumes from the last one); 0: only at the end."""
    log_every: int = 50
    """Steps between lines of metrics.jsonl."""
    resume: bool = True
    """Continue from OUT's checkpoint when there is one."""
    device: str = "auto"
    """Torch device: auto, cpu, cuda, ... (under torchrun: each rank's own GPU)."""
    shard_latents: int = 1
    """Under torchrun: split each layer's latents over this many ranks (it must divide the
    world size and --n-latents; the rest of the world is data parallel). Each rank then holds
    1/shards of the CLT's memory per layer."""
    precision: str = "auto"
    """Matmul precision: bf16 (autocast; float32 master weights, loss and Adam), tf32, fp32,
    or auto (bf16 on CUDA, fp32 on CPU)."""
    progress: bool = True
    """Show a progress bar."""


class LayerBatches(Protocol):
    def batches(self, batch_size: int, *, seed: int, start_batch: int, device: torch.device,
                batch_slice: tuple[int, int] | None = None) -> Any: ...


def _save_checkpoint(path: Path, clt: CrossLayerTranscoder, opt: torch.optim.Optimizer, step: int,
                     write: bool = True) -> None:
    """The whole CLT's state (a sharded one's gathered: every rank calls this; ``write`` on
    one), so a run resumes on any number of shards."""
    from safetensors.torch import save

    names = [n for n, _ in clt.named_parameters()]
    t: dict[str, Tensor] = {f"clt.{k}": clt.full_tensor(k, v) for k, v in clt.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        t.update({f"opt.{i}.{k}": clt.full_tensor(names[i], v) for k, v in st.items()})
    t["step"] = torch.tensor(step)
    if write:
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in t.items()}))


def _load_checkpoint(path: Path, clt: CrossLayerTranscoder, opt: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    t = load_file(str(path))
    dev = clt.b_dec.device
    clt.load_state_dict({k[4:]: clt.local_slice(k[4:], v) for k, v in t.items() if k.startswith("clt.")})
    names = [n for n, _ in clt.named_parameters()]
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in t.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = clt.local_slice(names[int(i)], v).to(dev) if v.ndim else v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return int(t["step"])


def fit_clt(
    clt: CrossLayerTranscoder, source: LayerBatches, cfg: CLTTrainConfig, *,
    s_in_L: list[float], s_out_L: list[float], par: Parallel | None = None,
) -> dict[str, Any]:
    """Train ``clt`` in place (sharded: each rank's slice of it) on scaled batches, resuming
    from OUT's checkpoint, then save it whole with the scales folded. Returns the run's
    summary (also train_summary.json; its memory per layer is one rank's).

    Under torchrun (``par`` a ``Distributed``) each rank takes its slice of every global
    batch, the per-layer top k·B is chosen over the global batch and gradients are
    averaged, so the run is the one-process run of the same global batch; rank 0 writes."""
    from tqdm.auto import tqdm

    par = par or Parallel()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = par.device(cfg.device)
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    if par.n_shards > 1:  # trained in place no more: the whole CLT is what is saved
        clt = ShardedCLT(clt, par.shard_group, par.shard_rank, par.n_shards)
    clt.to(device).train()
    if par.world_size > 1:  # each layer's top k·B over the global batch and all latents
        clt.share_batch(par.dp_size, lambda t: all_gather_cat(t.float(), dist.group.WORLD, dim=1).to(t.dtype))
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr)
    steps = max(1, cfg.tokens // cfg.batch_size)
    every = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else steps
    start = _load_checkpoint(out / CKPT, clt, opt) if cfg.resume and (out / CKPT).exists() else 0
    sx = torch.tensor(s_in_L, device=device)[None, :, None]
    sy = torch.tensor(s_out_L, device=device)[None, :, None]
    batches = source.batches(cfg.batch_size, seed=cfg.seed, start_batch=start, device=device,
                             batch_slice=par.batch_slice())
    log = (out / "metrics.jsonl").open("a") if par.is_main else None
    t0, metrics = time.perf_counter(), {}
    bar = tqdm(range(start, steps), disable=not (cfg.progress and par.is_main), desc="train-clt", file=sys.stderr)
    for step in bar:
        x_BLD, _, y_BLE = next(batches)
        # bf16: the matmuls under autocast on float32 weights; the loss and backward float32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = clt(x_BLD * sx, y_BLE * sy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        par.after_backward(clt)  # the global batch's mean gradient
        opt.step()
        clt.constrain_weights()
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            logged = par.mean_metrics({"loss": loss.detach(), **metrics})
            if log is not None:
                log.write(json.dumps({"step": step + 1, **{k: v.item() for k, v in logged.items()}}) + "\n")
        if (step + 1) % every == 0 or step + 1 == steps:
            _save_checkpoint(out / CKPT, clt, opt, step + 1, write=par.is_main)
    if log is not None:
        log.close()
    elapsed = time.perf_counter() - t0
    # Inference thresholds from the next batches (eval mode: k per token per layer on average).
    x_BLD = torch.cat([next(batches)[0] for _ in range(max(1, 8192 // cfg.batch_size))]) * sx
    clt.calibrate_thresholds(x_BLD)
    clt.eval()
    clt.fold_scales(s_in_L, s_out_L)
    summary = {"steps": steps, "resumed_at": start, "tokens": steps * cfg.batch_size,
               "tokens_per_s": (steps - start) * cfg.batch_size / max(elapsed, 1e-9),
               "precision": "bf16" if bf16 else "fp32", "data_parallel_ranks": par.dp_size,
               "latent_shards": par.n_shards,
               "final": {k: float(v) for k, v in par.mean_metrics(metrics).items()},
               "memory_bytes_per_layer": [clt_memory_bytes(clt.cfg, l) for l in range(clt.cfg.n_layers)]}
    whole = clt.unsharded()
    if par.is_main:
        whole.cpu().save(out)
        write_json_atomic(out / "train_summary.json", summary)
    par.barrier()
    return summary


def train_clt(cfg: CLTTrainConfig) -> Path:
    """Check the pairs, build the CLT and train it; returns the output directory."""
    pairs = [p.split(":") for item in cfg.pair for p in item.split(",") if p]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--pair takes IN_STORE:OUT_STORE per layer, in layer order; got {cfg.pair}")
    if cfg.batch_size <= 0 or cfg.tokens < cfg.batch_size:
        raise ConfigError("--batch-size must be positive and --tokens at least one batch")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0) or cfg.k <= 0 or cfg.expansion <= 0:
        raise ConfigError(f"--lr ({cfg.lr}), --k ({cfg.k}) and --expansion ({cfg.expansion}) must be positive")
    resolve_precision(cfg.precision, torch.device("cpu"))  # an unknown name, before any work
    par = make_parallel(cfg.shard_latents)
    src = LayerPairsSource([(a, b) for a, b in pairs])
    src.check()
    if cfg.batch_size % par.dp_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split over {par.dp_size} data-parallel "
                          f"ranks; give a multiple of {par.dp_size}")
    torch.manual_seed(cfg.seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=src.n_layers, d_in=src.d_in, d_out=src.d_out,
                                         n_latents=cfg.n_latents or cfg.expansion * src.d_in, k=cfg.k))
    s_in = [math.sqrt(s.d_in) / max(s.mean_norm, 1e-12) for s in src.inputs]
    s_out = [math.sqrt(s.d_in) / max(s.mean_norm, 1e-12) for s in src.targets]
    if par.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cfg.out) / "train_cfg.json", {**to_dict(cfg), "pairs": [
            {"store": str(a.path), "target_store": str(b.path), "in_hook": a.hook, "out_hook": b.hook}
            for a, b in zip(src.inputs, src.targets, strict=True)]})
        mb = [clt_memory_bytes(clt.cfg, l) / 2**20 for l in range(clt.cfg.n_layers)]
        print(f"train-clt: {clt.cfg.n_latents:,} latents per layer; training memory (float32 weights, grads, "
              f"Adam) per source layer {', '.join(f'{m:,.1f}' for m in mb)} MiB, {sum(mb):,.1f} MiB in all"
              + (f", split over {par.n_shards} ranks" if par.n_shards > 1 else ""), file=sys.stderr)
    with report_rank_failure("training") if par.world_size > 1 else contextlib.nullcontext():
        fit_clt(clt, src, cfg, s_in_L=s_in, s_out_L=s_out, par=par)
    return Path(cfg.out)


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, CLTTrainConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(CLTTrainConfig, args)
    out = train_clt(cfg)
    s = json.loads((out / "train_summary.json").read_text())
    print(f"trained a {len(s['memory_bytes_per_layer'])}-layer CLT into {out} "
          f"({s['tokens_per_s']:,.0f} tokens/s): " + ", ".join(f"{k} {v:.3f}" for k, v in s["final"].items()))
    return 0
