"""SynthSAEBench, scaled for a CPU: our SAEs against SAELens's, trained on one stream.

SynthSAEBench (Chanin & Garriga-Alonso 2026, arXiv 2602.14687; shipped in SAELens as
``sae_lens.synthetic``) plants known features with realistic structure (Zipfian firing,
hierarchies with mutually exclusive children, low-rank correlations, varying magnitudes)
and scores an SAE against them. This script builds the model with SAELens's own
``SyntheticModelConfig`` (the published 16k configuration, scaled down by default: 4,096
features, d = 192, hierarchy 32 × 4 × 3), pre-generates one stream of samples (SAELens's
generator is slow on a CPU, so it is cached on disk as sparse feature activations), trains
SAELens's and llm_sae's architectures on exactly the same batches, and scores every SAE with
SAELens's own ``mean_correlation_coefficient``, ``feature_uniqueness`` and
``ClassificationMetricsCalculator`` on held-out samples.

Every SAE is scored as it is saved for inference: SAELens's through ``save_inference_model``
and ``SAE.load_from_disk`` (a BatchTopK or Matryoshka SAE becomes a JumpReLU with one global
threshold), ours through ``SAE.save`` / ``load_sae``. Run in the peer venv with this
checkout on the path (llm_sae's trainer needs nothing the peers conflict with)::

    bash scripts/setup_peers.sh
    PYTHONPATH=. .peers/bin/python scripts/bench_synth.py --samples 2000000 --json-out runs/synth.json

Full size (a GPU): ``--features 16384 --d 768 --roots 128 --width 4096 --samples 200000000``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ARCHS = (
    "saelens:batchtopk", "saelens:matryoshka", "saelens:jumprelu",
    "ours:batchtopk", "ours:matryoshka", "ours:jumprelu",
)


# ----------------------------------------------------------------------------- the data


def model_config(a: argparse.Namespace) -> Any:
    """SynthSAEBench-16k's configuration (SAELens docs, synth_sae_bench.md), at a's size."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=a.features, hidden_dim=a.d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=a.roots, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
            compensate_probabilities=True, scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        seed=a.seed,
    )


