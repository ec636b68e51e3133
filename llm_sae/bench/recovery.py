"""Built-in benchmarks. ``llm-sae bench recovery``: do SAEs find features we planted?

Synthetic activations come from a known dictionary (``llm_sae.synthetic``: power-law
firing frequencies, lognormal magnitudes, optional co-firing groups and noise). Every
requested architecture is trained on the same stream through the ``train.Trainer`` —
the same code path as ``llm-sae train`` — and scored on how well its decoder rows
recover the true directions (mean over true features of the best |cosine| to a decoder
row, share above 0.9) and on held-out batches (FVU, L0, dead latents). A random
dictionary of the same size is scored too, as the floor.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_sae.common.device import resolve_device
from llm_sae.config import ConfigError, add_arguments, from_args, to_dict
from llm_sae.sae.config import ARCHS

EVAL_START = 1 << 30
"""Held-out batches are drawn from this batch index on: training never gets there."""


@dataclass
class RecoveryConfig:
    """Train SAEs on synthetic activations with a known dictionary and score the recovery."""

    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    """Architectures to train (registered names), comma-separated."""
    d: int = 64
    """Activation width D."""
    n_true: int = 512
    """Number of true features (F > D: superposition)."""
    n_latents: int = 1024
    """SAE latents."""
    k: int = 8
    """SAE sparsity target (active latents per token; see SAEConfig.k per architecture)."""
    mean_active: float | None = None
    """Mean number of true features active per sample (default: k)."""
    zipf_exponent: float = 1.0
    """Power-law exponent of the true features' firing frequencies (0 = uniform)."""
    magnitude_sigma: float = 0.5
    """Sigma of the lognormal magnitudes (mean 1)."""
    n_groups: int = 0
    """Co-firing groups of true features (0 = independent)."""
    correlation: float = 0.0
    """Within-group firing correlation in [0, 1)."""
    noise_std: float = 0.0
    """Isotropic Gaussian noise per coordinate."""
    offset_norm: float = 0.0
    """Norm of a constant offset added to every sample."""
    tokens: int = 2_000_000
    """Training samples per architecture."""
    batch_size: int = 1024
    """Samples per optimiser step (small batches give more steps per token, which these
    small SAEs need more than big batches)."""
    lr: float | None = None
    """Adam learning rate (default: the trainer's, 5e-4/sqrt(n_latents/2^14), at most 2e-3)."""
    l1_coef: float | None = None
    """relu_l1's and lista's L1 coefficient (default: the SAE default)."""
    lista_steps: int = 3
    """lista: unrolled ISTA steps T."""
    dead_tokens: int | None = None
    """A latent is dead after this many samples without firing (AuxK / resampling;
    default: the trainer's, so the benchmark measures what users get)."""
    eval_tokens: int = 65_536
    """Held-out samples for FVU, L0 and dead fraction."""
    threshold: float = 0.9
    """A true feature counts as recovered when its best |cos| exceeds this."""
    seed: int = 0
    """Seed of the synthetic data and of every SAE."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, ..."""
    out: str | None = None
    """Directory for recovery.json and recovery.txt (default: print only)."""
    progress: bool = True
    """Show progress bars."""


def make_data(cfg: RecoveryConfig) -> Any:
    from llm_sae.sources.synthetic import SyntheticActivations, SyntheticConfig

    return SyntheticActivations(SyntheticConfig(
        d_in=cfg.d, n_features=cfg.n_true, mean_active=cfg.mean_active or cfg.k,
        zipf_exponent=cfg.zipf_exponent, magnitude_sigma=cfg.magnitude_sigma, n_groups=cfg.n_groups,
        correlation=cfg.correlation, noise_std=cfg.noise_std, offset_norm=cfg.offset_norm, seed=cfg.seed,
    ))


