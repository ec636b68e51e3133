#!/usr/bin/env python
"""Dictionary atoms you can see: SAEs trained on natural-image patches learn edge filters.

Olshausen & Field (1996) showed that a sparse, overcomplete code for small patches of
natural images learns localised, oriented, band-pass atoms: the edge detectors of the
visual cortex's simple cells. This example repeats the experiment with this project's
SAEs (L1, TopK and KL-sigmoid, each trained by the same ``Trainer`` that trains
language-model SAEs) on patches of the photographs that ship inside scikit-image
(``skimage.data``: nothing is downloaded), and writes each decoder's atoms as a PNG grid.

Patches have their mean removed (the DC component) and are ZCA-whitened, which flattens
the 1/f² power spectrum of natural images as Olshausen & Field's whitening filter did;
atoms are drawn in that whitened space, mid-grey = 0, most used first.

    pip install -e ".[images]"                  # scikit-image (bundled sample photos)
    python scripts/dictionary_atoms.py          # 12×12 patches, 256 atoms each, ~1–2 min
    python scripts/dictionary_atoms.py --small  # 8×8 patches, 64 atoms, a few seconds (CI)

Writes OUT/atoms_relu_l1.png, OUT/atoms_topk.png, OUT/atoms_kl_sigmoid.png and
OUT/atoms.png (the three side by side, in that order).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llm_sae.common.png import write_png
from llm_sae.sae.base import SAE

IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "grass", "gravel", "brick")
"""Photographs bundled in skimage.data (natural scenes and textures, no line art)."""

ARCHS = ("relu_l1", "topk", "kl_sigmoid")
DEFAULT_LR = {"relu_l1": 4e-3, "topk": 4e-3, "kl_sigmoid": 2e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=Path("atoms"), help="output directory (default ./atoms)"
    )
    p.add_argument("--patch", type=int, default=12, help="patch side in pixels (default 12)")
    p.add_argument("--n-latents", type=int, default=256, help="atoms per SAE (default 256)")
    p.add_argument("--k", type=int, default=12, help="topk's k (default 12)")
    p.add_argument(
        "--l1-coef", type=float, default=3.0, help="relu_l1's L1 coefficient (default 3.0)"
    )
    p.add_argument(
        "--kl-coef", type=float, default=20.0, help="kl_sigmoid's KL weight β (default 20)"
    )
    p.add_argument(
        "--rho",
        type=float,
        default=0.01,
        help="kl_sigmoid's target mean activation ρ (default 0.01)",
    )
    p.add_argument(
        "--patches", type=int, default=100_000, help="distinct patches sampled (default 100k)"
    )
    p.add_argument(
        "--tokens", type=int, default=600_000, help="training samples per SAE (default 600k)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="patches per step (default 256)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default 4e-3; 2e-2 for kl_sigmoid, whose saturated "
        "sigmoids pass small gradients)",
    )
    p.add_argument(
        "--archs", default=",".join(ARCHS), help=f"SAEs to train (default {','.join(ARCHS)})"
    )
    p.add_argument("--zoom", type=int, default=3, help="screen pixels per patch pixel (default 3)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the patches and the SAEs (default 0)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--small",
        action="store_true",
        help="CI size: 8×8 patches, 64 atoms, 20k patches, 40k samples per SAE",
    )
    a = p.parse_args(argv)
    if a.small:
        a.patch, a.n_latents, a.k, a.patches, a.tokens, a.zoom = 8, 64, 6, 20_000, 40_000, 2
    return a


# ------------------------------------------------------------------------------ the data
def load_images(names: tuple[str, ...] = IMAGES) -> list[np.ndarray]:
    """Grayscale float images in [0, 1] from scikit-image's bundled samples."""
    try:
        import skimage.data
        from skimage.color import rgb2gray
    except ImportError:
        sys.exit(
            "this example needs scikit-image: pip install -e '.[images]' (or pip install scikit-image)"
        )
    images = []
    for name in names:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.ndim == 3:
            img = rgb2gray(img[..., :3] / 255.0)
        elif img.max() > 1:
            img = img / 255.0
        images.append(img)
    return images


def sample_patches(images: list[np.ndarray], n: int, side: int, seed: int) -> np.ndarray:
    """``n`` random ``side``×``side`` patches, flattened: [n, side²], uniform over images."""
    rng = np.random.default_rng(seed)
    which = rng.integers(len(images), size=n)
    out = np.empty((n, side * side))
    for i, img in enumerate(images):
        rows = np.nonzero(which == i)[0]
        ys = rng.integers(img.shape[0] - side + 1, size=len(rows))
        xs = rng.integers(img.shape[1] - side + 1, size=len(rows))
        for r, y, x in zip(rows, ys, xs, strict=True):
            out[r] = img[y : y + side, x : x + side].ravel()
    return out


