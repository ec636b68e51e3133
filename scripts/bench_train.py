#!/usr/bin/env python
"""Time one TopK SAE training step: llm_sae against its dense reference and the peer libraries.

Every implementation runs in its own fresh process on the same data and shapes (so peak
memory is its own), warms up, then reports the median step time. The peers (EleutherAI's
sparsify, SAELens) run in the separate virtualenv .peers/ made by scripts/setup_peers.sh;
without it they are skipped. The same run measures this machine's float32 matmul rate on
the encoder's [B, d] × [d, n] product, the unavoidable work of a TopK step (whole and in
64 MB row slabs, before and after the implementations; the fastest counts), and reports
each step's encoder FLOP/s as a fraction of it.

    python scripts/bench_train.py                       # d=768, n=24576, k=32, B=4096
    python scripts/bench_train.py --json-out bench.json --steps 7
    python scripts/bench_train.py --d-in 64 --n-latents 1024 --batch 256   # a quick look

Step definitions (forward + backward + optimiser + decoder-norm constraint):
  llm_sae      llm_sae.train.Trainer.step: TopKSAE on the sparse kernels, AuxK bookkeeping,
               gradient projection, grad clipping, Adam, decoder renormalisation
  kernels      the bare kernels: topk_encode/topk_decode, MSE, gradient projection,
               fused Adam, renormalisation (what Trainer.step adds on top is bookkeeping)
  dense        the same step through plain autograd (dense_topk_encode/decode)
  sparsify     sparsify.SparseCoder forward (fvu loss) + backward + gradient projection + Adam
  saelens      sae_lens TopKTrainingSAE.training_forward_pass + backward + clip + Adam
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = ROOT / ".peers" / "bin" / "python"
OURS = ("llm_sae", "kernels", "dense")
PEERS = ("sparsify", "saelens")


# ------------------------------------------------------------------------------- worker side
def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build_step(impl: str, a: argparse.Namespace, x_BD):  # noqa: C901 - one branch per peer
    """A zero-argument callable doing one full training step, and the library version."""
    import torch

    D, N, K = a.d_in, a.n_latents, a.k
    dead_N = None
    if a.dead_frac > 0:  # the same latents for every implementation
        dead_N = torch.zeros(N, dtype=torch.bool)
        dead_N[torch.randperm(N, generator=torch.Generator().manual_seed(a.seed))[: max(1, round(a.dead_frac * N))]] = True
    if impl == "llm_sae":
        # As `llm-sae train` does on a CPU: the allocator tuning is the command's opt-in.
        from llm_sae.bench.steps import started_trainer
        from llm_sae.common.process import return_large_blocks_to_os

        return_large_blocks_to_os()
        trainer = started_trainer(a.arch, x_BD, n_latents=N, k=K)
        if a.train_steps:  # real training first: the screen's fallback rate in a real run
            for _ in range(a.train_steps):
                trainer.step(planted_batch(a, torch.Generator().manual_seed(a.seed + 1 + _)))
        if dead_N is not None:  # these latents stay dead, so AuxK acts at every step
            trainer.dead.mask = lambda: dead_N
        return (lambda: trainer.step(x_BD)), "working tree"

    if impl in ("kernels", "dense"):
        from llm_sae import kernels

        enc, dec = (
            (kernels.topk_encode, kernels.topk_decode)
            if impl == "kernels"
            else (kernels.dense_topk_encode, kernels.dense_topk_decode)
        )
        W_dec = torch.randn(N, D)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_dec = torch.nn.Parameter(W_dec)
        W_enc = torch.nn.Parameter(W_dec.detach().clone())
        b_enc, b_dec = torch.nn.Parameter(torch.zeros(N)), torch.nn.Parameter(torch.zeros(D))
        params = [W_enc, W_dec, b_enc, b_dec]
        opt = torch.optim.Adam(params, lr=1e-4, fused=True)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            vals, idx = enc(x_BD - b_dec, W_enc, b_enc, K)
            x_hat = dec(vals, idx, W_dec) + b_dec
            (x_hat - x_BD).pow(2).sum(-1).mean().backward()
            with torch.no_grad():
                g = W_dec.grad
                # Per-row dot products without an [N, D] temporary.
                dots = torch.bmm(g.unsqueeze(1), W_dec.unsqueeze(2)).view(N, 1)
                g.addcmul_(W_dec, dots, value=-1.0)
                opt.step()
                W_dec.div_(W_dec.norm(dim=1, keepdim=True))

        return step, "working tree"

    if impl == "sparsify":
        import importlib.metadata as md

        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

        def step() -> None:
            out = sae(x_BD, dead_mask=dead_N)
            # sparsify's trainer: fvu + auxk_alpha (1/32 by default) · AuxK
            (out.fvu + out.auxk_loss / 32 if dead_N is not None else out.fvu).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()

        return step, md.version("eai-sparsify")

    if impl == "saelens":
        import importlib.metadata as md

        import sae_lens
        from sae_lens.saes.sae import TrainStepInput

        name = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "MatryoshkaBatchTopK",
                "jumprelu": "JumpReLU"}[a.arch]  # fmt: skip
        sae_cls, cfg_cls = getattr(sae_lens, f"{name}TrainingSAE"), getattr(sae_lens, f"{name}TrainingSAEConfig")
        # Matryoshka: our default widths (n/32, n/8, n/2, n), SAELens's aux loss per level.
        # JumpReLU: its quadratic loss towards L0 = k with the pre-activation loss for dead
        # latents, as ours (SAELens's step is dense whatever its L0).
        extra = ({"matryoshka_widths": [N // 32, N // 8, N // 2, N]} if a.arch == "matryoshka"
                 else {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(K),
                       "pre_act_loss_coefficient": 3e-6} if a.arch == "jumprelu" else {"k": K})  # fmt: skip
        if a.arch == "matryoshka":
            extra["k"] = K
        sae = sae_cls(cfg_cls(d_in=D, d_sae=N, device="cpu", **extra))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        saelens_dead_N = torch.zeros(N, dtype=torch.bool) if dead_N is None else dead_N

        def step() -> None:
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x_BD,
                    coefficients={"l0": 1.0} if a.arch == "jumprelu" else {},
                    dead_neuron_mask=saelens_dead_N,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()

        return step, md.version("sae-lens")

    if impl == "matmul":
        W_DN = torch.randn(D, N)
        out_BN = torch.empty(a.batch, N)
        return (lambda: torch.mm(x_BD, W_DN, out=out_BN)), torch.__version__
    if impl == "matmul_slabs":
        # The same product a slab of rows at a time into one reused 64 MB buffer, as
        # llm_sae's encoder runs it: on this CPU that is faster than one [B, N] product,
        # so the bound is the better of the two.
        W_DN = torch.randn(D, N)
        rows = max(1, 64 * 2**20 // (4 * N))
        out_CN = torch.empty(rows, N)

        def slabs() -> None:
            for s in range(0, a.batch, rows):
                e = min(a.batch, s + rows)
                torch.mm(x_BD[s:e], W_DN, out=out_CN[: e - s])

        return slabs, torch.__version__
    raise SystemExit(f"unknown implementation {impl!r}")


def planted_batch(a: argparse.Namespace, gen):
    """Rows made of ~k of 4·d planted directions with lognormal magnitudes, plus noise:
    enough structure that training moves pre-activations the way real data does."""
    import torch

    dirs_FD = torch.randn(4 * a.d_in, a.d_in, generator=torch.Generator().manual_seed(a.seed))
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    on_BF = torch.rand(a.batch, dirs_FD.shape[0], generator=gen) < a.k / dirs_FD.shape[0]
    mag_BF = torch.randn(a.batch, dirs_FD.shape[0], generator=gen).exp_() * on_BF
    return mag_BF @ dirs_FD + 0.05 * torch.randn(a.batch, a.d_in, generator=gen)


_MODULES = {
    "llm_sae": ("llm_sae.train", "llm_sae.sae", "llm_sae.kernels"),
    "kernels": ("llm_sae.kernels",),
    "dense": ("llm_sae.kernels",),
    "sparsify": ("sparsify",),
    "saelens": ("sae_lens",),
}


def worker(impl: str, a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # Libraries and torch's thread pool are loaded before the memory baseline, so the
    # peak-RSS delta counts only what a step allocates.
    for mod in _MODULES.get(impl, ()):
        importlib.import_module(mod)
    torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    # Building any torch optimiser imports torch's compiler stack (~145 MB of code, the
    # same for every implementation); that is library code, not what a step allocates.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    rss0 = _rss_mb("VmRSS")
    x_BD = torch.randn(a.batch, a.d_in, generator=torch.Generator().manual_seed(a.seed))
    step, version = _build_step(impl, a, x_BD)
    for _ in range(a.warmup):
        step()
    screen = sys.modules.get("llm_sae.kernels.screen")
    if screen is not None:
        screen.reset_stats()
    # cpu: this process's CPU time, robust on a shared machine when run with --threads 1
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    times = []
    for _ in range(a.steps):
        t0 = clock()
        step()
        times.append(clock() - t0)
    times.sort()
    out = {
        "impl": impl,
        "version": version,
        "step_s": times[len(times) // 2],
        "step_s_all": times,
        "peak_rss_delta_mb": _rss_mb("VmHWM") - rss0,
        "threads": torch.get_num_threads(),
    }
    if "llm_sae" in sys.modules:
        out["module"] = sys.modules["llm_sae"].__file__
    if screen is not None:  # the bfloat16-screened encoder ran (llm_sae/screen.py)
        out["screened_rows"] = screen.STATS["rows"]
        out["fallback_rows"] = screen.STATS["fallback_rows"]
    return out


# ------------------------------------------------------------------------------ driver side
def _run_worker(python: Path | str, impl: str, a: argparse.Namespace) -> dict:
    cmd = [str(python), __file__, "--worker", impl]
    names = ("clock", "arch", "d_in", "n_latents", "k", "batch", "steps", "warmup", "threads", "seed", "dead_frac", "train_steps")
    for name in names:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    if impl not in PEERS:  # this checkout's llm_sae, not whichever one is installed
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if a.screen != "auto":
        env["LLM_SAE_SCREEN"] = a.screen
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"impl": impl, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _screen_col(r: dict) -> str:
    """'off', or the share of rows the screened encoder recomputed in float32."""
    rows = r.get("screened_rows", 0)
    if not rows:
        return "off" if "screened_rows" in r else "-"
    return f"{100 * r['fallback_rows'] / rows:.3f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-in", type=int, default=768, help="input width d")
    p.add_argument("--n-latents", type=int, default=24576, help="number of latents n")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--archs", default="topk", help="comma-separated: topk, batchtopk, matryoshka, jumprelu")
    p.add_argument("--arch", default="topk", help=argparse.SUPPRESS)
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="step time as wall time, or as the process's CPU time (for a loaded machine, with --threads 1)",
    )  # fmt: skip
    p.add_argument("--ks", help="comma-separated k values (default: --k)")
    p.add_argument(
        "--states", default="0",
        help="comma-separated: a share of latents kept dead (0, 0.01, 0.1) or 'trained'",
    )  # fmt: skip
    p.add_argument("--dead-frac", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--train-steps", type=int, default=0, help="steps of training for 'trained' (300)")
    p.add_argument("--impls", default=",".join(OURS + PEERS), help="comma-separated subset to run")
    p.add_argument(
        "--screen",
        choices=("auto", "0", "1"),
        default="auto",
        help="the bfloat16-screened encoder forward (LLM_SAE_SCREEN): auto = on where the "
        "CPU has bfloat16 dot products, 0 = off (the float32 matmul), 1 = forced on",
    )
    p.add_argument("--json-out", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return 0

    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    peers_ok = PEERS_PY.exists()
    if not peers_ok and any(i in PEERS for i in impls):
        print(
            f"{PEERS_PY} not found: skipping the peers. Create it with `bash scripts/setup_peers.sh`."
        )
    # The machine's matmul rate: the encoder product whole and in slabs, before and after
    # the implementations (this CPU's clock drifts during a run); the fastest is the bound.
    mms = [_run_worker(sys.executable, m, a) for m in ("matmul", "matmul_slabs")]
    rows: list[dict] = []
    grid = [
        (arch, int(k), st.strip())
        for arch in a.archs.split(",")
        for k in (a.ks or str(a.k)).split(",")
        for st in a.states.split(",")
    ]  # fmt: skip
    for arch, k, state in grid:
        run = argparse.Namespace(**vars(a))
        run.arch, run.k, run.dead_frac, run.train_steps = arch, k, 0.0, 0
        if state == "trained":
            run.train_steps = a.train_steps or 300
        else:
            run.dead_frac = float(state)
        for impl in impls:
            if (impl in PEERS and not peers_ok) or (state != "0" and impl in ("kernels", "dense")):
                continue
            if arch != "topk" and impl in ("kernels", "dense", "sparsify"):
                continue  # TopK only (sparsify has no other architecture)
            if state == "trained" and impl != "llm_sae":
                continue  # the peers' step does not depend on training: see their clean row
            print(f"timing {impl} {arch} k={k} {state} …", file=sys.stderr, flush=True)
            r = _run_worker(PEERS_PY if impl in PEERS else sys.executable, impl, run)
            rows.append(dict(r, arch=arch, k=k, state=state))
    mms += [_run_worker(sys.executable, m, a) for m in ("matmul", "matmul_slabs")]
    mm = min(mms, key=lambda r: r.get("step_s", float("inf")))

    params = 2 * a.n_latents * a.d_in + a.n_latents + a.d_in
    ideal_mb = (3 * params + a.batch * a.d_in) * 4 / 2**20  # weights + Adam m, v + one batch
    mm_s = mm.get("step_s", float("nan"))
    flops_token = 2 * a.d_in * a.n_latents  # the encoder matmul, per token
    rate = flops_token * a.batch / mm_s
    print(
        f"\nSAE training step, float32, d={a.d_in} n={a.n_latents} batch={a.batch}, "
        f"{a.threads} threads, median of {a.steps} after {a.warmup} warm-up, {a.clock} time"
    )
    print(
        f"encoder matmul [{a.batch},{a.d_in}]x[{a.d_in},{a.n_latents}] (best of 4, {mm['impl']}): "
        f"{mm_s * 1e3:.1f} ms = {rate / 1e9:.1f} GFLOP/s"
    )
    print(f"memory floor (weights + Adam state + batch): {ideal_mb:.0f} MB")
    print("state: 0 = no dead latents; 0.01 / 0.1 = that share kept dead (AuxK on); trained = after")
    print(f"{a.train_steps or 300} steps of training on planted features; x peer = peer step / ours\n")
    head = (
        f"{'arch':10s} {'k':>4s} {'state':8s} {'impl':9s} {'step ms':>8s} {'of matmul':>9s} {'peak MB':>8s} "
        f"{'/floor':>6s} {'fallback':>9s} {'x sparsify':>10s} {'x saelens':>9s} {'/ topk':>7s}"
    )
    print(head)
    print("-" * len(head))

    def peer_step(arch: str, k: int, state: str, peer: str) -> float | None:
        key = (arch, k, "0" if state == "trained" else state, peer)
        return next((r["step_s"] for r in rows if (r["arch"], r["k"], r["state"], r["impl"]) == key and "step_s" in r), None)

    for r in rows:
        if "error" in r:
            print(f"{r['arch']:10s} {r['k']:4d} {r['state']:8s} {r['impl']:9s} ERROR {r['error']}")
            continue
        s = r["step_s"]
        r.update(
            tokens_per_s=a.batch / s, encoder_flops_per_s=flops_token * a.batch / s,
            frac_of_matmul=mm_s / s, mem_over_floor=r["peak_rss_delta_mb"] / ideal_mb,
        )  # fmt: skip
        x = {}
        if r["impl"] == "llm_sae":
            for peer in PEERS:
                ps = peer_step(r["arch"], r["k"], r["state"], peer)
                if ps is not None:
                    x[peer] = r["speedup_" + peer] = ps / s
        # Another architecture's step against TopK's at the same k, state and implementation
        # (BatchTopK and Matryoshka keep k latents a token on average: the same mean L0).
        topk_s = next((q["step_s"] for q in rows if q["arch"] == "topk" and "step_s" in q
                       and (q["k"], q["state"], q["impl"]) == (r["k"], r["state"], r["impl"])), None)  # fmt: skip
        if r["arch"] != "topk" and topk_s:
            r["over_topk"] = s / topk_s
        print(
            f"{r['arch']:10s} {r['k']:4d} {r['state']:8s} {r['impl']:9s} {s * 1e3:8.0f} {r['frac_of_matmul']:9.2f} "
            f"{r['peak_rss_delta_mb']:8.0f} {r['mem_over_floor']:6.2f} {_screen_col(r):>9s} "
            + " ".join(f"{x[p]:9.2f}x" if p in x else f"{'':>10s}" for p in PEERS)
            + (f" {r['over_topk']:6.2f}x" if "over_topk" in r else "")
        )
    out = {
        "shape": {"d_in": a.d_in, "n_latents": a.n_latents, "batch": a.batch},
        "threads": a.threads,
        "steps": a.steps,
        "warmup": a.warmup,
        "matmul": {"seconds": mm_s, "flops_per_s": rate, "best_of": {
            f"{r['impl']}_{i // 2}": r.get("step_s") for i, r in enumerate(mms)}},
        "memory_floor_mb": ideal_mb,
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    if a.json_out:
        a.json_out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
