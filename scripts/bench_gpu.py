#!/usr/bin/env python
"""GPU benchmark for TopK SAE training (issue 11): llm_sae against sparsify and SAELens.

For each width n it times one full training step (forward + backward + optimiser) in bf16
autocast at d_in=768, k=32, batch 8192, for every implementation in its own fresh process
(so peak memory is its own), and measures in the same run the GPU's bf16 matmul rate, both
on the encoder's own [B, d] × [d, n] product and on a large square product. It reports
tokens/s, encoder FLOP/s (2·d·n per token) as a share of the encoder-matmul rate, and peak
GPU memory (``torch.cuda.max_memory_allocated``), prints a table and writes JSON.

    python scripts/bench_gpu.py --json-out bench_gpu.json           # on a CUDA machine
    python scripts/bench_gpu.py --device cpu --small                # smoke test, anywhere

Implementations (each step = forward + backward + optimiser + decoder-norm upkeep):
  llm_sae         llm_sae.train.Trainer.step, precision bf16, torch sparse kernels
                  (LLM_SAE_TRITON=0)
  llm_sae+triton  the same with the Triton kernels (llm_sae/kernels/triton.py); on CPU it
                  runs under TRITON_INTERPRET=1, which is only a correctness smoke test
  llm_sae+fused   llm_sae+triton with the encoder matmul and top-k fused in one Triton kernel
                  (llm_sae/kernels/fused_topk.py, LLM_SAE_FUSED_TOPK=1): the [B, n]
                  pre-activations are never written to memory
  sparsify        sparsify.SparseCoder forward (bf16 autocast is built in) + fvu backward +
                  gradient projection + Adam
  saelens         sae_lens TopKTrainingSAE.training_forward_pass under bf16 autocast +
                  backward + clip + Adam
A peer is imported from this interpreter, else from --peers-python (.peers/bin/python); if neither has it,
it is reported as "not installed". Targets (issue 11): ≥ 1.3× sparsify's tokens/s, ≥ 50%
of the encoder-matmul rate, peak memory no larger than sparsify's. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = ROOT / ".peers" / "bin" / "python"
PEERS_PY_USED: Path | str = PEERS_PY  # --peers-python
IMPLS = ("llm_sae", "llm_sae+triton", "llm_sae+fused", "sparsify", "saelens")
PEERS = {"sparsify": "sparsify", "saelens": "sae_lens"}


# ------------------------------------------------------------------------------- worker side
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build_step(impl: str, a: argparse.Namespace, n: int, x_BD, device):
    """A zero-argument callable doing one full training step, and the library's version."""
    import importlib.metadata as md

    import torch

    D, K = a.d_in, a.k
    if impl in ("llm_sae", "llm_sae+triton", "llm_sae+fused"):
        from llm_sae.sae.registry import REGISTRY
        from llm_sae.train.config import TrainConfig
        from llm_sae.train.trainer import Trainer

        cfg = TrainConfig(
            store="-", out="-", d_in=D, n_latents=n, k=K, batch_size=a.batch, precision=a.precision
        )
        sae = REGISTRY["topk"](cfg).to(device)
        trainer = Trainer(sae, cfg, total_steps=10**6, input_scale=1.0)
        return (lambda: trainer.step(x_BD)), "working tree"

    if impl == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(D, SparseCoderConfig(num_latents=n, k=K), device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

        def step() -> None:
            out = sae(x_BD)  # its forward is decorated with bf16 autocast on CUDA
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.set_decoder_norm_to_unit_norm()

        return step, md.version("eai-sparsify")

    if impl == "saelens":
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=n, k=K, device=str(device)))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        dead_N = torch.zeros(n, dtype=torch.bool, device=device)
        amp = a.precision == "bf16"

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=x_BD,
                        coefficients={},
                        dead_neuron_mask=dead_N,
                        n_training_steps=0,
                        is_logging_step=False,
                    )
                )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, md.version("sae-lens")
    raise SystemExit(f"unknown implementation {impl!r}")


