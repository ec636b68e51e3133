#!/usr/bin/env python
"""A sweep as one run against separate runs, from a store and on the fly; on the fly
against harvest + train.

store: 8 SAEs (k ∈ {16, 32, 64, 128} × 2 widths) from one synthetic store, trained as one
sweep (`train_sweep`: each batch read and shuffled once, handed to all 8 trainers) and as 8
separate `train` runs, in this one process, one after the other (so the separate runs are
not charged 8 interpreter starts).

fly: the same 8 SAEs on a model's activations computed on the fly (`--model --dataset
--hook`), the setting sparsify's users run: the sweep runs the model once per batch for all
8, each separate run once per batch for itself.

For both, where the time goes, timed inside each run by patching: each SAE's steps
(`Trainer.step`), the batch stream (time in `next` on the source's batches: reading, or
tokenizing + the model + shuffling) and within it the model forward, and the rest (setup:
opening the source, the input-scale and b_dec sample, checkpoints, export). The floors: a
sweep takes at least its SAEs' steps (from a store) and, on the fly, those plus one pass
of the stream; both are measured inside the sweep and given as ratios to the separate runs.

model: one SAE trained on the fly (`--model`) against a harvest to disk followed by training
from that store, on the same tokens, and the bytes of the store that on the fly never writes.

    python scripts/bench_sweep.py --json-out bench_sweep.json     # the BENCHMARKS.md numbers
    python scripts/bench_sweep.py --d-in 64 --steps 10 --fly-steps 4 --fly-d 64 --skip-model  # a quick look
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


class Clock:
    """Seconds spent, by patching: each SAE's steps (``Trainer.step``, by output folder),
    the batch stream (``next`` on a source's ``batches``: reading, tokenizing, the model,
    shuffling) and, within it, the model forward (``ModelSource._rows``)."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.stream = self.forward = self.setup_forward = 0.0
        self.in_stream = False
        from llm_sae.sources.model import ModelSource
        from llm_sae.sources.store import StoreSource

        step, rows = Trainer.step, ModelSource._rows
        clock = self

        def timed_step(trainer, *a, **k):
            t = time.perf_counter()
            try:
                return step(trainer, *a, **k)
            finally:
                name = trainer.out_dir.name
                clock.steps[name] = clock.steps.get(name, 0.0) + time.perf_counter() - t

        def timed_rows(src, *a, **k):
            t = time.perf_counter()
            try:
                return rows(src, *a, **k)
            finally:
                if clock.in_stream:
                    clock.forward += time.perf_counter() - t
                else:  # the first rows, for the input scale and the b_dec sample
                    clock.setup_forward += time.perf_counter() - t

        Trainer.step = timed_step  # type: ignore[method-assign]
        ModelSource._rows = timed_rows  # type: ignore[method-assign]
        for cls in (StoreSource, ModelSource):
            cls.batches = self._timed_batches(cls.batches)  # type: ignore[method-assign]

    def _timed_batches(self, batches):
        clock = self

        def timed(src, *a, **k):
            it = iter(batches(src, *a, **k))
            try:
                while True:
                    t, clock.in_stream = time.perf_counter(), True
                    item = next(it, None)
                    clock.stream, clock.in_stream = clock.stream + time.perf_counter() - t, False
                    if item is None:
                        return
                    yield item
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        return timed

    def take(self) -> dict:
        """What was counted since the last take, and start again."""
        out = {"steps_s": sum(self.steps.values()), "stream_s": self.stream, "forward_s": self.forward,
               "setup_forward_s": self.setup_forward,
               "step_s_per_sae": {n: round(v, 3) for n, v in self.steps.items()}}
        self.steps, self.stream, self.forward, self.setup_forward = {}, 0.0, 0.0, 0.0
        return out


