"""LISTA: T = 0 is a one-layer encoder, untrained it is ISTA, trained it approaches FISTA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_sae.config import ConfigError
from llm_sae.sae.archs.lista import LISTASAE
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.registry import REGISTRY
from llm_sae.sae.sparse_coding import fista, lipschitz_constant

D, N = 8, 16


def make(steps: int, **kw) -> LISTASAE:
    torch.manual_seed(0)
    sae = REGISTRY["lista"](
        SAEConfig(arch="lista", d_in=D, n_latents=N, k=2, lista_steps=steps, **kw)
    )
    assert isinstance(sae, LISTASAE)
    return sae


def sparse_data(n: int, W_ND: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Rows that are nonnegative combinations of ~2 atoms of ``W_ND`` plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    on_BN = torch.rand(n, W_ND.shape[0], generator=g) < 2 / W_ND.shape[0]
    codes_BN = on_BN * (0.5 + torch.rand(n, W_ND.shape[0], generator=g))
    return codes_BN @ W_ND + 0.01 * torch.randn(n, W_ND.shape[1], generator=g)


def test_zero_steps_is_a_one_layer_soft_threshold_encoder():
    sae = make(0)
    assert sae.S is None  # no N×N matrix when there are no lateral steps
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.W_enc.normal_()
        sae.log_threshold.normal_(std=0.3)
    x_BD = torch.randn(32, D)
    theta_N = sae.log_threshold.exp()
    expected_BN = F.relu((x_BD - sae.b_dec) @ sae.W_enc.T - theta_N)
    relu = REGISTRY["relu_l1"](SAEConfig(d_in=D, n_latents=N, k=2))
    relu.load_state_dict({**sae.state_dict(), "b_enc": -theta_N}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x_BD), expected_BN)
        torch.testing.assert_close(sae.encode(x_BD), relu.encode(x_BD))
    assert bool((expected_BN > 0).any()) and bool((expected_BN == 0).any())


@pytest.mark.parametrize("steps", [0, 1, 4])
def test_untrained_lista_is_ista_from_zero(steps):
    """The Gregor & LeCun initialisation: T steps of LISTA = T + 1 ISTA iterations."""
    sae = make(steps, l1_coef=0.4)
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
    W_ND, b_D = sae.W_dec.detach(), sae.b_dec.detach()
    x_BD = sparse_data(64, W_ND) + b_D
    L, lam = lipschitz_constant(W_ND), 0.4 / 2
    z_BN = torch.zeros(64, N)
    for _ in range(steps + 1):
        grad_BN = (z_BN @ W_ND + b_D - x_BD) @ W_ND.T
        z_BN = F.relu(z_BN - grad_BN / L - lam / L)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x_BD), z_BN, rtol=1e-4, atol=1e-5)
    assert bool((z_BN > 0).any())


def _train_encoder(sae: LISTASAE, x_BD: torch.Tensor, steps: int = 300) -> None:
    """Learn only the encoder (W_enc, S, θ) for a fixed dictionary, as Gregor & LeCun do."""
    sae.W_dec.requires_grad_(False)
    sae.b_dec.requires_grad_(False)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=3e-3)
    sae.train()
    for i in range(steps):
        batch_BD = x_BD[(i * 64) % x_BD.shape[0] :][:64]
        loss = sae(batch_BD).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    sae.eval()


def test_trained_lista_approaches_fista_codes_more_closely_with_more_steps(one_thread):
    l1 = 0.2
    errors = {}
    for steps in (0, 1, 3):
        sae = make(steps, l1_coef=l1, sparsity_warmup=0.0)
        W_ND = sae.W_dec.detach()
        x_train_BD, x_test_BD = sparse_data(1024, W_ND, seed=1), sparse_data(256, W_ND, seed=2)
        z_star_BN = fista(x_test_BD, W_ND, l1 / 2, iters=2000, tol=1e-9)  # loss has no ½
        with torch.no_grad():
            before = float((sae.encode(x_test_BD) - z_star_BN).norm() / z_star_BN.norm())
        _train_encoder(sae, x_train_BD)
        with torch.no_grad():
            errors[steps] = float((sae.encode(x_test_BD) - z_star_BN).norm() / z_star_BN.norm())
        assert errors[steps] < before  # training moved the codes toward the optimum
    # Measured: relative code error 0.53 (T=0), 0.38 (T=1), 0.27 (T=3); 0.75 / 0.64 / 0.53
    # before training. An amortized encoder never reaches the per-row optimum exactly.
    assert errors[0] > errors[1] > errors[3], errors
    assert errors[3] < 0.6 * errors[0] and errors[3] < 0.35, errors


def test_trains_through_the_trainer_and_round_trips(tmp_path, one_thread):
    from llm_sae.train.config import TrainConfig
    from llm_sae.train.run import build_sae
    from llm_sae.train.trainer import Trainer

    cfg = TrainConfig(
        store="<synthetic>",
        out="<memory>",
        arch="lista",
        lista_steps=2,
        n_latents=N,
        k=2,
        tokens=64 * 150,
        batch_size=64,
        lr=3e-3,
        l1_coef=0.5,
        log_every=1000,
        checkpoint_every=0,
    )
    torch.manual_seed(0)
    sae = build_sae(cfg, D)
    truth_ND = F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(3)), dim=1)
    x_BD = sparse_data(64 * 150, truth_ND) * 5.0
    trainer = Trainer(sae, cfg, total_steps=150)
    trainer.init_from_sample(x_BD[:1024])
    first = float(sae(x_BD[:256] * trainer.input_scale).metrics["fvu"])
    trainer.fit(iter(x_BD.split(64)), progress=False)
    sae.eval()
    with torch.no_grad():
        last = float(sae(x_BD[:256] * trainer.input_scale).metrics["fvu"])
    assert last < 0.5 * first, (first, last)
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(N))
    assert sae.b_enc.abs().max() == 0  # frozen: θ is the only bias

    sae.fold_input_scale(trainer.input_scale)  # what export does: it now takes raw x
    sae.save(tmp_path / "s")
    loaded = load_sae(tmp_path / "s")
    assert isinstance(loaded, LISTASAE) and loaded.steps == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x_BD[:32]), sae.encode(x_BD[:32]), rtol=0, atol=0)
        x_hat_BD = loaded.decode(loaded.encode(x_BD[:256]))
    fvu_raw = float(
        (x_hat_BD - x_BD[:256]).pow(2).sum() / (x_BD[:256] - x_BD[:256].mean(0)).pow(2).sum()
    )
    assert fvu_raw == pytest.approx(last, rel=1e-3, abs=1e-4)


def test_config_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="lista_steps"):
        make(-1)
    monkeypatch.setattr(LISTASAE, "max_latents", 8)
    with pytest.raises(ConfigError, match="n_latents ≤ 8"):
        make(2)
    make(0)  # no lateral matrix, so no limit