def _time(fn, device, warmup: int, steps: int, group: int = 5) -> list[float]:
    """Seconds per step, one figure per group of ``group`` back-to-back steps: training
    runs steps back to back, so the host may launch a step while the GPU finishes the
    last (a wait for the GPU after every step would charge each step the launch latency
    of its first kernels, and hide what a step's own host-device waits cost)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, steps // group)):
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / group)
    return sorted(times)


def matmul_rates(a: argparse.Namespace, device) -> dict:
    """bf16 (CUDA) or float32 (CPU) matmul FLOP/s: the encoder's shape per n, and square."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"dtype": str(dtype).removeprefix("torch."), "encoder": {}}
    x_BD = torch.randn(a.batch, a.d_in, device=device, dtype=dtype)
    for n in a.n_latents:
        W_DN = torch.randn(a.d_in, n, device=device, dtype=dtype)
        t = _time(lambda W_DN=W_DN: x_BD @ W_DN, device, a.warmup, a.steps)
        out["encoder"][str(n)] = 2 * a.batch * a.d_in * n / t[len(t) // 2]
        del W_DN
    s = a.square
    A = torch.randn(s, s, device=device, dtype=dtype)
    t = _time(lambda: A @ A, device, a.warmup, a.steps)
    out["square"] = {"size": s, "flops_per_s": 2 * s**3 / t[len(t) // 2]}
    return out


def worker(impl: str, a: argparse.Namespace) -> dict:
    import torch

    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    if impl == "matmul":
        return matmul_rates(a, device)
    res: dict = {"impl": impl, "by_n": {}}
    for n in a.n_latents:
        x_BD = torch.randn(a.batch, a.d_in, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = _rss_mb("VmRSS")
        step, version = _build_step(impl, a, n, x_BD, device)
        times = _time(step, device, a.warmup, a.steps)
        r = {"step_s": times[len(times) // 2], "step_s_all": times}
        if device.type == "cuda":
            r["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            r["peak_mem_mb"] = _rss_mb("VmHWM") - rss0  # peak RSS growth (first n only is exact)
        res["version"] = version
        res["by_n"][str(n)] = r
        del step
    return res


# ------------------------------------------------------------------------------ driver side
def _has_module(python: Path | str, module: str) -> bool:
    probe = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return (
            subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _python_for(impl: str) -> str | None:
    """The interpreter that can run ``impl``, or None when it is not installed."""
    if impl in ("llm_sae+triton", "llm_sae+fused"):
        return sys.executable if _has_module(sys.executable, "triton") else None
    if impl not in PEERS:
        return sys.executable
    for py in (sys.executable, PEERS_PY_USED):
        if Path(py).exists() and _has_module(py, PEERS[impl]):
            return str(py)
    return None


def _run_worker(python: str, impl: str, a: argparse.Namespace) -> dict:
    cmd = [
        python,
        __file__,
        "--worker",
        impl,
        "--device",
        a.device,
        "--precision",
        a.precision,
        "--n-latents",
        ",".join(map(str, a.n_latents)),
    ]
    for name in ("d_in", "k", "batch", "steps", "warmup", "seed", "square"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    if impl == "llm_sae":
        env["LLM_SAE_TRITON"] = "0"
    elif impl in ("llm_sae+triton", "llm_sae+fused"):
        env["LLM_SAE_TRITON"] = "1"
        if impl == "llm_sae+fused":
            env["LLM_SAE_FUSED_TOPK"] = "1"
        if a.device == "cpu":
            env["TRITON_INTERPRET"] = "1"  # set before triton is imported in the worker
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"impl": impl, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def summarise(a: argparse.Namespace, mm: dict, results: dict) -> dict:
    """Add tokens/s, FLOP/s shares and the ratios against sparsify to ``results``."""
    # The Triton path is ours on CUDA; on CPU it runs under the interpreter (a smoke test).
    ran = [i for i in ("llm_sae+fused", "llm_sae+triton") if "by_n" in results.get(i, {})]
    ours = ran[0] if ran and a.device.startswith("cuda") else "llm_sae"
    targets = {}
    for r in results.values():
        for n_str, m in r.get("by_n", {}).items():
            n = int(n_str)
            enc_flops = 2 * a.d_in * n * a.batch / m["step_s"]
            m["tokens_per_s"] = a.batch / m["step_s"]
            m["encoder_flops_per_s"] = enc_flops
            m["frac_of_encoder_matmul"] = (
                enc_flops / mm["encoder"][n_str] if "encoder" in mm else None
            )
            m["frac_of_square_matmul"] = (
                enc_flops / mm["square"]["flops_per_s"] if "square" in mm else None
            )
    for n_str in map(str, a.n_latents):
        mine = results.get(ours, {}).get("by_n", {}).get(n_str)
        peer = results.get("sparsify", {}).get("by_n", {}).get(n_str)
        t = {"impl": ours}
        if mine:
            t["frac_of_encoder_matmul"] = mine.get("frac_of_encoder_matmul")
            t["encoder_bound_ok"] = (mine.get("frac_of_encoder_matmul") or 0) >= 0.5
        if mine and peer:
            t["speedup_vs_sparsify"] = mine["tokens_per_s"] / peer["tokens_per_s"]
            t["speedup_ok"] = t["speedup_vs_sparsify"] >= 1.3
            t["peak_mem_ratio_vs_sparsify"] = mine["peak_mem_mb"] / peer["peak_mem_mb"]
            t["memory_ok"] = mine["peak_mem_mb"] <= peer["peak_mem_mb"]
        targets[n_str] = t
    return targets


def format_table(
    a: argparse.Namespace, mm: dict, results: dict, targets: dict, device_name: str
) -> str:
    lines = [
        f"TopK SAE training step, {a.precision}, d={a.d_in} k={a.k} batch={a.batch}, {device_name}, "
        f"{a.steps} steps after {a.warmup} warm-up, median of groups of 5 back-to-back steps",
    ]
    if "square" in mm:
        lines.append(
            f"{mm['dtype']} matmul, square {mm['square']['size']}: "
            f"{mm['square']['flops_per_s'] / 1e12:.2f} TFLOP/s"
        )
        for n_str, f in mm.get("encoder", {}).items():
            lines.append(
                f"{mm['dtype']} matmul, encoder [{a.batch},{a.d_in}]x[{a.d_in},{n_str}]: "
                f"{f / 1e12:.2f} TFLOP/s"
            )
    head = (
        f"{'n':>7s} {'impl':15s} {'version':14s} {'step ms':>9s} {'tokens/s':>11s} "
        f"{'enc TFLOP/s':>11s} {'of enc mm':>9s} {'peak MB':>9s}"
    )
    lines += ["", head, "-" * len(head)]
    for n_str in map(str, a.n_latents):
        for impl in a.impls:
            r = results.get(impl, {})
            if "by_n" not in r:
                why = r.get("error") or r.get("skipped") or "not run"
                lines.append(f"{n_str:>7s} {impl:15s} {why}")
                continue
            m = r["by_n"][n_str]
            frac = m.get("frac_of_encoder_matmul")
            lines.append(
                f"{n_str:>7s} {impl:15s} {r.get('version', '')[:14]:14s} {m['step_s'] * 1e3:9.2f} "
                f"{m['tokens_per_s']:11.0f} {m['encoder_flops_per_s'] / 1e12:11.3f} "
                f"{'-' if frac is None else f'{frac:.2f}':>9s} {m['peak_mem_mb']:9.0f}"
            )
    lines.append("")
    for n_str, t in targets.items():
        parts = [f"n={n_str}: {t['impl']}"]
        if "speedup_vs_sparsify" in t:
            parts.append(f"{t['speedup_vs_sparsify']:.2f}x sparsify (target 1.3)")
            parts.append(f"memory {t['peak_mem_ratio_vs_sparsify']:.2f}x sparsify (target <= 1)")
        if t.get("frac_of_encoder_matmul") is not None:
            parts.append(f"{t['frac_of_encoder_matmul']:.0%} of the encoder matmul (target 50%)")
        lines.append(", ".join(parts))
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default="cuda", help="cuda, cuda:1, or cpu (with --small: a smoke test)"
    )
    p.add_argument(
        "--small", action="store_true", help="tiny shapes (d=64, n=256,1024, k=8, batch 256)"
    )
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", default="24576,131072", help="comma-separated widths")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--precision", default="bf16", choices=("bf16", "tf32", "fp32"))
    p.add_argument("--steps", type=int, default=20, help="timed steps, in groups of 5 back-to-back steps (the median group is reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--square", type=int, default=8192, help="size of the square matmul probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
    p.add_argument("--json-out", type=Path)
    p.add_argument(
        "--peers-python",
        default=str(PEERS_PY),
        help="interpreter with sparsify and sae_lens, when this one lacks them",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.small and not a.worker:
        a.d_in, a.n_latents, a.k, a.batch = 64, "256,1024", 8, 256
        a.steps, a.warmup, a.square = min(a.steps, 3), min(a.warmup, 1), 256
    a.n_latents = [int(x) for x in str(a.n_latents).split(",") if x.strip()]
    a.impls = [i.strip() for i in str(a.impls).split(",") if i.strip()]
    return a


def main(argv: list[str] | None = None) -> int:
    global PEERS_PY_USED
    a = _parse(argv)
    PEERS_PY_USED = a.peers_python
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return 0
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here; use --device cpu --small for a smoke test", file=sys.stderr)
            return 2
    unknown = [i for i in a.impls if i not in IMPLS]
    if unknown:
        print(
            f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}", file=sys.stderr
        )
        return 2
    print("measuring the matmul rate …", file=sys.stderr, flush=True)
    mm = _run_worker(sys.executable, "matmul", a)
    results: dict = {}
    for impl in a.impls:
        py = _python_for(impl)
        if py is None:
            results[impl] = {"impl": impl, "skipped": "not installed"}
            continue
        print(f"timing {impl} …", file=sys.stderr, flush=True)
        results[impl] = _run_worker(py, impl, a)
    targets = summarise(a, mm, results)
    device_name = _device_name(a.device)
    print(format_table(a, mm, results, targets, device_name), end="")
    if a.json_out:
        out = {
            "device": device_name,
            "precision": a.precision,
            "shape": {"d_in": a.d_in, "n_latents": a.n_latents, "k": a.k, "batch": a.batch},
            "steps": a.steps,
            "warmup": a.warmup,
            "matmul": mm,
            "results": results,
            "targets": targets,
        }
        a.json_out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