def compare(clock: Clock, cfgs: list[TrainConfig], root: Path, reps: int = 1) -> dict:
    """The sweep of ``cfgs`` (one stream), the sweep as before this issue's change, and each
    SAE trained alone (a stream each), in this process, ``reps`` times in rotating order;
    the fastest of each with where its time went, and the floors."""
    import llm_sae.train.sweep as sweep_module
    from llm_sae.train.run import InitSample

    class PerSAE(InitSample):
        """As before: every SAE of the sweep read its own b_dec sample and computed its median."""

        def start(self, trainer, cfg):
            InitSample(self.source).start(trainer, cfg)

    names = sweep_names(cfgs)

    def run(mode: str, rep: int) -> dict:
        out = root / f"{mode}{rep}"  # a new folder each time: an old one would resume, done
        clock.take()
        t = time.perf_counter()
        if mode == "separate":
            for c, n in zip(cfgs, names, strict=True):
                train(TrainConfig(**{**c.__dict__, "out": str(out / n)}))
        else:
            sweep_module.InitSample = PerSAE if mode == "sweep_before" else InitSample  # type: ignore[misc]
            try:
                train_sweep([TrainConfig(**{**c.__dict__, "out": str(out)}) for c in cfgs])
            finally:
                sweep_module.InitSample = InitSample  # type: ignore[misc]
        return {"wall_s": time.perf_counter() - t, **clock.take()}

    modes = ["sweep", "sweep_before", "separate"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(reps):
        for m in modes[rep % 3:] + modes[: rep % 3]:
            runs[m].append(run(m, rep))
    best = {m: min(rs, key=lambda r: r["wall_s"]) for m, rs in runs.items()}
    for r in best.values():
        r["other_s"] = r["wall_s"] - r["steps_s"] - r["stream_s"]
        for k in ("steps", "stream", "forward", "other"):
            r[f"{k}_share"] = r[f"{k}_s"] / r["wall_s"]
    sweep, separate = best["sweep"], best["separate"]
    # The sweep cannot take less than its SAEs' steps, nor (on the fly) less than those
    # plus one pass of the stream; both measured in the sweep itself.
    floor_s = sweep["steps_s"]
    return {
        "saes": names, "reps": reps, "walls_s": {m: [round(r["wall_s"], 2) for r in rs] for m, rs in runs.items()},
        **best, "ratio": sweep["wall_s"] / separate["wall_s"],
        "ratio_before": best["sweep_before"]["wall_s"] / separate["wall_s"],
        "floor_steps_s": floor_s, "floor_steps_ratio": floor_s / separate["wall_s"],
        "floor_steps_plus_stream_s": floor_s + sweep["stream_s"],
        "floor_steps_plus_stream_ratio": (floor_s + sweep["stream_s"]) / separate["wall_s"],
    }


def warm_up(cfg: TrainConfig, root: Path) -> None:
    """The first Adam built in a process imports torch._dynamo (8 s on a loaded machine),
    which would otherwise be charged to whichever run goes first."""
    train(TrainConfig(**{**cfg.__dict__, "out": str(root / "warm"), "tokens": cfg.batch_size}))
    shutil.rmtree(root / "warm")


def part_sweep(a: argparse.Namespace, root: Path, clock: Clock) -> dict:
    store = make_store(root / "store", a.rows, a.d_in)
    base = TrainConfig(store=str(store), out=str(root / "sweep"), tokens=a.steps * a.batch,
                       batch_size=a.batch, device="cpu", log_every=10**9, checkpoint_every=0,
                       init_rows=4096)
    cfgs = sweep_configs(base, {"k": ["16", "32", "64", "128"], "expansion": [str(x) for x in a.expansions]})
    warm_up(cfgs[0], root)
    res = compare(clock, cfgs, root / "store_runs", a.reps)
    return {"d_in": a.d_in, "steps": a.steps, "batch": a.batch, "rows": a.rows, **res}


def part_setup(a: argparse.Namespace, root: Path, clock: Clock) -> dict:
    """Starting the 8 trainers of a sweep (what a sweep does before its first step), with
    one b_dec sample and median for all (``InitSample`` shared, as ``train_sweep`` does
    now) against one per SAE (as before), interleaved and repeated in this process, at the
    default --init-rows."""
    from llm_sae.distributed.parallel import Parallel
    from llm_sae.sources.store import StoreSource
    from llm_sae.train.run import InitSample, start_trainer

    store = make_store(root / "setup_store", max(a.init_rows, 4096 * 4), a.setup_d)
    base = TrainConfig(store=str(store), out=str(root / "setup"), tokens=a.batch, batch_size=a.batch,
                       device="cpu", init_rows=a.init_rows)
    cfgs = sweep_configs(base, {"k": ["16", "32", "64", "128"], "expansion": [str(x) for x in a.expansions]})
    names, source, par = sweep_names(cfgs), StoreSource(store), Parallel()
    start_trainer(cfgs[0], par, source, root / "setup" / "warm")  # the first Adam imports torch._dynamo
    times: dict[str, list[float]] = {"one per SAE (before)": [], "shared (now)": []}
    for rep in range(a.setup_reps):
        for mode in times:
            shared = InitSample(source)
            t = time.perf_counter()
            for c, n in zip(cfgs, names, strict=True):
                start_trainer(c, par, source, root / "setup" / f"{rep}-{len(times[mode])}" / n,
                              shared if mode.startswith("shared") else InitSample(source))
            times[mode].append(time.perf_counter() - t)
    best = {m: min(v) for m, v in times.items()}
    return {"d_in": a.setup_d, "init_rows": a.init_rows, "seconds": times, "best_s": best,
            "ratio_now_before": best["shared (now)"] / best["one per SAE (before)"]}


def part_fly(a: argparse.Namespace, root: Path, clock: Clock) -> dict:
    """The sweep trained on the fly (one model forward per batch for all SAEs) against
    each SAE trained on the fly alone (a forward per batch per SAE), as sparsify's users run it."""
    from llm_sae.lm.testing import make_tiny_model, write_text_files

    model = make_tiny_model(root / "fly_model", "gpt2", d_model=a.fly_d, n_layers=a.fly_layers,
                            n_heads=4, context=128)
    text = write_text_files(root / "fly_text", n_docs=2000) / "docs.jsonl"
    hook = f"blocks.{a.fly_layers - 1}.hook_resid_post"
    # buffer_rows: a block of the shuffle buffer is run whole, so keep it near the tokens
    # trained on; init_rows: the rows each run's model forward reads for the input scale.
    base = TrainConfig(model=str(model), dataset=str(text), hook=hook, context_length=128,
                       model_batch_size=32, buffer_rows=a.fly_buffer, out=str(root / "fly_sweep"),
                       tokens=a.fly_steps * a.batch, batch_size=a.batch, device="cpu",
                       log_every=10**9, checkpoint_every=0, init_rows=2048)
    cfgs = sweep_configs(base, {"k": ["16", "32", "64", "128"], "expansion": [str(x) for x in a.fly_expansions]})
    warm_up(cfgs[0], root)
    res = compare(clock, cfgs, root / "fly_runs", a.fly_reps)
    return {"model_d": a.fly_d, "model_layers": a.fly_layers, "hook": hook, "steps": a.fly_steps,
            "batch": a.batch, **res}


def part_model(a: argparse.Namespace, root: Path, clock: Clock) -> dict:
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest
    from llm_sae.lm.testing import make_tiny_model, write_text_files

    model = make_tiny_model(root / "model", "gpt2", d_model=a.model_d, n_layers=2, context=128)
    text = write_text_files(root / "text", n_docs=2000) / "docs.jsonl"
    hook, tokens = "blocks.1.hook_resid_post", a.model_steps * a.batch
    common = dict(arch="topk", k=32, expansion=8, tokens=tokens, batch_size=a.batch, device="cpu",
                  log_every=10**9, checkpoint_every=0, init_rows=4096)
    from llm_sae.lm.hooks import load_model

    load_model(str(model), device="cpu")  # transformers' imports, charged to neither side
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
                      model_batch_size=32, buffer_rows=a.model_buffer, out=str(root / "on_the_fly"), **common))
    fly_s = time.perf_counter() - t
    written = sum(p.stat().st_size for p in (root / "on_the_fly").rglob("*") if p.is_file())
    return {"model_d": a.model_d, "tokens": tokens, "harvest_s": harvest_s, "train_from_store_s": train_store_s,
            "harvest_plus_train_s": harvest_s + train_store_s, "on_the_fly_s": fly_s,
            "store_bytes": store_bytes, "on_the_fly_bytes_written": written}


