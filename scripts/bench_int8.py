"""Benchmark: int8 activation stores against float32 and bfloat16 on the demo's activations.

One harvest of the embedded model (tiny-stdlib, the demo's hook) into a float32 store, then
the same rows rewritten as bfloat16, int8 (one scale per row) and int8_b32 (one scale per
row and block of 32 columns) through ``StoreWriter`` — exactly what ``harvest --dtype``
writes, since the writer quantises the float32 rows the model hands it. For each store:

  bytes/token — activation (+ scale) bytes per row on disk, and the whole store's;
  reader      — rows/s of one shuffled epoch through ``store.reader()`` (float32 out);
  SAE         — a TopK SAE trained from it (same seed, tokens, sizes), evaluated on the
                float32 store: FVU and loss recovered (vs zero-ablation) with it spliced in.

The issue's targets: FVU and loss recovered from int8 within 1% (relative) of float32;
int8 about half the bytes of bfloat16.

    python scripts/bench_int8.py --tokens 40000 --train-tokens 200000 --json-out bench_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = ("float32", "bfloat16", "int8", "int8_b32")


def convert(src: Path, dst: Path, dtype: str, chunk: int = 8192) -> None:
    """The rows (token ids, positions, contexts) of ``src`` rewritten in ``dtype``."""
    from llm_sae.store import StoreWriter, open_store

    s = open_store(src)
    skip = {"format", "version", "complete", "checksum_algo", "n_rows", "n_sequences",
            "next_sequence_id", "progress", "shards", "stats"}
    meta = {k: v for k, v in s.manifest.items() if k not in skip}
    meta["dtype"] = dtype
    with StoreWriter(dst, meta, background=False) as w:
        for a in range(0, s.n_rows, chunk):
            b = min(a + chunk, s.n_rows)
            w.append(s.acts(a, b), s.token_ids(a, b), s.positions(a, b))
        n_seq = int(s.manifest.get("n_sequences", 0))
        if n_seq:
            w.add_sequences(s.sequence_tokens(list(range(n_seq))), list(range(n_seq)))


def store_bytes(path: Path) -> tuple[float, float]:
    """(activation + scale bytes per row, all shard bytes per row)."""
    from llm_sae.store import open_store

    s = open_store(path)
    files = [(k, path / f["file"]) for sh in s.shards for k, f in sh["files"].items()]
    acts = sum(p.stat().st_size for k, p in files if k in ("acts", "scales"))
    total = sum(p.stat().st_size for _, p in files)
    return acts / s.n_rows, total / s.n_rows


def reader_rates(paths: dict[str, Path], batch_size: int = 4096, rounds: int = 5,
                 min_rows: int = 400_000) -> dict[str, float]:
    """Best rows/s of shuffled float32 batches per store; the stores take turns, round by
    round, so a busy machine slows them alike. Each timing reads at least ``min_rows``
    (the small stores loop)."""
    from llm_sae.store import open_store

    stores = {k: open_store(p) for k, p in paths.items()}
    best = dict.fromkeys(paths, 0.0)
    for r in range(rounds):
        for k, s in stores.items():
            it = iter(s.reader(batch_size, seed=r, loop=True))
            next(it)  # the first group's load and the threads' start-up
            t, n = time.perf_counter(), 0
            while n < min_rows:
                n += len(next(it))
            best[k] = max(best[k], n / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=40_000, help="rows harvested")
    ap.add_argument("--train-tokens", type=int, default=200_000)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=8192)
    ap.add_argument("--n-contexts", type=int, default=16, help="contexts for loss recovered")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from llm_sae.demo import middle_hook
    from llm_sae.evaluate.config import EvalConfig
    from llm_sae.evaluate.run import evaluate
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_int8_"))
    hook = middle_hook("tiny-stdlib")
    base = work / "float32"
    # A finished store in --work is reused (harvest resumes).
    harvest(HarvestConfig(model="tiny-stdlib", hook=[hook], dataset="stdlib", tokens=args.tokens,
                          out=str(base), device="cpu", progress=False))
    for dt in DTYPES[1:]:
        if not (work / dt / "manifest.json").exists():
            convert(base, work / dt, dt)
    rates = reader_rates({dt: work / dt for dt in DTYPES})
    results = []
    for dt in DTYPES:
        path = work / dt
        act_b, all_b = store_bytes(path)
        rate = rates[dt]
        sae = train(TrainConfig(store=str(path), out=str(work / f"sae-{dt}"), arch="topk",
                                expansion=args.expansion, k=args.k, tokens=args.train_tokens,
                                batch_size=1024, log_every=10_000, device="cpu", seed=0))
        report = evaluate(EvalConfig(sae=[str(sae)], store=str(base), out=str(work / f"eval-{dt}"),
                                     device="cpu", n_contexts=args.n_contexts, amortization=False,
                                     eval_rows=args.eval_rows))
        (entry,) = report["saes"].values()
        results.append({
            "dtype": dt, "act_bytes_per_token": act_b, "store_bytes_per_token": all_b,
            "reader_rows_per_s": rate, "fvu": entry["reconstruction"]["fvu"],
            "loss_recovered": entry.get("downstream", {}).get("loss_recovered_zero"),
        })
    ref = {r["dtype"]: r for r in results}
    for r in results:
        r["bytes_vs_bf16"] = r["act_bytes_per_token"] / ref["bfloat16"]["act_bytes_per_token"]
        r["fvu_rel_vs_f32"] = r["fvu"] / ref["float32"]["fvu"] - 1
        lr, lr0 = r["loss_recovered"], ref["float32"]["loss_recovered"]
        r["loss_rec_rel_vs_f32"] = None if lr is None or lr0 is None else lr / lr0 - 1
    print(f"\n{'dtype':<10}{'B/tok acts':>11}{'B/tok all':>10}{'vs bf16':>8}{'reader rows/s':>15}"
          f"{'FVU':>9}{'ΔFVU':>8}{'loss rec':>10}{'Δ':>8}")
    for r in results:
        lrr = r["loss_rec_rel_vs_f32"]
        print(f"{r['dtype']:<10}{r['act_bytes_per_token']:>11.1f}{r['store_bytes_per_token']:>10.1f}"
              f"{r['bytes_vs_bf16']:>8.2f}{r['reader_rows_per_s']:>15,.0f}{r['fvu']:>9.4f}"
              f"{r['fvu_rel_vs_f32']:>+8.2%}{r['loss_recovered'] or float('nan'):>10.4f}"
              f"{(lrr if lrr is not None else float('nan')):>+8.2%}")
    out = {"tokens": args.tokens, "train_tokens": args.train_tokens, "hook": hook,
           "expansion": args.expansion, "k": args.k, "results": results}
    print(json.dumps(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
