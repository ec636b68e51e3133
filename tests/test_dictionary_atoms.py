"""scripts/dictionary_atoms.py: the atom grid is laid out right, and the example runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_sae.common.png import png_size

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dictionary_atoms.py"


def load_script():
    spec = importlib.util.spec_from_file_location("dictionary_atoms", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_atom_grid_places_each_atom_scaled_around_mid_grey():
    da = load_script()
    side, zoom = 3, 2
    W_ND = torch.zeros(5, side * side)
    W_ND[0, 0] = 2.0  # atom 0: one bright pixel top-left
    W_ND[1, -1] = -0.5  # atom 1: one dark pixel bottom-right
    W_ND[2:] = torch.randn(3, side * side)
    px = da.atom_grid(W_ND, side, torch.tensor([1, 0, 2, 3, 4]), zoom)
    cell = side * zoom + 1
    assert px.dtype == np.uint8 and px.shape == (2 * cell + 1, 3 * cell + 1)  # 3 columns, 2 rows
    first = px[1 : 1 + side * zoom, 1 : 1 + side * zoom]  # atom 1 comes first in the order
    assert (first[-zoom:, -zoom:] == 0).all() and (first[:-zoom, :] == 128).all()
    second = px[1 : 1 + side * zoom, 1 + cell : 1 + cell + side * zoom]
    assert (second[:zoom, :zoom] == 255).all() and (second[zoom:, :] == 128).all()
    assert (px[0] == 255).all() and (px[:, cell] == 255).all()  # white gutters
    assert (px[1 + cell :, 1 + 2 * cell :] == 255).all()  # the empty sixth cell
    assert da.side_by_side([px, px[:5]], gap=4).shape == (px.shape[0], 2 * px.shape[1] + 4)


def test_whitening_decorrelates_patches():
    da = load_script()
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(4000, 16)), axis=1)  # strongly correlated pixels
    w = da.whiten(smooth, eps=1e-6)
    cov = w.T @ w / len(w)
    # Identity on zero-mean patches: the projection that removes each patch's mean.
    expected = np.eye(16) - np.full((16, 16), 1 / 16)
    assert np.abs(cov - expected).max() < 0.02 and np.allclose(w.mean(1), 0, atol=1e-6)


def test_example_runs_small_and_writes_the_pngs(tmp_path):
    pytest.importorskip("skimage", reason="the images extra (scikit-image) is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--tokens", "20000", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    cell = 8 * 2 + 1  # --small: 8×8 patches at zoom 2, 64 atoms in an 8×8 grid
    panel = 8 * cell + 1
    for arch in ("relu_l1", "topk", "kl_sigmoid"):
        data = (tmp_path / f"atoms_{arch}.png").read_bytes()
        assert png_size(data) == (panel, panel)
        assert summary["saes"][arch]["l0"] > 0
    assert png_size((tmp_path / "atoms.png").read_bytes()) == (3 * panel + 2 * 12, panel)