class Stream:
    """Feature activations cached as CSR (row offsets, feature ids, values); x on demand.

    ``x = acts @ feature_vectors + bias``, SAELens's FeatureDictionary, computed a batch at a
    time from the sparse rows, so the cache is ~16 nonzeros a sample instead of d floats.
    """

    def __init__(self, path: Path, feats_FD: torch.Tensor, bias_D: torch.Tensor) -> None:
        from safetensors.torch import load_file

        t = load_file(str(path))
        self.indptr, self.idx, self.val = t["indptr"], t["idx"].long(), t["val"]
        self.feats_FD, self.bias_D = feats_FD, bias_D
        self.n = self.indptr.numel() - 1

    def x(self, start: int, stop: int) -> torch.Tensor:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        offsets = self.indptr[start:stop] - lo
        return torch.nn.functional.embedding_bag(
            self.idx[lo:hi], self.feats_FD, offsets, mode="sum", per_sample_weights=self.val[lo:hi]
        ) + self.bias_D

    def acts(self, start: int, stop: int) -> torch.Tensor:
        """Dense ground-truth feature activations [B, F] for scoring."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        rows = torch.repeat_interleave(torch.arange(stop - start), (self.indptr[start + 1 : stop + 1] - self.indptr[start:stop]))
        out = torch.zeros(stop - start, self.feats_FD.shape[0])
        out[rows, self.idx[lo:hi]] = self.val[lo:hi]
        return out

    def batches(self, batch_size: int, n_samples: int) -> Iterator[torch.Tensor]:
        for s in range(0, n_samples - batch_size + 1, batch_size):
            yield self.x(s, s + batch_size)


def build_cache(a: argparse.Namespace) -> tuple[Any, Stream, Stream]:
    """The synthetic model and its train / eval streams, generated once and cached."""
    from sae_lens.synthetic import SyntheticModel
    from safetensors.torch import save_file

    cfg = model_config(a)
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    root = Path(a.cache) / f"synth-{a.features}x{a.d}-{key}"
    model_dir = root / "model"
    if (model_dir / "synthetic_model_config.json").exists():
        model = SyntheticModel.load_from_disk(model_dir)
    else:
        print(f"building the synthetic model (orthogonalisation, once) into {model_dir}", file=sys.stderr)
        model = SyntheticModel(cfg)
        model.save(model_dir)

    def generate(name: str, n: int, seed: int) -> Path:
        path = root / f"{name}-{n}-seed{seed}.safetensors"
        if path.exists():
            return path
        torch.manual_seed(seed)
        counts, idx, val = [], [], []
        t0 = time.perf_counter()
        for s in range(0, n, 4096):
            acts = model.activation_generator.sample(min(4096, n - s))
            acts = acts.to_dense() if acts.is_sparse else acts
            nz = acts.nonzero()
            counts.append((acts != 0).sum(1))
            idx.append(nz[:, 1].to(torch.int16 if a.features < 2**15 else torch.int32))
            val.append(acts[nz[:, 0], nz[:, 1]].float())
            if (s // 4096) % 50 == 0:
                print(f"  {name}: {s + 4096:,}/{n:,} samples, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        indptr = torch.zeros(n + 1, dtype=torch.long)
        indptr[1:] = torch.cat(counts).cumsum(0)
        tmp = path.with_suffix(".tmp")
        save_file({"indptr": indptr, "idx": torch.cat(idx), "val": torch.cat(val)}, str(tmp))
        tmp.replace(path)
        return path

    root.mkdir(parents=True, exist_ok=True)
    fd = model.feature_dict
    feats_FD, bias_D = fd.feature_vectors.detach().float(), fd.bias.detach().float()
    train = Stream(generate("train", a.samples, a.seed + 1), feats_FD, bias_D)
    held = Stream(generate("eval", a.eval_samples, a.seed + 2), feats_FD, bias_D)
    return model, train, held


# ------------------------------------------------------------------------------ training


def matryoshka_widths(width: int) -> list[int]:
    """SynthSAEBench's levels: 1/32, 1/8, 1/2 of the width, then all of it."""
    return [width // 32, width // 8, width // 2, width]


def train_saelens(name: str, a: argparse.Namespace, train: Stream) -> tuple[Any, float]:
    """SAELens's own trainer and SAE (its defaults but for the shared recipe); the
    inference model it saves, reloaded."""
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    common = {"d_in": a.d, "d_sae": a.width}
    torch.manual_seed(a.sae_seed)
    if name == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=a.k, **common))
    elif name == "matryoshka":
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            k=a.k, matryoshka_widths=matryoshka_widths(a.width), use_matryoshka_aux_loss=True, **common,
        ))
    else:  # Gemma Scope 2's quadratic loss towards the target L0 (their current recipe)
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(a.k), pre_act_loss_coefficient=3e-6, **common,
        ))
    from sae_lens.training.sae_trainer import SAETrainer

    n = a.samples // a.batch * a.batch
    cfg = SAETrainerConfig(
        total_training_samples=n, train_batch_size_samples=a.batch, device="cpu", lr=a.saelens_lr,
        lr_end=a.saelens_lr, lr_scheduler_name="constant", dead_feature_window=1000,
        feature_sampling_window=2000, logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=train.batches(a.batch, n))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        loaded = SAE.load_from_disk(tmp)
    return loaded.eval(), seconds