def whiten(patches_BD: np.ndarray, eps: float = 0.1) -> np.ndarray:
    """Remove each patch's mean, then ZCA-whiten: W = U·(Λ + ε·mean λ)^(-½)·Uᵀ.

    ε keeps the highest, noisiest frequencies from being amplified without bound (the
    role of the low-pass factor in Olshausen & Field's whitening filter).
    """
    x_BD = patches_BD - patches_BD.mean(1, keepdims=True)
    cov_DD = x_BD.T @ x_BD / len(x_BD)
    lam_D, U_DD = np.linalg.eigh(cov_DD)
    lam_D = np.clip(lam_D, 0, None)
    W_DD = U_DD @ np.diag(1 / np.sqrt(lam_D + eps * lam_D.mean())) @ U_DD.T
    return x_BD @ W_DD


# ------------------------------------------------------------------------------ training
def train_sae(arch: str, x_BD: torch.Tensor, a: argparse.Namespace) -> tuple[SAE, torch.Tensor]:
    """Train ``arch`` through the Trainer on random batches; returns (SAE, firing rate per atom)."""
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import build_sae
    from llm_sae.train.trainer import Trainer

    steps = max(1, a.tokens // a.batch_size)
    cfg = TrainConfig(
        store="<patches>",
        out="<memory>",
        arch=arch,
        n_latents=a.n_latents,
        k=a.k,
        l1_coef=a.l1_coef,
        kl_coef=a.kl_coef,
        rho=a.rho,
        tokens=steps * a.batch_size,
        batch_size=a.batch_size,
        lr=a.lr or DEFAULT_LR.get(arch, 4e-3),
        seed=a.seed,
        log_every=10**9,
        checkpoint_every=0,
    )
    torch.manual_seed(a.seed)
    sae = build_sae(cfg, x_BD.shape[1])
    trainer = Trainer(sae, cfg, total_steps=steps)
    trainer.init_from_sample(x_BD[:16384])
    g = torch.Generator().manual_seed(a.seed + 1)
    trainer.fit(
        (x_BD[torch.randint(len(x_BD), (a.batch_size,), generator=g)] for _ in range(steps)),
        progress=False,
    )
    sae.eval()
    with torch.no_grad():
        x_s_BD = x_BD[:8192] * trainer.input_scale
        z_BN = sae.encode(x_s_BD)
        fired_N = (z_BN > 0.5 if arch == "kl_sigmoid" else z_BN > 0).float().mean(0)
        fvu = float(
            (sae.decode(z_BN) - x_s_BD).pow(2).sum() / (x_s_BD - x_s_BD.mean(0)).pow(2).sum()
        )
    print(
        f"  {arch}: FVU {fvu:.3f}, L0 {float(fired_N.sum()):.1f}, "
        f"dead {float((fired_N == 0).float().mean()):.2f}",
        file=sys.stderr,
    )
    return sae, fired_N


# ------------------------------------------------------------------------------- picture
def atom_grid(W_dec_ND: torch.Tensor, side: int, order_N: torch.Tensor, zoom: int) -> np.ndarray:
    """uint8 grayscale grid of the atoms (rows of W_dec) in ``order_N``, 1-pixel white gutters.

    Each atom is scaled on its own to fill [0, 255] symmetrically around mid-grey = 0.
    """
    atoms_NPP = W_dec_ND[order_N].detach().float().reshape(-1, side, side).numpy()
    n = len(atoms_NPP)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = side * zoom + 1
    px = np.full((rows * cell + 1, cols * cell + 1), 255, np.uint8)
    for i, atom in enumerate(atoms_NPP):
        a = atom / max(float(np.abs(atom).max()), 1e-12)
        tile = np.round(127.5 + 127.5 * a).clip(0, 255).astype(np.uint8)
        tile = tile.repeat(zoom, 0).repeat(zoom, 1)
        r, c = divmod(i, cols)
        px[1 + r * cell : 1 + r * cell + side * zoom, 1 + c * cell : 1 + c * cell + side * zoom] = (
            tile
        )
    return px


def side_by_side(grids: list[np.ndarray], gap: int = 12) -> np.ndarray:
    """The grids in one row on white, separated by ``gap`` pixels."""
    h = max(g.shape[0] for g in grids)
    w = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    out = np.full((h, w), 255, np.uint8)
    x = 0
    for g in grids:
        out[: g.shape[0], x : x + g.shape[1]] = g
        x += g.shape[1] + gap
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    patches = whiten(sample_patches(load_images(), a.patches, a.patch, a.seed))
    x_BD = torch.from_numpy(patches).float()
    a.out.mkdir(parents=True, exist_ok=True)
    grids, summary = [], {}
    for arch in [s for s in a.archs.split(",") if s]:
        print(
            f"dictionary_atoms: training {arch} on {len(x_BD):,} {a.patch}×{a.patch} patches",
            file=sys.stderr,
        )
        sae, fired_N = train_sae(arch, x_BD, a)
        grid = atom_grid(sae.W_dec, a.patch, fired_N.argsort(descending=True), a.zoom)
        path = write_png(a.out / f"atoms_{arch}.png", grid)
        grids.append(grid)
        summary[arch] = {
            "png": str(path),
            "l0": float(fired_N.sum()),
            "dead_frac": float((fired_N == 0).float().mean()),
        }
    path = write_png(a.out / "atoms.png", side_by_side(grids))
    print(
        json.dumps(
            {"atoms": str(path), "saes": summary, "seconds": round(time.perf_counter() - t0, 1)}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
