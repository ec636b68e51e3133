#!/usr/bin/env python
"""LISTA against the one-layer encoders and FISTA's optimum, on planted features.

Every SAE is trained through ``llm_sae.bench.train_one`` (the Trainer, as
``llm-sae bench recovery`` does) on the same synthetic stream with a known dictionary,
then scored two ways:

- **ground truth** (``llm_sae.bench.score_sae``): how well the decoder rows recover the
  planted features (mean best |cos|, share above 0.9), held-out FVU, L0, dead fraction;
- **amortization gap** (``llm_sae.evaluate.amortization_gap``): the encoder's FVU against
  FISTA's on the SAE's own dictionary at the same mean L0 (the better of FISTA's codes and
  their least-squares refit on FISTA's support). LISTA's extra steps should close it.

Two reference rows need no training: FISTA on the *true* dictionary at the data's mean
L0 (the best reconstruction any dictionary of the planted features gets at that
sparsity) and a random dictionary (the floor).

    python scripts/bench_lista.py                          # the BENCHMARKS.md table, ~4 min, 1 thread
    python scripts/bench_lista.py --tokens 100000 --steps 1,3   # a quick look
    python scripts/bench_lista.py --json-out lista.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from llm_sae.bench.recovery import EVAL_START, RecoveryConfig, make_data, score_sae, train_one
from llm_sae.evaluate.amortization import amortization_gap
from llm_sae.sae.sparse_coding import fista, fista_matched_l0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=int, default=32, help="activation width D (default 32)")
    p.add_argument("--n-true", type=int, default=192, help="planted features (default 192)")
    p.add_argument("--n-latents", type=int, default=384, help="SAE latents N (default 384)")
    p.add_argument(
        "--k", type=int, default=4, help="mean active planted features; topk's k (default 4)"
    )
    p.add_argument(
        "--tokens", type=int, default=300_000, help="training samples per SAE (default 300k)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="samples per step (default 256)")
    p.add_argument(
        "--lr", type=float, default=2e-3, help="Adam learning rate for every SAE (default 2e-3)"
    )
    p.add_argument(
        "--l1-coef",
        type=float,
        default=2.0,
        help="L1 coefficient of relu_l1 and lista (default 2.0)",
    )
    p.add_argument(
        "--steps", default="0,1,3,5", help="LISTA step counts T, comma-separated (default 0,1,3,5)"
    )
    p.add_argument(
        "--baselines",
        default="relu_l1,topk",
        help="one-layer archs to compare (default relu_l1,topk)",
    )
    p.add_argument(
        "--eval-rows",
        type=int,
        default=512,
        help="held-out rows for the amortization gap (default 512)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data and every SAE (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json-out", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def recovery_config(a: argparse.Namespace) -> RecoveryConfig:
    return RecoveryConfig(
        d=a.d,
        n_true=a.n_true,
        n_latents=a.n_latents,
        k=a.k,
        tokens=a.tokens,
        batch_size=a.batch_size,
        lr=a.lr,
        l1_coef=a.l1_coef,
        dead_tokens=max(a.tokens // 10, a.batch_size),
        eval_tokens=32_768,
        seed=a.seed,
        device="cpu",
        progress=False,
    )


def encoder_mflop(d: int, n: int, steps: int) -> float:
    """Encoder multiply-adds ×2 per token: W_enc, then one [N, N] product per LISTA step."""
    return (2 * d * n + steps * 2 * n * n) / 1e6


def fista_reference(data: Any, x_BD: torch.Tensor, target_l0: float) -> dict[str, float]:
    """FISTA with the planted dictionary at the data's mean L0 (and its refit)."""
    D_FD = data.features_FD
    m = fista_matched_l0(x_BD, D_FD, target_l0, nonnegative=True)
    z_refit = fista(x_BD, D_FD, 0.0, nonnegative=True, z0_BN=m.z_BN, mask_BN=(m.z_BN != 0).float())
    var = float((x_BD - x_BD.mean(0)).pow(2).sum())
    fvu = (
        min(float((x_BD - m.z_BN @ D_FD).pow(2).sum()), float((x_BD - z_refit @ D_FD).pow(2).sum()))
        / var
    )
    return {"l0": m.l0, "fvu": fvu}


def input_scale(data: Any, cfg: RecoveryConfig) -> float:
    """The scale the Trainer trained at (E‖x‖ = √D on train_one's initialisation sample)."""
    x_BD = data.batch(EVAL_START - 1, min(16384, 4 * cfg.batch_size))
    return math.sqrt(x_BD.shape[1]) / float(x_BD.norm(dim=1).mean())


