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


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_encoder_starts_at_the_least_squares_scale_of_the_first_selection(arch):
    """The trainer's initialisation scales the encoder so the first selection's decode best
    reconstructs the sample: any other scale reconstructs it worse; a transcoder keeps its
    start."""
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.trainer import Trainer

    torch.manual_seed(0)
    x_BD = torch.randn(2048, 16) * torch.rand(2048, 1) * 3  # rows of varied norm
    cfg = TrainConfig(store="<mem>", out="<mem>", arch=arch, n_latents=128, k=4, tokens=4096, batch_size=256)
    sae = REGISTRY[arch](SAEConfig(d_in=16, n_latents=128, k=4))
    W0 = sae.W_enc.detach().clone()
    trainer = Trainer(sae, cfg, total_steps=16)
    trainer.init_from_sample(x_BD)
    ratio = sae.W_enc.detach() / W0
    assert torch.allclose(ratio, ratio.flatten()[0]) and abs(float(ratio.flatten()[0]) - 1) > 0.05
    xs_BD = x_BD * trainer.input_scale
    sae.train()
    sae.set_progress(0.0)

    def err(s: float) -> float:
        with torch.no_grad():
            sae._row_scale_B = sae.row_scale(sae.centered(xs_BD))  # the first step's selection
            z = sae.activate(sae.pre_acts(xs_BD))
            sae._row_scale_B = None
            return float(((xs_BD - sae.b_dec) - s * (z @ sae.W_dec)).pow(2).sum())

    assert err(1.0) < min(err(0.8), err(1.25))
    tc = REGISTRY[arch](SAEConfig(d_in=16, d_out=8, n_latents=128, k=4))
    W1 = tc.W_enc.detach().clone()
    tc.init_from_sample(xs_BD)
    assert torch.equal(tc.W_enc, W1)


def test_relative_power_fades_linearly_around_relative_selection():
    from llm_sae.sae.ops import relative_power

    assert [relative_power(p, 0.9, 0.2) for p in (0.0, 0.8, 0.85, 0.9, 0.95, 1.0)] == pytest.approx(
        [1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [relative_power(p, 0.9, 0.0) for p in (0.0, 0.899, 0.9)] == [1.0, 1.0, 0.0]  # a switch
    assert relative_power(0.0, 0.0, 0.2) == 0.0  # 0: plain throughout


def test_row_scale_is_the_relative_norm_to_the_fading_power():
    sae = REGISTRY["batchtopk"](SAEConfig(arch="batchtopk", d_in=8, n_latents=32, k=2).resolved()).train()
    x_BD = torch.randn(16, 8) * torch.linspace(0.5, 3, 16)[:, None]
    rel_B = x_BD.norm(dim=1) / x_BD.norm(dim=1).mean()
    sae.set_progress(0.5)
    torch.testing.assert_close(sae.row_scale(x_BD), rel_B)
    sae.set_progress(0.95)  # 0.25 of the way from the fade's end
    torch.testing.assert_close(sae.row_scale(x_BD), rel_B.pow(0.25))
    sae.set_progress(1.0)
    assert sae.row_scale(x_BD) is None
    sae.eval().set_progress(0.5)
    assert sae.row_scale(x_BD) is None  # inference is plain


def test_bad_relative_settings_fail_with_config_error():
    from llm_sae.config import ConfigError

    for kw in ({"relative_selection": 1.5}, {"relative_fade": -0.1}):
        with pytest.raises(ConfigError, match="relative_selection must be in"):
            SAEConfig(arch="batchtopk", d_in=8, n_latents=32, k=2, **kw).resolved()
