"""ReLU + L1 with --target-l0: the coefficient is tuned until the L0 is the target."""

from __future__ import annotations

import pytest
import torch
from archs_util import K, fit, l0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("start", [0.5, 20.0])
def test_target_l0_tunes_the_coefficient_from_either_side(start):
    sae, trainer, _, z_BN = fit("relu_l1", steps=400, target_l0=K, l1_coef=start)
    assert abs(l0(z_BN) - K) <= 0.15 * K, l0(z_BN)
    assert "log_l1_coef" in sae.state_dict()  # saved, so a resumed run keeps its coefficient


def test_without_a_target_the_coefficient_is_fixed():
    sae, _, _, _ = fit("relu_l1", steps=20)
    assert "log_l1_coef" not in sae.state_dict()
    assert torch.isfinite(sae.W_dec).all()