@torch.no_grad()
def l1_objective_gap(sae: Any, x_BD: torch.Tensor, lam: float) -> dict[str, float]:
    """The encoder's ½‖x − x̂‖² + λ‖z‖₁ against FISTA's minimum of it, same dictionary.

    The objective an L1-trained encoder amortizes (the training loss halved, in the
    units of raw x). Codes are taken for the unit-norm atoms (z·‖W_dec_i‖), so relu_l1's
    norm-weighted penalty is the same objective.
    """
    norms_N = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    D_ND, b_D = sae.W_dec / norms_N[:, None], sae.b_dec

    def objective(z_BN: torch.Tensor) -> float:
        err_BD = x_BD - b_D - z_BN @ D_ND
        return float((0.5 * err_BD.pow(2).sum(-1) + lam * z_BN.abs().sum(-1)).mean())

    z_enc_BN = sae.encode(x_BD) * norms_N
    z_opt_BN = fista(x_BD, D_ND, lam, bias_D=b_D, nonnegative=True, iters=2000, tol=1e-8)
    enc, opt = objective(z_enc_BN), objective(z_opt_BN)
    code_err = float((z_enc_BN - z_opt_BN).norm() / z_opt_BN.norm().clamp_min(1e-12))
    return {
        "objective_encoder": enc,
        "objective_fista": opt,
        "objective_gap": enc / opt - 1,
        "code_error": code_err,
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    cfg = recovery_config(a)
    data = make_data(cfg)
    x_eval_BD = data.batch(EVAL_START + 10_000, a.eval_rows)
    report: dict[str, Any] = {"config": vars(a) | {"json_out": str(a.json_out)}, "rows": []}
    scale = input_scale(data, cfg)
    ref = fista_reference(data, x_eval_BD, float(cfg.k))
    report["rows"].append(
        {
            "sae": "FISTA, true dictionary",
            "fvu": ref["fvu"],
            "l0": ref["l0"],
            "mean_max_cos": 1.0,
            "frac_recovered": 1.0,
        }
    )
    runs = [(b, {}) for b in a.baselines.split(",") if b]
    runs += [("lista", {"lista_steps": int(t)}) for t in a.steps.split(",") if t]
    for arch, over in runs:
        name = f"lista T={over['lista_steps']}" if arch == "lista" else arch
        print(f"bench_lista: training {name}", file=sys.stderr)
        t0 = time.perf_counter()
        sae, seconds = train_one(
            arch, data, replace(cfg, archs=[arch]), torch.device("cpu"), **over
        )
        row = {"sae": name, **score_sae(sae, data, cfg, torch.device("cpu")), "train_s": seconds}
        gap = amortization_gap(sae, x_eval_BD)
        row.update(
            fvu_encoder_eval=gap.get("fvu_encoder"),
            l0_eval=gap.get("l0_encoder"),
            fvu_fista=None if "gap" not in gap else gap["fvu_encoder"] - gap["gap"],
            gap=gap.get("gap"),
            encoder_mflop=encoder_mflop(a.d, a.n_latents, over.get("lista_steps", 0)),
        )
        if arch in ("relu_l1", "lista"):  # trained on ‖e‖² + l1_coef·Σz at scale `scale`
            row.update(l1_objective_gap(sae, x_eval_BD, a.l1_coef / (2 * scale)))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        report["rows"].append(row)
    return report


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    head = (
        f"d={c['d']} planted={c['n_true']} latents={c['n_latents']} k={c['k']} tokens={c['tokens']:,} "
        f"lr={c['lr']} l1_coef={c['l1_coef']} seed={c['seed']} threads={c['threads']}"
    )
    cols = (
        "sae",
        "mean max cos",
        "recovered>0.9",
        "FVU",
        "L0",
        "dead",
        "FVU@L0 FISTA",
        "amort. gap",
        "L1 obj. gap",
        "code err",
        "enc MFLOP/tok",
        "train s",
    )
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        vals = (
            r["sae"],
            _f(r.get("mean_max_cos"), ".3f"),
            _f(r.get("frac_recovered"), ".3f"),
            _f(r.get("fvu"), ".4f"),
            _f(r.get("l0"), ".2f"),
            _f(r.get("dead_frac"), ".3f"),
            _f(r.get("fvu_fista"), ".4f"),
            _f(r.get("gap"), ".4f"),
            _pct(r.get("objective_gap")),
            _f(r.get("code_error"), ".3f"),
            _f(r.get("encoder_mflop"), ".2f"),
            _f(r.get("train_s"), ".0f"),
        )
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _f(x: Any, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    report = run(a)
    print(format_table(report), end="")
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
