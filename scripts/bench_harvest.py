"""Benchmark: what the store costs a harvest, and how fast the store reads back.

In one run, on one model, text and batch size:
  1. bare    — tokenize/pack + the model's forward pass up to the hook's layer, nothing kept;
  2. harvest — the full `harvest()` (same forward + copying rows out, stats, checksums, writes);
  3. writer/reader — a synthetic store of --reader-gb written by StoreWriter, then one
     shuffled epoch of it through `store.reader()` (GB/s, rows/s);
  4. peaks   — this machine's memory bandwidth (a large tensor copy) and disk write speed
     (one large write + fsync), the ceilings for the reader and the writer.
The store's overhead is harvest/bare - 1 (target: under 5%); since that difference of two
noisy timings is hard to see on a busy machine, the harvest also times its own store work
(selecting rows, copying them out, checks, stats, the final flush) directly. The reader is reported
against the measured memory bandwidth.

    python scripts/bench_harvest.py --tokens 200000 --json-out bench_harvest.json
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


def memory_bandwidth(nbytes: int = 2**29, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large contiguous tensor copy."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def disk_write_bandwidth(folder: Path, nbytes: int = 2**28) -> float:
    """Bytes per second of one large write + fsync: the ceiling for the store writer."""
    data = os.urandom(2**20) * (nbytes // 2**20)
    path = folder / "disk_probe.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return nbytes / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256, help="width of the tiny random model")
    ap.add_argument("--layers", type=int, default=4, help="layers of the tiny random model")
    ap.add_argument("--hook-layer", type=int, default=2, help="harvest blocks.L.hook_resid_post at this L")
    ap.add_argument("--tokens", type=int, default=100_000, help="rows to harvest")
    ap.add_argument("--context-length", type=int, default=128, help="tokens per context")
    ap.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass")
    ap.add_argument("--dtype", default="float32", help="store dtype")
    ap.add_argument("--device", default="cpu", help="model device")
    ap.add_argument("--reader-batch", type=int, default=4096, help="rows per reader batch")
    ap.add_argument("--repeats", type=int, default=3, help="alternating bare/harvest runs; fastest of each counts")
    ap.add_argument("--reader-gb", type=float, default=1.0, help="size of the synthetic store the reader reads")
    ap.add_argument("--reader-budget-gb", type=float, default=0.25, help="reader memory budget")
    ap.add_argument("--workdir", default=None, help="where to build the model and store (default: a temp dir)")
    ap.add_argument("--json-out", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    import numpy as np
    import torch

    from llm_sae import harvest as H
    from llm_sae.harvest.loop import LAST_RUN
    from llm_sae.lm.hooks import load_model, stop_layer
    from llm_sae.lm.testing import make_text, make_tiny_model
    from llm_sae.lm.text import iter_documents, pack_contexts
    from llm_sae.store.store import open_store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_harvest_"))
    model_dir = make_tiny_model(work / "model", "gpt2", d_model=args.d_model, n_layers=args.layers,
                                n_heads=max(1, args.d_model // 64), context=args.context_length)
    n_docs = 200
    docs = make_text(n_docs)
    # Enough text for the tokens asked for (BOS/EOS rows are skipped, so over-provision).
    while sum(len(d) for d in docs) // 3 < 1.3 * args.tokens:
        n_docs *= 2
        docs = make_text(n_docs)
    (work / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    hook = f"blocks.{args.hook_layer}.hook_resid_post"
    model = load_model(str(model_dir), device=args.device)
    stop = stop_layer(model, [hook])

    torch.set_grad_enabled(False)

    def run_harvest(r: int) -> tuple[float, int]:
        """One full harvest; its own timer starts after the model is loaded."""
        out = work / f"store{r}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = H.HarvestConfig(model=str(model_dir), hook=[hook], dataset=str(work / "text.jsonl"),
                              tokens=args.tokens, out=str(out), context_length=args.context_length,
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              progress=False)
        H.harvest(cfg)
        n_ctx = json.loads((out / "manifest.json").read_text())["progress"]["contexts"]
        shutil.rmtree(out, ignore_errors=True)
        close_times.append(LAST_RUN["close_seconds"])
        store_times.append(LAST_RUN["store_seconds"] / LAST_RUN["seconds"])
        return LAST_RUN["seconds"], n_ctx

    def bare(n_ctx: int) -> float:
        """Pack + forward to the hook's layer over exactly the contexts the harvest used
        (BOS/EOS rows are not stored, so it needs more contexts than tokens/length)."""
        t = time.perf_counter()
        ctx = pack_contexts(iter_documents(str(work / "text.jsonl")), model.tokenizer, args.context_length)
        for _ in range(-(-n_ctx // args.batch_size)):
            toks = torch.from_numpy(np.stack([next(ctx)[0] for _ in range(args.batch_size)]))
            with torch.inference_mode():
                model(toks.to(args.device), return_type=None, stop_at_layer=stop)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # 1-2. Bare and harvest runs alternate and the fastest of each counts, so a busy
    # machine biases neither side.
    bare_times, harvest_times, close_times, store_times = [], [], [], []
    for r in range(args.repeats):
        h_s, n_ctx = run_harvest(r)
        harvest_times.append(h_s)
        bare_times.append(bare(n_ctx))
    bare_s, harvest_s = min(bare_times), min(harvest_times)

    # 3. writer + reader on a store big enough to need several shuffle groups: random rows
    # of the same width, so this part does not wait on the model.
    from llm_sae.store.writer import StoreWriter

    syn = work / "synthetic"
    shutil.rmtree(syn, ignore_errors=True)
    n_syn = int(args.reader_gb * 1e9) // (args.d_model * 4)
    block = torch.randn(8192, args.d_model)
    t = time.perf_counter()
    with StoreWriter(syn, meta={"d_in": args.d_model, "dtype": "float32"}) as w:
        for a in range(0, n_syn, len(block)):
            w.append(block[: min(len(block), n_syn - a)])
    write_s = time.perf_counter() - t
    st = open_store(syn)
    budget = int(args.reader_budget_gb * 2**30)
    t = time.perf_counter()
    n = 0
    for x in st.reader(args.reader_batch, seed=0, dtype=torch.float32, memory_budget_bytes=budget):
        n += x.shape[0]
    read_s = time.perf_counter() - t
    read_bytes = n * st.row_bytes
    shutil.rmtree(syn, ignore_errors=True)

    # 4. peaks
    bw = memory_bandwidth()
    disk = disk_write_bandwidth(work)

    res = {
        "device": args.device, "threads": torch.get_num_threads(), "d_model": args.d_model,
        "layers": args.layers, "hook": hook, "tokens": args.tokens, "context_length": args.context_length,
        "batch_size": args.batch_size, "store_dtype": args.dtype, "contexts": n_ctx,
        "bare_forward_s": bare_s, "harvest_s": harvest_s, "bare_runs_s": bare_times,
        "harvest_runs_s": harvest_times, "harvest_final_flush_s": close_times,
        "store_share_of_harvest": min(store_times), "store_share_runs": store_times, "harvest_over_bare": harvest_s / bare_s,
        "harvest_tokens_per_s": args.tokens / harvest_s, "bare_tokens_per_s": args.tokens / bare_s,
        "writer_GBps": st.n_rows * st.row_bytes / write_s / 1e9, "disk_write_GBps": disk / 1e9,
        "reader_store_GB": st.n_rows * st.row_bytes / 1e9, "reader_budget_GB": args.reader_budget_gb,
        "reader_rows": n, "reader_s": read_s, "reader_GBps": read_bytes / read_s / 1e9,
        "reader_rows_per_s": n / read_s, "memcopy_GBps": bw / 1e9,
        "reader_vs_memcopy": (read_bytes / read_s) / bw,
    }
    rows = [
        ("bare forward (pack + model to hook)", f"{bare_s:8.2f} s", f"{res['bare_tokens_per_s']:,.0f} tok/s"),
        ("full harvest (to store)", f"{harvest_s:8.2f} s", f"{res['harvest_tokens_per_s']:,.0f} tok/s"),
        ("harvest / bare", f"{res['harvest_over_bare']:8.3f}", "target < 1.05"),
        ("store's share of the harvest loop", f"{100 * res['store_share_of_harvest']:7.2f}%",
         "timed inside harvest: rows out, checks, stats, final flush"),
        ("store writer (synthetic rows)", f"{res['writer_GBps']:8.2f} GB/s",
         f"disk write+fsync peak {res['disk_write_GBps']:.2f} GB/s"),
        ("reader, one shuffled epoch", f"{res['reader_GBps']:8.2f} GB/s", f"{res['reader_rows_per_s']:,.0f} rows/s"),
        ("memory bandwidth (tensor copy)", f"{res['memcopy_GBps']:8.2f} GB/s",
         f"reader at {100 * res['reader_vs_memcopy']:.0f}% of it"),
    ]
    print(f"harvest benchmark: gpt2-like d={args.d_model} L={args.layers}, {hook}, {args.tokens:,} tokens, "
          f"ctx {args.context_length}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads")
    for name, a, b in rows:
        print(f"  {name:38s} {a:>14s}   {b}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
