#!/usr/bin/env python
"""Benchmark the analysis pass against the bare encoder pass over the same tokens.

For each token count, in fresh subprocesses (so peak memory is per run): (1) the bare
encoder pass — read the store in order, encode every row (the sparse TopK encode), nothing
else; (2) the full ``analyze`` (no model, so no logit effects). Reports seconds, the ratio
analyze / bare (target ≤ 1.5), achieved encoder FLOP/s against this machine's measured
matmul rate, and peak anonymous memory (RssAnon: the store's memory-mapped pages, which
the OS can drop, are left out) for two token counts, to show memory does not grow with
tokens. Prints a table and writes JSON.

    python scripts/bench_analyze.py --tokens 32768,131072 --d-in 256 --n-latents 4096 --k 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_anon_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PeakMemory:
    """Samples RssAnon every few ms on a thread; ``peak_mb`` after ``stop``."""

    def __init__(self) -> None:
        self.peak = _rss_anon_kb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon_kb())
            time.sleep(0.005)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon_kb())
        return self.peak / 1024


def make_inputs(root: Path, d_in: int, n_latents: int, k: int, n_rows: int, ctx: int) -> None:
    import torch

    from llm_sae.sae.config import SAEConfig
    from llm_sae.sae.registry import REGISTRY
    from llm_sae.store.writer import StoreWriter

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "sae" / "cfg.json").exists():
        torch.manual_seed(0)
        REGISTRY["topk"](SAEConfig(d_in=d_in, n_latents=n_latents, k=k)).save(root / "sae")
    if (root / "store" / "manifest.json").exists():
        return
    g = torch.Generator().manual_seed(0)
    # Activations with a few strong directions per token, so features have structure.
    basis = torch.randn(64, d_in, generator=g)
    with StoreWriter(root / "store", meta={"d_in": d_in, "dtype": "float32", "context_length": ctx,
                                           "hook": "bench"}, shard_rows=32768) as w:
        step = 64 * ctx
        for a in range(0, n_rows, step):
            n = min(step, n_rows - a)
            S = (n + ctx - 1) // ctx
            toks = torch.randint(0, 5000, (S, ctx), generator=g)
            w.add_sequences(toks)
            coef = torch.randn(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.1)
            x = coef @ basis + 0.3 * torch.randn(n, d_in, generator=g)
            r = torch.arange(a, a + n)
            pos = torch.stack([r // ctx, r % ctx], 1)
            w.append(x, toks.reshape(-1)[:n], pos)


def child(args: argparse.Namespace) -> dict:
    import torch

    from llm_sae.analyze.config import AnalyzeConfig
    from llm_sae.analyze.encode_pass import encode_pairs
    from llm_sae.analyze.run import analyze
    from llm_sae.sae.formats.native import load_sae
    from llm_sae.store.store import open_store

    root = Path(args.root)
    device = torch.device(args.device)
    mem = PeakMemory()
    if args.child == "bare":
        sae = load_sae(root / "sae", device=device)
        store = open_store(root / "store")
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for a in range(0, args.n, args.batch_size):
                x = store.acts(a, min(args.n, a + args.batch_size)).to(device, torch.float32)
                if args.bare_pairs:
                    encode_pairs(sae, x)
                else:
                    sae.encode_topk(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        out = {"seconds": secs, "cpu_seconds": time.process_time() - c0}
    else:
        cfg = AnalyzeConfig(sae=str(root / "sae"), store=str(root / "store"), out=str(root / f"out_{args.n}"),
                            tokens=args.n, batch_size=args.batch_size, device=args.device,
                            progress=False, logits=False)
        t0, c0 = time.perf_counter(), time.process_time()
        s = analyze(cfg)
        secs = time.perf_counter() - t0
        out = {"seconds": secs, "cpu_seconds": time.process_time() - c0, "pass_seconds": s["pass_s"],
               "pass_cpu_seconds": s["pass_cpu_s"], "write_seconds": secs - s["pass_s"],
               "state_mb": s["state_bytes"] / 2**20}
    out["peak_anon_mb"] = mem.stop()
    return out


def matmul_peak(d_in: int, n_latents: int, batch: int, device: str) -> float:
    import torch

    a = torch.randn(batch, d_in, device=device)
    b = torch.randn(n_latents, d_in, device=device)
    for _ in range(2):
        a @ b.T
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        a @ b.T
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * batch * d_in * n_latents * reps / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="32768,131072", help="comma-separated token counts (default: %(default)s)")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--context", type=int, default=128, help="sequence length of the synthetic store")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--root", default="/tmp/llm_sae_bench_analyze", help="where the synthetic store goes")
    p.add_argument("--json", default="bench_analyze.json", help="output JSON path")
    p.add_argument("--child", choices=["bare", "analyze"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare-pairs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    counts = [int(t) for t in args.tokens.split(",")]
    root = Path(args.root) / f"d{args.d_in}_n{args.n_latents}_k{args.k}_t{max(counts)}"
    make_inputs(root, args.d_in, args.n_latents, args.k, max(counts), args.context)
    peak = matmul_peak(args.d_in, args.n_latents, args.batch_size, args.device)

    def run(kind: str, n: int) -> dict:
        cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--root", str(root),
               "--batch-size", str(args.batch_size), "--device", args.device]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(res.stdout.strip().splitlines()[-1])

    rows = []
    for n in counts:
        bare, full = run("bare", n), run("analyze", n)
        flops = 2 * args.d_in * args.n_latents * n
        rows.append({
            "tokens": n, "bare_s": bare["seconds"], "analyze_s": full["seconds"],
            "analyze_pass_s": full["pass_seconds"], "analyze_write_s": full["write_seconds"],
            "ratio": full["seconds"] / bare["seconds"], "ratio_pass": full["pass_seconds"] / bare["seconds"],
            "bare_cpu_s": bare["cpu_seconds"], "analyze_cpu_s": full["cpu_seconds"],
            "ratio_cpu": full["cpu_seconds"] / bare["cpu_seconds"],
            "ratio_pass_cpu": full["pass_cpu_seconds"] / bare["cpu_seconds"],
            "bare_flops": flops / bare["seconds"], "analyze_flops": flops / full["seconds"],
            "bare_peak_mb": bare["peak_anon_mb"], "analyze_peak_mb": full["peak_anon_mb"],
            "analyze_state_mb": full["state_mb"],
        })
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "n", "bare_pairs")},
              "matmul_peak_flops": peak, "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    print(f"D={args.d_in} N={args.n_latents} k={args.k} batch={args.batch_size} device={args.device}; "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    hdr = f"{'tokens':>8} {'bare s':>8} {'analyze s':>9} {'(pass)':>7} {'(after)':>7} {'ratio':>6} " \
          f"{'pass ratio':>10} {'cpu ratio':>9} {'pass cpu':>8} {'bare %pk':>8} {'anl %pk':>7} {'bare MB':>8} {'anl MB':>7} {'state MB':>8}"
    print(hdr)
    for r in rows:
        print(f"{r['tokens']:>8} {r['bare_s']:>8.2f} {r['analyze_s']:>9.2f} {r['analyze_pass_s']:>7.2f} "
              f"{r['analyze_write_s']:>7.2f} {r['ratio']:>6.2f} {r['ratio_pass']:>10.2f} {r['ratio_cpu']:>9.2f} "
              f"{r['ratio_pass_cpu']:>8.2f} {100 * r['bare_flops'] / peak:>7.0f}% "
              f"{100 * r['analyze_flops'] / peak:>6.0f}% {r['bare_peak_mb']:>8.0f} {r['analyze_peak_mb']:>7.0f} "
              f"{r['analyze_state_mb']:>8.1f}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