def table(res: dict) -> str:
    """The sweep-against-separate rows of BENCHMARKS.md, for each part that ran."""
    rows = ["| source | mode | wall s | SAE steps s (share) | stream s (share) | of which model forward s "
            "| setup, export s (of which model forward) |", "|---|---|---|---|---|---|---|"]
    for part in ("store", "fly"):
        if part not in res:
            continue
        r = res[part]
        for mode in ("separate", "sweep_before", "sweep"):
            m = r[mode]
            rows.append(f"| {part} | {mode} | {m['wall_s']:.2f} | {m['steps_s']:.2f} ({m['steps_share']:.0%}) "
                        f"| {m['stream_s']:.2f} ({m['stream_share']:.0%}) | {m['forward_s']:.2f} ({m['forward_share']:.0%}) "
                        f"| {m['other_s']:.2f} ({m['setup_forward_s']:.2f}) |")
        rows.append(f"| {part} | walls s: {r['walls_s']} |||||")
        rows.append(f"| {part} | ratio sweep/separate **{r['ratio']:.2f}** (before {r['ratio_before']:.2f}); floors: SAE steps "
                    f"{r['floor_steps_ratio']:.2f}, steps + one stream {r['floor_steps_plus_stream_ratio']:.2f} |||||")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--expansions", type=int, nargs=2, default=[8, 16])
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=3, help="times each store mode runs (rotating order; the fastest counts)")
    p.add_argument("--fly-reps", type=int, default=1, help="the same on the fly")
    p.add_argument("--model-d", type=int, default=128)
    p.add_argument("--model-steps", type=int, default=60)
    p.add_argument("--model-buffer", type=int, default=4096,
                   help="--buffer-rows of the on-the-fly run: a block is run whole, so the model runs up "
                   "to one block more rows than are trained on (59%% more at 16384 against 20480 tokens)")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--fly-d", type=int, default=256, help="width of the on-the-fly sweep's model (its SAEs' d_in)")
    p.add_argument("--fly-layers", type=int, default=4, help="its layers; the hook is after the last")
    p.add_argument("--fly-expansions", type=int, nargs=2, default=[4, 8])
    p.add_argument("--fly-steps", type=int, default=24)
    p.add_argument("--fly-buffer", type=int, default=8192, help="--buffer-rows of the on-the-fly runs")
    p.add_argument("--setup-d", type=int, default=256, help="d_in of the setup comparison")
    p.add_argument("--init-rows", type=int, default=16384, help="--init-rows of the setup comparison")
    p.add_argument("--setup-reps", type=int, default=3)
    p.add_argument("--only", choices=["store", "setup", "fly", "model"], nargs="*",
                   help="run only these parts (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared 2-core machine 2 threads run 20x slower than 1: they spin)")
    p.add_argument("--json-out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        clock = Clock()
        parts = a.only or ["store", "setup", "fly"] + ([] if a.skip_model else ["model"])
        res: dict = {"threads": torch.get_num_threads()}
        for name, fn in (("store", part_sweep), ("setup", part_setup), ("fly", part_fly), ("model", part_model)):
            if name in parts:
                res[name] = fn(a, root, clock)
                print(json.dumps(res[name], indent=1), flush=True)
        print(table(res))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