def train_ours(name: str, a: argparse.Namespace, train: Stream, out: Path | None) -> tuple[Any, float]:
    """llm_sae's Trainer at its defaults (learning rate included) on the same batches; the
    SAE as ``SAE.save`` writes it, reloaded with ``load_sae``."""
    from llm_sae.sae import load_sae
    from llm_sae.train import TrainConfig, Trainer, build_sae

    n = a.samples // a.batch * a.batch
    extra: dict[str, Any] = {}
    if name == "matryoshka":
        extra["matryoshka_widths"] = matryoshka_widths(a.width)
    tcfg = TrainConfig(
        store="<synthetic>", out="<memory>", arch=name, n_latents=a.width, k=a.k, tokens=n,
        batch_size=a.batch, lr=a.ours_lr, seed=a.sae_seed, checkpoint_every=0, log_every=max(1, n // a.batch // 10),
        **extra,
    )
    torch.manual_seed(a.sae_seed)
    sae = build_sae(tcfg, a.d)
    trainer = Trainer(sae, tcfg, total_steps=n // a.batch)
    trainer.init_from_sample(train.x(0, min(16384, n)))
    t0 = time.perf_counter()
    trainer.fit(train.batches(a.batch, n), progress=False)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = trainer.export(Path(out) / f"ours-{name}" if out else tmp)
        loaded = load_sae(path)
    return loaded.eval(), seconds


# ------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(encode: Any, decode: Any, W_dec_ND: torch.Tensor, held: Stream, feats_FD: torch.Tensor) -> dict[str, float]:
    """SAELens's metrics (synthetic/evals.py) on the held-out stream."""
    from sae_lens.synthetic import (
        ClassificationMetricsCalculator,
        feature_uniqueness,
        mean_correlation_coefficient,
    )

    W = W_dec_ND.detach().float()
    clf = ClassificationMetricsCalculator(W, feats_FD)
    fired_N = torch.zeros(W.shape[0])
    l0 = sq_err = 0.0
    x_sum = x_sq = 0.0
    rows = 0
    for s in range(0, held.n - 4095, 4096):
        x_BD = held.x(s, s + 4096)
        z_BN = encode(x_BD)
        x_hat_BD = decode(z_BN)
        clf.add_batch(z_BN, held.acts(s, s + 4096))
        on = z_BN != 0
        fired_N += on.sum(0)
        l0 += float(on.sum())
        sq_err += float((x_BD - x_hat_BD).pow(2).sum())
        x_sum = x_sum + x_BD.sum(0)
        x_sq += float(x_BD.pow(2).sum())
        rows += x_BD.shape[0]
    total_var = x_sq - float((x_sum**2).sum()) / rows
    c = clf.compute()
    return {
        "f1": c.f1_score, "precision": c.precision, "recall": c.recall,
        "mcc": mean_correlation_coefficient(W, feats_FD), "uniqueness": feature_uniqueness(W, feats_FD),
        "l0": l0 / rows, "dead": float((fired_N == 0).float().mean()),
        "explained_variance": 1 - sq_err / total_var, "eval_samples": rows,
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    model, train, held = build_cache(a)
    fd = model.feature_dict
    feats_FD = fd.feature_vectors.detach().float()
    true_l0 = float((held.indptr[1:] - held.indptr[:-1]).float().mean())
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(a).items() if k != "json_out"},
        "true_l0": true_l0, "results": {},
    }
    out = Path(a.save_dir) if a.save_dir else None
    for spec in a.archs:
        lib, name = spec.split(":")
        print(f"bench_synth: training {spec} on {a.samples:,} samples", file=sys.stderr)
        if lib == "saelens":
            sae, seconds = train_saelens(name, a, train)
            res = score(sae.encode, sae.decode, sae.W_dec, held, feats_FD)
        else:
            sae, seconds = train_ours(name, a, train, out)
            res = score(sae.encode, sae.decode, sae.W_dec, held, feats_FD)
        res["train_seconds"] = seconds
        report["results"][spec] = res
        print(format_row(spec, res), file=sys.stderr)
        if a.json_out:
            Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


COLS = ("f1", "mcc", "precision", "recall", "uniqueness", "l0", "dead", "explained_variance", "train_seconds")


def format_row(name: str, r: dict[str, Any]) -> str:
    cells = [f"{r[c]:.3f}" if c not in ("l0", "train_seconds") else f"{r[c]:.1f}" for c in COLS]
    return "| " + " | ".join([name, *cells]) + " |"


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    head = (f"SynthSAEBench scaled: {c['features']:,} features, d={c['d']}, hierarchy {c['roots']}x4x3, "
            f"width {c['width']}, k={c['k']}, {c['samples']:,} samples, batch {c['batch']}, "
            f"true L0 {report['true_l0']:.1f}\n\n")
    lines = ["| sae | " + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + 1)]
    lines += [format_row(n, r) for n, r in report["results"].items()]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=4096, help="ground-truth features (paper: 16384)")
    p.add_argument("--d", type=int, default=192, help="hidden width (paper: 768)")
    p.add_argument("--roots", type=int, default=32, help="hierarchy root nodes (paper: 128)")
    p.add_argument("--width", type=int, default=1024, help="SAE latents (paper: 4096)")
    p.add_argument("--k", type=int, default=25, help="L0 target of every SAE (paper: 25)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--samples", type=int, default=2_000_000, help="training samples per SAE (paper: 200M)")
    p.add_argument("--eval-samples", type=int, default=65_536)
    p.add_argument("--saelens-lr", type=float, default=3e-4, help="the paper's learning rate")
    p.add_argument("--ours-lr", type=float, default=None, help="default: llm_sae's own default")
    p.add_argument("--archs", type=lambda s: s.split(","), default=list(ARCHS))
    p.add_argument("--seed", type=int, default=42, help="the synthetic model's seed (the paper's 42)")
    p.add_argument(
        "--sae-seed", type=int, default=0,
        help="every SAE's seed; must differ from --seed, or torch.randn draws the SAE's first decoder "
        "exactly as it drew the true features (an SAE initialised at the answer)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="runs/bench_synth_cache", help="where the synthetic stream is cached")
    p.add_argument("--save-dir", default=None, help="also save our SAEs here")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.sae_seed == a.seed:
        p.error("--sae-seed must differ from --seed (see --help)")
    unknown = [s for s in a.archs if s not in ARCHS]
    if unknown:
        p.error(f"unknown --archs {unknown}; choose from {', '.join(ARCHS)}")
    report = run(a)
    print(format_table(report), end="")
    return 0 if all(math.isfinite(r["f1"]) for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