@torch.no_grad()
def score_sae(sae: Any, data: Any, cfg: RecoveryConfig, device: torch.device) -> dict[str, Any]:
    """Recovery of the true dictionary by ``sae.W_dec`` plus held-out FVU / L0 / dead fraction."""
    from llm_sae.evaluate.stats import ReconstructionStats
    from llm_sae.sources.synthetic import recovery_metrics

    rec = recovery_metrics(data.features_FD, sae.W_dec, threshold=cfg.threshold)
    st = ReconstructionStats(int(sae.W_dec.shape[0]), None, token_ids=False)
    bs = min(cfg.batch_size, cfg.eval_tokens)
    for i in range(max(1, cfg.eval_tokens // bs)):
        st.add(sae, data.batch(EVAL_START + i, bs).to(device))
    s = st.summary(dense_threshold=0.1)
    return {
        "mean_max_cos": rec.mean_max_cos,
        "frac_recovered": rec.frac_recovered,
        "fvu": s["reconstruction"]["fvu"],
        "l0": s["sparsity"]["l0"]["mean"],
        "dead_frac": s["sparsity"]["dead_frac"],
    }


class DictionarySAE(torch.nn.Module):
    """A fixed dictionary with a TopK encoder (x·Dᵀ): the random floor, or a planted ideal."""

    def __init__(self, W_dec_ND: torch.Tensor, k: int) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(W_dec_ND / W_dec_ND.norm(dim=1, keepdim=True), requires_grad=False)
        self.k = k

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x_BD @ self.W_dec.T)
        vals, idx = pre.topk(min(self.k, pre.shape[1]), dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def decode(self, z_BN: torch.Tensor) -> torch.Tensor:
        return z_BN @ self.W_dec


def train_one(
    arch: str, data: Any, cfg: RecoveryConfig, device: torch.device, **overrides: Any
) -> tuple[Any, float]:
    """Train ``arch`` on the synthetic stream through the Trainer; returns (SAE for raw x, seconds).

    ``overrides`` set further TrainConfig fields (e.g. ``lista_steps=5``, ``l1_coef=2.0``).
    """
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import build_sae
    from llm_sae.train.trainer import Trainer

    extra: dict[str, Any] = {"l1_coef": cfg.l1_coef} if cfg.l1_coef is not None else {}
    extra.update({"lista_steps": cfg.lista_steps, **overrides})
    tcfg = TrainConfig(
        store="<synthetic>", out="<memory>", arch=arch, n_latents=cfg.n_latents, k=cfg.k, tokens=cfg.tokens,
        batch_size=cfg.batch_size, lr=cfg.lr, dead_tokens=cfg.dead_tokens, seed=cfg.seed,
        log_every=max(1, cfg.tokens // cfg.batch_size // 20), checkpoint_every=0, **extra,
    )
    steps = cfg.tokens // cfg.batch_size
    if steps <= 0:
        raise ConfigError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    sae = build_sae(tcfg, cfg.d).to(device)
    trainer = Trainer(sae, tcfg, total_steps=steps)
    # Initialisation sample from a stream the training batches never reach.
    trainer.init_from_sample(data.batch(EVAL_START - 1, min(16384, 4 * cfg.batch_size)).to(device))
    t0 = time.perf_counter()
    trainer.fit((x.to(device) for x in data.batches(cfg.batch_size)), progress=cfg.progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = copy.deepcopy(trainer.sae)
    out.fold_input_scale(trainer.input_scale or 1.0)
    return out.eval(), seconds


def recovery(cfg: RecoveryConfig) -> dict[str, Any]:
    """Train every architecture in ``cfg.archs`` and score it; returns the report dict."""
    from llm_sae.sae.registry import REGISTRY

    unknown = [a for a in cfg.archs if a not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {unknown}; choose from {sorted(REGISTRY)}")
    if not cfg.archs:
        raise ConfigError("--archs is empty; name at least one architecture")
    device = resolve_device(cfg.device)
    data = make_data(cfg)
    report: dict[str, Any] = {"config": to_dict(cfg), "device": str(device), "results": {}}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    floor = DictionarySAE(torch.randn(cfg.n_latents, cfg.d, generator=g), cfg.k).to(device)
    report["results"]["random dictionary"] = {"arch": "-", **score_sae(floor, data, cfg, device)}
    for arch in cfg.archs:
        if cfg.progress:
            print(f"bench recovery: training {arch}", file=sys.stderr)
        sae, seconds = train_one(arch, data, cfg, device)
        res = score_sae(sae, data, cfg, device)
        res.update(arch=arch, train_seconds=seconds, tokens_per_s=cfg.tokens / max(seconds, 1e-9))
        report["results"][arch] = res
    return report


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    head = (f"recovery: d={c['d']} true features={c['n_true']} latents={c['n_latents']} k={c['k']} "
            f"tokens={c['tokens']:,} zipf={c['zipf_exponent']} noise={c['noise_std']} "
            f"corr={c['correlation']} seed={c['seed']} device={report['device']}")
    cols = ("sae", "mean max cos", f"recovered>{c['threshold']}", "FVU", "L0", "dead", "train s")
    rows = [cols]
    for name, r in report["results"].items():
        rows.append((
            name, f"{r['mean_max_cos']:.3f}", f"{r['frac_recovered']:.3f}", _f(r["fvu"], ".4f"),
            _f(r["l0"], ".1f"), f"{r['dead_frac']:.3f}", _f(r.get("train_seconds"), ".1f"),
        ))
    w = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head, ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w[i]) if i == 0 else v.rjust(w[i]) for i, v in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines) + "\n"


def _f(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


# =================================================================================== CLI

BENCHES = {"recovery": (RecoveryConfig, "Train SAEs on synthetic data with a known dictionary; score recovery.")}


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (cls, help_text) in BENCHES.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text), cls)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(RecoveryConfig, args)
    report = recovery(cfg)
    table = format_table(report)
    print(table, end="")
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recovery.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "recovery.txt").write_text(table)
        print(f"wrote {out / 'recovery.json'}")
    return 0
