"""SAE architectures: sparse vs dense paths, sparsity rules, folding, save/load."""

from __future__ import annotations

import pytest
import torch

from llm_sae.config import ConfigError
from llm_sae.errors import CheckpointError, LlmSaeError
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.ops import geometric_median
from llm_sae.sae.registry import REGISTRY

D, N, K = 16, 64, 4


def make(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return REGISTRY[arch](SAEConfig(d_in=D, n_latents=N, k=K, **kw))


def warm_up(sae, steps: int = 3) -> None:
    """A few training forwards so running statistics (thresholds, ρ̂) are set."""
    g = torch.Generator().manual_seed(1)
    sae.train()
    for _ in range(steps):
        sae(torch.randn(64, D, generator=g))


def test_registry_has_every_architecture():
    assert set(REGISTRY) == {"topk", "batchtopk", "matryoshka", "relu_l1", "jumprelu", "kl_sigmoid", "wta", "lista"}
    for name, cls in REGISTRY.items():
        assert make(name).cfg.arch == name == cls.arch


def test_topk_sparse_path_matches_dense_reference():
    sae = make("topk")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x_BD = torch.randn(32, D)
    out = sae(x_BD)
    grads_sparse = torch.autograd.grad(out.loss, list(sae.parameters()))
    # Dense reference: scatter into [B, N], dense matmul decode, plain autograd.
    x_hat_dense = sae.decode(sae.encode(x_BD))
    loss_dense = (x_BD - x_hat_dense).pow(2).sum(-1).mean()
    grads_dense = torch.autograd.grad(loss_dense, list(sae.parameters()))
    torch.testing.assert_close(out.x_hat_BD, x_hat_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss_dense)
    for gs, gd in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-5)
    vals_BK, idx_BK = sae.encode_topk(x_BD)
    assert idx_BK.shape == (32, K) and bool((vals_BK >= 0).all())
    assert float(out.metrics["l0"]) <= K
    assert int((sae.encode(x_BD) > 0).sum(-1).max()) <= K


def test_batchtopk_keeps_batch_times_k_and_thresholds_at_inference():
    sae = make("batchtopk")
    x_BD = torch.randn(128, D)
    sae.train()
    z_BN = sae.encode(x_BD)
    assert int((z_BN > 0).sum()) == 128 * K  # exactly B·k in the batch, not k per row
    assert (z_BN > 0).sum(-1).float().std() > 0  # rows differ in how many they get
    assert float(sae.threshold) < 0  # not estimated before a training forward
    sae(x_BD)
    kept = z_BN[z_BN > 0]
    torch.testing.assert_close(sae.threshold, kept.min())
    sae.eval()
    z_eval = sae.encode(x_BD)
    assert bool(((z_eval > 0) == (sae.pre_acts(x_BD) > sae.threshold)).all())


