"""Matryoshka BatchTopK: nested prefixes each reconstruct, per-level AuxK, config, save/load."""

from __future__ import annotations

import pytest
import torch
from archs_util import fit

from llm_sae.config import ConfigError
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.registry import REGISTRY

D, N, K = 16, 64, 4


def make(**kw):
    torch.manual_seed(0)
    return REGISTRY["matryoshka"](SAEConfig(arch="matryoshka", d_in=D, n_latents=N, k=K, **kw))


def test_default_widths_are_synthsaebench_fractions_then_all():
    assert make().widths == [2, 8, 32, 64]
    assert make(matryoshka_widths=[16, 32]).widths == [16, 32, 64]
    assert make(matryoshka_widths=[16, 64]).widths == [16, 64]


@pytest.mark.parametrize("widths", [[32, 16], [0, 8], [8, 100], [8, 8]])
def test_bad_widths_fail_with_config_error(widths):
    with pytest.raises(ConfigError, match="matryoshka_widths"):
        make(matryoshka_widths=widths)


@pytest.mark.parametrize("weight", [None, 1.0, 0.0, 0.3])
def test_loss_is_the_whole_reconstruction_plus_weighted_inner_prefixes(weight):
    sae = make(matryoshka_widths=[8, 32], matryoshka_inner_weight=weight)
    x_BD = torch.randn(32, D)
    out = sae(x_BD)
    with torch.no_grad():
        z_BN = sae.train_activate(sae.pre_acts(x_BD))  # the same batch: the same selection
        err = [(x_BD - z_BN[:, :w] @ sae.W_dec[:w] - sae.b_dec).pow(2).sum(-1).mean() for w in (8, 32, 64)]
    w = 0.5 if weight is None else weight  # the default
    assert torch.allclose(out.loss, err[2] + w * (err[0] + err[1]), rtol=1e-5)
    assert torch.allclose(out.x_hat_BD, z_BN @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_inner_weight_default_is_written_and_negative_refused():
    from llm_sae.sae.config import SAEConfig

    cfg = SAEConfig(arch="matryoshka", d_in=D, n_latents=N, k=K).resolved()
    assert cfg.matryoshka_inner_weight == 0.5  # so cfg.json and checkpoints record it
    assert SAEConfig(arch="topk", d_in=D, n_latents=N, k=K).resolved().matryoshka_inner_weight is None
    with pytest.raises(ConfigError, match="matryoshka_inner_weight"):
        SAEConfig(arch="matryoshka", d_in=D, n_latents=N, k=K, matryoshka_inner_weight=-1.0).resolved()


def test_each_levels_dead_latents_model_that_levels_residual():
    sae = make(matryoshka_widths=[8, 32])
    x_BD = torch.randn(64, D)
    none_N = torch.zeros(N, dtype=torch.bool)
    assert float(sae(x_BD, dead_mask_N=none_N).metrics["aux"]) == 0
    dead_N = none_N.clone()
    dead_N[8:16] = True  # dead latents in the second level only
    out = sae(x_BD, dead_mask_N=dead_N)
    assert float(out.metrics["aux"]) > 0
    # The second level's dead latents model the residual of the 32-latent prefix: the AuxK
    # of the base class over them and that residual, not the whole decode's.
    base = type(sae).__mro__[2].auxk_loss  # SAE.auxk_loss
    with torch.no_grad():
        z_BN = sae.train_activate(sae.pre_acts(x_BD))
        prefix_err = x_BD - z_BN[:, :32] @ sae.W_dec[:32] - sae.b_dec
        whole_err = x_BD - z_BN @ sae.W_dec - sae.b_dec
        aux = out.metrics["aux"] * x_BD.var(0, correction=0).sum()
        assert torch.allclose(aux, base(sae, x_BD, prefix_err, dead_N), rtol=1e-4)
        assert not torch.allclose(aux, base(sae, x_BD, whole_err, dead_N), rtol=1e-2)


def test_first_prefix_reconstructs_on_its_own_after_training(tmp_path):
    sae, trainer, x_BD, z_BN = fit("matryoshka", steps=200, matryoshka_widths=[8, 32])
    with torch.no_grad():
        err = lambda w: float((x_BD - z_BN[:, :w] @ sae.W_dec[:w] - sae.b_dec).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum())  # noqa: E731
        fvu_8, fvu_all = err(8), err(N)
    assert fvu_all < fvu_8 < 0.9  # the 8-latent prefix alone explains part of the variance
    loaded = load_sae(sae.save(tmp_path / "m"))
    assert loaded.cfg.arch == "matryoshka" and loaded.widths == [8, 32, 64]
    assert torch.equal(loaded.encode(x_BD), sae.encode(x_BD))
