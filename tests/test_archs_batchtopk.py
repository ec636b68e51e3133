"""BatchTopK: the saved inference threshold reproduces the trained L0 on held-out rows."""

from __future__ import annotations

import pytest
import torch
from archs_util import K, fit, l0

from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_inference_threshold_gives_k_within_5_percent_on_held_out_rows(arch):
    _, _, _, z_BN = fit(arch, steps=200)
    assert abs(l0(z_BN) - K) <= 0.05 * K, l0(z_BN)


def test_threshold_follows_the_last_batches_not_the_first():
    """A short window: after the cut-off moves, the estimate is the new one within ~20 steps."""
    sae = REGISTRY["batchtopk"](SAEConfig(d_in=8, n_latents=32, k=2))
    sae.train()
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0):
        for _ in range(40):
            sae.train_activate(scale * torch.randn(128, 32, generator=g))
        cut = float(sae.train_activate(scale * torch.randn(4096, 32, generator=g)).flatten().topk(2 * 4096).values.min())
        assert abs(float(sae.threshold) - cut) < 0.05 * cut