def test_wta_each_latent_keeps_its_top_fraction():
    sae = make("wta")
    x_BD = torch.randn(160, D)
    sae.train()
    z_BN = sae.encode(x_BD)
    winners = -(-K * 160 // N)  # ceil(k/N · B) = 10
    per_latent = (z_BN > 0).sum(0)
    assert int(per_latent.max()) <= winners
    assert float((z_BN > 0).sum(-1).float().mean()) == pytest.approx(K, rel=0.01)
    sae(x_BD)
    assert bool((sae.threshold >= 0).all())


def test_jumprelu_threshold_gets_straight_through_gradient():
    sae = make("jumprelu", bandwidth=0.5, init_threshold=0.2)
    x_BD = torch.randn(64, D)
    out = sae(x_BD)
    out.loss.backward()
    g = sae.threshold.grad
    assert g is not None and bool(g.abs().sum() > 0)
    # Far fewer than k... no: at init nearly half the latents fire, far above the target,
    # so the L0 penalty must push thresholds up (negative gradient) overall.
    assert float(out.metrics["l0"]) > K and float(g.sum()) < 0


def test_kl_sigmoid_penalty_pushes_mean_activation_toward_rho():
    sae = make("kl_sigmoid", kl_coef=10.0, stat_momentum=0.0)
    x_BD = torch.randn(64, D)
    out = sae(x_BD)
    # Mean activation is ~0.5 at init, far above ρ = k/N: the KL gradient lowers b_enc.
    (g_b,) = torch.autograd.grad(out.metrics["sparsity_loss"] * 0 + out.loss, [sae.b_enc])
    assert float(out.metrics["mean_act"]) > 0.3
    assert float(g_b.mean()) > 0


def test_relu_l1_penalty_warms_up():
    sae = make("relu_l1", l1_coef=5.0, sparsity_warmup=0.1)
    x_BD = torch.randn(64, D)
    sae.set_progress(0.0)
    assert float(sae(x_BD).metrics["sparsity_loss"]) == 0.0
    sae.set_progress(0.05)
    half = float(sae(x_BD).metrics["sparsity_loss"])
    sae.set_progress(0.5)
    full = float(sae(x_BD).metrics["sparsity_loss"])
    assert full > 0 and half == pytest.approx(full / 2, rel=1e-5)


def test_decoder_constraint_projects_and_renormalises():
    sae = make("topk")
    sae(torch.randn(32, D)).loss.backward()
    sae.constrain_grads()
    parallel = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1)
    assert float(parallel.abs().max()) < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.constrain_weights()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))
    l1 = make("relu_l1")
    with torch.no_grad():
        l1.W_dec.mul_(3.0)
    l1.constrain_weights()  # unconstrained in the April-2024 form
    assert float(l1.W_dec.detach().norm(dim=1).mean()) == pytest.approx(0.3, rel=1e-4)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_folded_scale_on_raw_input_equals_training_sae_on_scaled_input(arch):
    sae = make(arch)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    warm_up(sae)
    sae.eval()
    scale = 3.7
    x_raw_BD = torch.randn(48, D) / scale
    with torch.no_grad():
        expected_BD = sae.decode(sae.encode(x_raw_BD * scale)) / scale
        n_active = int((sae.encode(x_raw_BD * scale) != 0).sum())
        sae.fold_input_scale(scale)
        got_BD = sae.decode(sae.encode(x_raw_BD))
    assert n_active > 0
    torch.testing.assert_close(got_BD, expected_BD, rtol=1e-4, atol=1e-5)
    if arch != "relu_l1" and arch != "kl_sigmoid":
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_save_load_round_trip(arch, tmp_path):
    sae = make(arch)
    warm_up(sae)
    sae.eval()
    sae.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = load_sae(tmp_path / "s")
    assert not loaded.training and type(loaded) is type(sae)
    x_BD = torch.randn(20, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x_BD), sae.encode(x_BD), rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(loaded.encode(x_BD)), sae.decode(sae.encode(x_BD)), rtol=0, atol=0)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="cfg.json"):
        load_sae(tmp_path)
    sae = make("topk")
    sae.save(tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_sae(tmp_path)


def test_bad_config_raises_user_error():
    with pytest.raises(ConfigError, match="below n_latents"):
        REGISTRY["topk"](SAEConfig(d_in=D, n_latents=8, k=8))
    with pytest.raises(LlmSaeError, match="unknown SAE architecture"):
        SAEConfig(arch="nope", d_in=D, n_latents=N).resolved()


def test_auxk_loss_only_trains_dead_latents():
    sae = make("topk")
    x_BD = torch.randn(64, D)
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[:10] = True
    out = sae(x_BD, dead_mask_N=dead_N)
    assert float(out.metrics["aux"]) > 0
    no_aux = sae(x_BD, dead_mask_N=torch.zeros(N, dtype=torch.bool))
    (g_aux,) = torch.autograd.grad(out.loss - no_aux.loss, [sae.W_dec])
    assert float(g_aux[10:].abs().max()) < 1e-6 < float(g_aux[:10].abs().max())


def test_geometric_median_is_robust_to_outliers():
    torch.manual_seed(0)
    x_BD = torch.randn(200, 4) * 0.1 + 1.0
    x_BD[:10] = 1000.0  # a few huge rows, like BOS positions
    med = geometric_median(x_BD)
    assert float((med - 1.0).abs().max()) < 0.1
    assert float((x_BD.mean(0) - 1.0).abs().min()) > 10


def test_auxk_never_teaches_dead_latents_to_fire_weaker():
    """An overshooting auxiliary reconstruction is fitted down, not trained down: scaling
    the dead latents' activations up leaves the aux loss unchanged, and its gradient
    hardly touches their biases (the plain ‖e − ê‖² pulls them down hard: ê ≫ e here)."""
    torch.manual_seed(0)
    sae = make("topk")
    x_BD = torch.randn(64, D)
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[:10] = True
    with torch.no_grad():
        sae.b_enc[:10] = 5.0  # dead latents that overshoot the residual badly
    err_BD = 0.01 * torch.randn(64, D)
    loss = sae.auxk_loss(x_BD, err_BD, dead_N)
    (g_b,) = torch.autograd.grad(loss, [sae.b_enc])
    assert float(g_b[:10].abs().max()) < 1e-4
    with torch.no_grad():
        sae.W_enc[:10] *= 3
        sae.b_enc[:10] *= 3
    torch.testing.assert_close(sae.auxk_loss(x_BD, err_BD, dead_N), loss, rtol=1e-4, atol=1e-7)
