"""The synthetic generator has the statistics it promises; recovery metrics score dictionaries."""

from __future__ import annotations

import pytest
import torch

from llm_sae.sources.synthetic import (
    SyntheticActivations,
    SyntheticConfig,
    SyntheticError,
    recovery_metrics,
)


def _data(**kw) -> SyntheticActivations:
    return SyntheticActivations(SyntheticConfig(**{"d_in": 16, "n_features": 64, **kw}))


def test_deterministic_per_seed_and_index():
    a, b = _data(seed=3), _data(seed=3)
    torch.testing.assert_close(a.features_FD, b.features_FD, rtol=0, atol=0)
    torch.testing.assert_close(a.batch(5, 32), b.batch(5, 32), rtol=0, atol=0)
    assert not torch.equal(a.batch(5, 32), a.batch(6, 32))
    assert not torch.equal(a.features_FD, _data(seed=4).features_FD)
    streamed = list(a.batches(8, n_batches=3, start=2))
    assert len(streamed) == 3
    torch.testing.assert_close(streamed[0], a.batch(2, 8), rtol=0, atol=0)
    torch.testing.assert_close(streamed[2], a.batch(4, 8), rtol=0, atol=0)


def test_features_unit_norm_and_codes_reconstruct():
    d = _data(offset_norm=2.0)
    torch.testing.assert_close(d.features_FD.norm(dim=1), torch.ones(64))
    assert d.offset_D.norm().item() == pytest.approx(2.0, rel=1e-5)
    x, codes = d.batch(0, 64, return_codes=True)
    assert x.shape == (64, 16) and codes.shape == (64, 64) and (codes >= 0).all()
    torch.testing.assert_close(x, codes @ d.features_FD + d.offset_D)


def test_power_law_frequencies_and_magnitudes():
    d = _data(n_features=200, mean_active=4.0, zipf_exponent=1.0, magnitude_sigma=0.5)
    p = d.frequencies_F
    assert p.sum().item() == pytest.approx(4.0, rel=1e-5)
    assert (p[:-1] >= p[1:]).all()
    assert (p[0] / p[9]).item() == pytest.approx(10.0, rel=1e-4)  # ∝ 1/(i+1)
    _, codes = d.batch(0, 8000, return_codes=True)
    active = codes > 0
    assert active.float().sum(1).mean().item() == pytest.approx(4.0, rel=0.05)
    emp = active.float().mean(0)
    assert emp[:5].sub(p[:5]).abs().max() < 0.03
    assert codes[active].mean().item() == pytest.approx(1.0, rel=0.05)  # lognormal, mean 1


def test_frequencies_clip_at_one_and_keep_the_mean():
    d = _data(n_features=20, mean_active=8.0, zipf_exponent=2.0)
    assert d.frequencies_F.max().item() == 1.0
    assert d.frequencies_F.sum().item() == pytest.approx(8.0, rel=1e-5)


def test_correlated_groups_cofire_with_unchanged_marginals():
    kw = dict(n_features=40, mean_active=8.0, zipf_exponent=0.0)
    ind = _data(**kw)
    cor = _data(**kw, n_groups=4, correlation=0.8)
    _, c_ind = ind.batch(0, 6000, return_codes=True)
    _, c_cor = cor.batch(0, 6000, return_codes=True)
    a_ind, a_cor = (c_ind > 0).float(), (c_cor > 0).float()
    # Marginals stay at p = 0.2.
    assert a_cor.mean().item() == pytest.approx(0.2, abs=0.01)
    # Features 0 and 4 share a group (round-robin into 4), 0 and 1 do not.
    same = (a_cor[:, 0] * a_cor[:, 4]).mean().item()
    other = (a_cor[:, 0] * a_cor[:, 1]).mean().item()
    assert same > 2 * other
    assert (a_ind[:, 0] * a_ind[:, 4]).mean().item() == pytest.approx(0.04, abs=0.01)


def test_noise_std():
    d = _data(noise_std=0.1)
    x, codes = d.batch(1, 2000, return_codes=True)
    resid = x - codes @ d.features_FD
    assert resid.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize(
    "kw", [dict(mean_active=0), dict(mean_active=100), dict(correlation=0.5), dict(n_features=0)]
)
def test_bad_settings_raise(kw):
    with pytest.raises(SyntheticError):
        _data(**kw)


def test_recovery_metrics_planted_and_random():
    d = _data(d_in=32, n_features=100)
    f = d.features_FD
    # A perfect dictionary in any order, any scale, either sign, with extra rows.
    g = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(100, 1, generator=g) < 0.5, -1.0, 1.0)
    planted = torch.cat([f * signs * 3.0, torch.randn(50, 32, generator=g)])[torch.randperm(150)]
    m = recovery_metrics(f, planted)
    assert m.mean_max_cos == pytest.approx(1.0, abs=1e-5) and m.frac_recovered == 1.0
    assert torch.allclose(
        planted[m.best_latent_F] / planted[m.best_latent_F].norm(dim=1, keepdim=True),
        f * signs,
        atol=1e-5,
    )
    rand = recovery_metrics(f, torch.randn(150, 32, generator=g))
    assert rand.mean_max_cos < 0.6 and rand.frac_recovered == 0.0
    # Half of the features planted: half recovered.
    half = recovery_metrics(f, torch.cat([f[:50], torch.randn(50, 32, generator=g)]))
    assert half.frac_recovered == pytest.approx(0.5, abs=0.02)
    # A dead (zero) decoder row does not break it.
    assert recovery_metrics(f, torch.zeros(3, 32)).mean_max_cos == 0.0


def test_recovery_metrics_shape_mismatch_says_how_to_fix():
    with pytest.raises(SyntheticError, match="n_latents, d_in"):
        recovery_metrics(torch.randn(4, 8), torch.randn(8, 5))
