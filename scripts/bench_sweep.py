#!/usr/bin/env python
"""A sweep as one run against separate runs; training on the fly against harvest + train.

Part 1: 8 SAEs (k ∈ {16, 32, 64, 128} × 2 widths) from one synthetic store, trained as one
sweep (`train_sweep`: each batch read and shuffled once, handed to all 8 trainers) and as
8 separate `train` runs, in this one process, one after the other (so the separate runs
are not charged 8 interpreter starts). Where the time goes: the data stream alone (the
store reader over the same batches, timed by itself), each SAE's steps (timed inside the
sweep), and the setup (opening the store, the b_dec initialisation sample, checkpoints).

Part 2: a model's activations at one hook, trained on the fly (`--model`) against a
harvest to disk followed by training from that store, on the same tokens, and the bytes
of the store that on the fly never writes.

    python scripts/bench_sweep.py                               # the BENCHMARKS.md numbers
    python scripts/bench_sweep.py --d-in 64 --steps 10 --skip-model   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llm_sae.store.writer import StoreWriter
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train
from llm_sae.train.sweep import sweep_configs, sweep_names, train_sweep
from llm_sae.train.trainer import Trainer


def make_store(path: Path, rows: int, d: int) -> Path:
    """Sparse combinations of random directions, at a scale far from √d."""
    g = torch.Generator().manual_seed(0)
    atoms_MD = torch.randn(4 * d, d, generator=g)
    with StoreWriter(path, meta={"d_in": d, "dtype": "float32", "hook": "synthetic"}) as w:
        for _ in range(rows // 4096):
            codes = torch.rand(4096, 4 * d, generator=g) * (torch.rand(4096, 4 * d, generator=g) < 0.02)
            w.append(5.0 * codes @ atoms_MD)
    return path


def timed_steps() -> dict[str, float]:
    """Patch Trainer.step to add up its time per output folder."""
    spent: dict[str, float] = {}
    orig = Trainer.step

    def step(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            spent[self.out_dir.name] = spent.get(self.out_dir.name, 0.0) + time.perf_counter() - t

    Trainer.step = step  # type: ignore[method-assign]
    return spent


def part_sweep(a: argparse.Namespace, root: Path) -> dict:
    store = make_store(root / "store", a.rows, a.d_in)
    base = TrainConfig(store=str(store), out=str(root / "sweep"), tokens=a.steps * a.batch,
                       batch_size=a.batch, device="cpu", log_every=10**9, checkpoint_every=0,
                       init_rows=4096)
    axes = {"k": ["16", "32", "64", "128"], "expansion": [str(x) for x in a.expansions]}
    cfgs = sweep_configs(base, axes)
    names = sweep_names(cfgs)

    # The data stream alone: what a separate run pays once more per SAE.
    from llm_sae.sources.store import StoreSource

    t = time.perf_counter()
    it = StoreSource(store).batches(a.batch, seed=0, start_batch=0, device=torch.device("cpu"),
                                    dtype=torch.float32, batch_slice=None)
    for _ in range(a.steps):
        next(it)
    data_s = time.perf_counter() - t

    # Warm up: the first Adam built in a process imports torch._dynamo (8 s on a loaded
    # machine), which would otherwise be charged to whichever run goes first.
    train(TrainConfig(**{**cfgs[0].__dict__, "out": str(root / "warm"), "tokens": a.batch}))
    spent = timed_steps()
    t = time.perf_counter()
    train_sweep(cfgs)
    sweep_s = time.perf_counter() - t
    sweep_steps = dict(spent)
    spent.clear()
    t = time.perf_counter()
    for c, n in zip(cfgs, names, strict=True):
        train(TrainConfig(**{**c.__dict__, "out": str(root / "separate" / n)}))
    separate_s = time.perf_counter() - t
    steps_s = sum(sweep_steps.values())
    return {
        "saes": names, "d_in": a.d_in, "steps": a.steps, "batch": a.batch, "rows": a.rows,
        "sweep_s": sweep_s, "separate_s": separate_s, "ratio": sweep_s / separate_s,
        "data_stream_s": data_s, "sweep_step_s": steps_s, "separate_step_s": sum(spent.values()),
        "sweep_other_s": sweep_s - steps_s,
        "step_s_per_sae": {n: round(v, 3) for n, v in sweep_steps.items()},
    }


def part_model(a: argparse.Namespace, root: Path) -> dict:
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest
    from llm_sae.lm.testing import make_tiny_model, write_text_files

    model = make_tiny_model(root / "model", "gpt2", d_model=a.model_d, n_layers=2, context=128)
    text = write_text_files(root / "text", n_docs=2000) / "docs.jsonl"
    hook, tokens = "blocks.1.hook_resid_post", a.model_steps * a.batch
    common = dict(arch="topk", k=32, expansion=8, tokens=tokens, batch_size=a.batch, device="cpu",
                  log_every=10**9, checkpoint_every=0, init_rows=4096)
    t = time.perf_counter()
    harvest(HarvestConfig(model=str(model), hook=[hook], dataset=str(text), tokens=tokens,
                          out=str(root / "hstore"), context_length=128, batch_size=32, device="cpu",
                          progress=False))
    harvest_s = time.perf_counter() - t
    store_bytes = sum(p.stat().st_size for p in (root / "hstore").rglob("*") if p.is_file())
    t = time.perf_counter()
    train(TrainConfig(store=str(root / "hstore"), out=str(root / "from_store"), **common))
    train_store_s = time.perf_counter() - t
    t = time.perf_counter()
    train(TrainConfig(model=str(model), dataset=str(text), hook=hook, context_length=128,
                      model_batch_size=32, buffer_rows=16384, out=str(root / "on_the_fly"), **common))
    fly_s = time.perf_counter() - t
    written = sum(p.stat().st_size for p in (root / "on_the_fly").rglob("*") if p.is_file())
    return {"model_d": a.model_d, "tokens": tokens, "harvest_s": harvest_s, "train_from_store_s": train_store_s,
            "harvest_plus_train_s": harvest_s + train_store_s, "on_the_fly_s": fly_s,
            "store_bytes": store_bytes, "on_the_fly_bytes_written": written}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--expansions", type=int, nargs=2, default=[8, 16])
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--model-d", type=int, default=128)
    p.add_argument("--model-steps", type=int, default=60)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared 2-core machine 2 threads run 20x slower than 1: they spin)")
    p.add_argument("--json-out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        res = {"threads": torch.get_num_threads(), "sweep": part_sweep(a, root)}
        print(json.dumps(res["sweep"], indent=1), flush=True)
        if not a.skip_model:
            res["model"] = part_model(a, root)
            print(json.dumps(res["model"], indent=1), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
