"""JumpReLU, current recipe: direct float32 threshold, three sparsity losses, the
pre-activation loss for dead latents, a trained L0 near its target, old saves."""

from __future__ import annotations

import math

import pytest
import torch
from archs_util import K, fit, l0
from safetensors.torch import load_file, save_file

from llm_sae.config import ConfigError
from llm_sae.sae.archs import jumprelu
from llm_sae.sae.archs.jumprelu_gate import start_thresholds
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.formats.native import load_sae
from llm_sae.sae.registry import REGISTRY

D, N = 16, 64
pytestmark = pytest.mark.usefixtures("one_thread")


def make(**kw):
    torch.manual_seed(0)
    return REGISTRY["jumprelu"](SAEConfig(arch="jumprelu", d_in=D, n_latents=N, k=K, **kw))


def test_threshold_is_a_float32_parameter_even_under_bf16_autocast():
    sae = make()
    assert "threshold" in dict(sae.named_parameters()) and sae.threshold.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(torch.randn(32, D))
    out.loss.float().backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.dtype == torch.float32
    assert sae.to(torch.bfloat16).threshold.dtype == torch.float32


def test_adam_moves_small_and_large_thresholds_alike():
    """Directly parameterised, Adam moves θ by ~lr whatever its size (exp(log θ) moved a
    θ of 0.01 a hundred times less than one of 1)."""
    sae = make(init_threshold=1.0)
    with torch.no_grad():
        sae.threshold[: N // 2] = 0.01
    before = sae.threshold.detach().clone()
    opt = torch.optim.Adam([sae.threshold], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        sae.threshold.grad = torch.randn(N, generator=g).sign()
        opt.step()
    moved = (sae.threshold.detach() - before).abs()
    assert torch.allclose(moved[: N // 2].mean(), moved[N // 2 :].mean(), rtol=0.5)


@pytest.mark.parametrize("mode", ["quadratic", "step", "tanh"])
def test_every_sparsity_loss_pushes_thresholds_up_when_too_dense(mode):
    sae = make(jumprelu_sparsity=mode, init_threshold=0.05, l0_coef=10.0)
    out = sae(torch.randn(256, D))
    assert float(out.metrics["l0"]) > 2 * K
    (g,) = torch.autograd.grad(out.metrics["sparsity_loss"] * 0 + out.loss - out.loss.detach() * 0, [sae.threshold])
    assert float(g.sum()) < 0


def test_unknown_sparsity_loss_fails_and_old_names_still_load():
    with pytest.raises(ConfigError, match="jumprelu_sparsity"):
        make(jumprelu_sparsity="l1")
    assert make(jumprelu_sparsity="target").mode == "quadratic"
    assert make(jumprelu_sparsity="l0").mode == "step"


def test_pre_activation_loss_lifts_dead_latents_toward_their_threshold():
    sae = make(init_threshold=5.0, aux_coef=0.0)  # nothing fires; AuxK off
    dead_N = torch.ones(N, dtype=torch.bool)
    x_BD = torch.randn(64, D)
    out = sae(x_BD, dead_mask_N=dead_N)  # (which also brings the dead thresholds down: revive)
    assert float(out.metrics["pre_act"]) > 0
    pre_act = sae.pre_act_loss(sae.pre_acts(x_BD), sae.threshold, sae.W_dec, dead_N)
    (g_b,) = torch.autograd.grad(pre_act, [sae.b_enc])
    assert bool((g_b < 0).all())  # gradient descent raises every dead latent's b_enc


@pytest.mark.parametrize("mode", ["quadratic", "step", "tanh"])
def test_every_sparsity_loss_trains_held_out_l0_within_10_percent_of_the_target(mode):
    """The L0 controller (ops.control_l0) at work. Left alone at this length the three
    losses end at 3.4, 2.5 and 4.7 for a target of 3: all outside the band."""
    target = 3.0
    _, _, _, z_BN = fit("jumprelu", steps=400, jumprelu_sparsity=mode, target_l0=target, lr=5e-3)
    assert abs(l0(z_BN) - target) <= 0.1 * target, l0(z_BN)


@pytest.mark.parametrize("mode", ["quadratic", "step", "tanh"])
def test_every_sparsity_loss_lands_on_target_in_a_short_run(mode):
    """100 steps: the thresholds start where the sample's L0 is the target
    (``init_from_sample``) and the integral gain scales with the run's length
    (``CONTROL_SPAN``). From θ = 1 for all, at the fixed gain, the three losses ended at
    3.54, 3.22 and 4.55 for a target of 3."""
    target = 3.0
    _, _, _, z_BN = fit("jumprelu", steps=100, jumprelu_sparsity=mode, target_l0=target, lr=5e-3)
    assert abs(l0(z_BN) - target) <= 0.1 * target, l0(z_BN)


def test_controller_moves_the_knob_the_way_that_corrects_the_l0():
    """Too dense: step/tanh raise their coefficient and quadratic lowers its aim (both
    raise the state); too sparse: the reverse. In eval mode the state stays put."""
    x_BD = torch.randn(256, D)
    for mode, metric, sign in (("step", "l0_coef", 1), ("tanh", "l0_coef", 1), ("quadratic", "l0_aim", -1)):
        for init, target, up in ((0.05, 2.0, True), (3.0, 30.0, False)):
            sae = make(jumprelu_sparsity=mode, init_threshold=init, target_l0=target)
            first = float(sae(x_BD).metrics[metric])
            for _ in range(5):
                last = float(sae(x_BD).metrics[metric])
            assert (float(sae.l0_control) > 0) == up, (mode, init)
            assert (sign * (last - first) > 0) == up, (mode, init, first, last)
            sae.eval()
            before = float(sae.l0_control)
            sae(x_BD)
            assert float(sae.l0_control) == before


def test_controller_state_is_saved_and_old_coefficients_load(tmp_path):
    sae = make(jumprelu_sparsity="step", target_l0=2.0, l0_coef=0.5)
    with torch.no_grad():
        sae.l0_control.fill_(1.25)
    assert float(load_sae(sae.save(tmp_path / "new")).l0_control) == 1.25
    # Saved by the earlier controller: log of the coefficient itself, under another name.
    path = sae.save(tmp_path / "old")
    state = load_file(str(path / "sae.safetensors"))
    state.pop("l0_control")
    save_file({**state, "log_l0_coef": torch.tensor(0.5 * math.e).log()}, str(path / "sae.safetensors"))
    assert abs(float(load_sae(path).l0_control) - 1.0) < 1e-6
    # Peers' and older quadratic saves have no state: it starts at 0.
    path = make().save(tmp_path / "quad")
    state = load_file(str(path / "sae.safetensors"))
    state.pop("l0_control")
    save_file(state, str(path / "sae.safetensors"))
    assert float(load_sae(path).l0_control) == 0.0


def test_saves_with_log_threshold_still_load(tmp_path):
    sae = make()
    with torch.no_grad():
        sae.threshold.uniform_(0.1, 1.0)
    path = sae.save(tmp_path / "j")
    state = load_file(str(path / "sae.safetensors"))
    theta = state.pop("threshold")
    save_file({**state, "log_threshold": theta.log()}, str(path / "sae.safetensors"))
    assert torch.allclose(load_sae(path).threshold, theta, rtol=1e-6)


@pytest.mark.parametrize("mode", ["quadratic", "step", "tanh"])
@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("relative", [False, True])
def test_sparse_training_forward_matches_the_dense_one_in_float64(mode, transcoder, relative, monkeypatch):
    """Loss, metrics and every gradient (θ's straight-through one included) of the sparse
    path equal the dense reference's, with some latents dead (the pre-activation loss),
    with the gate relative to the rows' norms (early training) and plain."""
    monkeypatch.setattr(jumprelu, "SPARSE_FRACTION", 1)  # sparse whatever the row counts
    torch.manual_seed(1)
    extra = {"d_out": 12, "skip": True} if transcoder else {}
    sae = REGISTRY["jumprelu"](SAEConfig(arch="jumprelu", d_in=D, n_latents=256, k=K, jumprelu_sparsity=mode,
                                         target_l0=3.0, bandwidth=0.4, init_threshold=1.5, **extra)).double()
    with torch.no_grad():
        sae.threshold.uniform_(1.0, 2.0)
        if transcoder:
            sae.W_skip.normal_()
    sae.set_progress(0.0 if relative else 1.0)
    x_BD = torch.randn(64, D, dtype=torch.float64) * torch.linspace(0.3, 2.0, 64, dtype=torch.float64)[:, None]
    y = {"target_BE": torch.randn(64, 12, dtype=torch.float64)} if transcoder else {}
    dead_N = torch.zeros(256, dtype=torch.bool)
    dead_N[::5] = True
    names, params = zip(*sae.named_parameters(), strict=True)
    outs, grads = [], []
    for fwd in (sae.forward_dense, sae.forward):
        with torch.no_grad():
            sae.l0_control.zero_()
        out = fwd(x_BD, dead_mask_N=dead_N, **y)
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, params, allow_unused=True))
    dense, sparse = outs
    with torch.no_grad():  # the relative gate fires another set than the plain one
        plain_N = (sae.pre_acts(x_BD) > sae.threshold).sum(0).float()
    assert torch.equal(plain_N, dense.fired_N) != relative
    l0 = float(dense.metrics["l0"])
    assert 2 < l0 < 64  # the thresholds select
    assert torch.allclose(sparse.loss, dense.loss, rtol=1e-10)
    assert torch.allclose(sparse.x_hat_BD, dense.x_hat_BD, rtol=1e-10, atol=1e-12)
    assert torch.equal(sparse.fired_N, dense.fired_N)
    for key in dense.metrics:
        assert torch.allclose(sparse.metrics[key].double(), dense.metrics[key].double(), rtol=1e-6), key
    for name, g_dense, g_sparse in zip(names, *grads, strict=True):
        assert g_dense is not None and g_sparse is not None, name
        # θ's gradient is summed in float32 (it is a float32 parameter): terms of O(1) that
        # cancel leave float32 rounding (~1e-7) on the small sums.
        tol, atol = (1e-5, 1e-6) if name == "threshold" else (1e-9, 1e-12)
        assert torch.allclose(g_sparse, g_dense, rtol=tol, atol=atol), name
    assert float(grads[0][names.index("threshold")].abs().sum()) > 0


def test_training_forward_is_sparse_only_while_rows_are_sparse(monkeypatch):
    sae = make(init_threshold=0.0)  # every latent with pre > 0 fires: dense
    calls = []
    monkeypatch.setattr(sae, "forward_dense", lambda *a, **kw: calls.append(1))
    sae(torch.randn(8, D))
    assert calls == [1]
    with torch.no_grad():
        sae.threshold.fill_(3.0)  # a few pairs per row at most
    assert sae(torch.randn(8, D)) is not None and calls == [1]


def test_start_thresholds_fire_the_target_on_the_sample_and_every_latent_fires():
    """One c for all, in units of each latent's spread: the sample's L0 is the target, and
    latents whose pre-activations are 100x smaller than others' still fire."""
    g = torch.Generator().manual_seed(0)
    pre_BN = torch.randn(2048, 256, generator=g) * torch.logspace(-1, 1, 256)
    theta_N = start_thresholds(pre_BN, 6.0)
    fired_BN = pre_BN > theta_N
    assert abs(float(fired_BN.sum(-1).float().mean()) - 6.0) < 1 / 2048
    assert bool((fired_BN.sum(0) > 0).all())
    plain = pre_BN > float(theta_N.mean())  # one threshold for all would leave many dead
    assert int((plain.sum(0) == 0).sum()) > 50


@pytest.mark.parametrize("target", [3.0, 12.0])
def test_init_from_sample_starts_on_target_through_the_relative_gate_and_does_not_overshoot(target):
    """The first training step's gate (relative to the rows' norms) fires the target on the
    sample, and the encoder's scale makes that selection's decode fit the sample (the
    least-squares shrinkage is 1; θ = 1 for all fired far more and overshot)."""
    sae = make(target_l0=target)
    g = torch.Generator().manual_seed(0)
    x_BD = torch.randn(4096, D, generator=g) * torch.rand(4096, 1, generator=g).mul(2).add(0.2)
    with torch.no_grad():
        sae.b_dec.copy_(x_BD.mean(0))
    sae.set_progress(0.0)
    sae.init_from_sample(x_BD)
    sae.train()
    out = sae(x_BD)
    assert abs(float(out.metrics["l0"]) - target) < 0.05 * target
    with torch.no_grad():
        dec_BD = out.x_hat_BD - sae.b_dec
        xin_BD = x_BD - sae.b_dec
        assert abs(float((xin_BD * dec_BD).sum() / (dec_BD * dec_BD).sum()) - 1.0) < 1e-3


def test_revive_brings_dead_thresholds_down_to_fire_and_leaves_live_ones(monkeypatch):
    # The dead latents' pre-activations in float32, so the counts are exact (in bfloat16,
    # the dead-latent products' dtype on CPUs with bf16 units, they may be off by one).
    monkeypatch.setenv("LLM_SAE_AUXK_BF16", "0")
    sae = make(target_l0=4.0, aux_coef=0.0)
    with torch.no_grad():
        sae.threshold.fill_(50.0)  # nothing fires
    dead_N = torch.zeros(N, dtype=torch.bool)
    dead_N[: N // 2] = True
    sae.set_progress(0.0)  # relative phase: each dead latent fires on target/N of the rows
    x_BD = torch.randn(256, D)
    out = sae(x_BD, dead_mask_N=dead_N)
    assert bool((sae.threshold[N // 2 :] == 50.0).all())
    assert bool((out.fired_N[: N // 2] >= round(4.0 / N * 256)).all())
    assert float(out.fired_N[N // 2 :].sum()) == 0
    with torch.no_grad():
        sae.threshold.fill_(50.0)
    sae.set_progress(0.95)  # plain tail: on one row each
    out = sae(x_BD, dead_mask_N=dead_N)
    assert bool((out.fired_N[: N // 2] == 1).all())


def test_integral_gain_scales_with_the_run_length():
    sae = make(target_l0=3.0)
    assert sae.control_ki == jumprelu.CONTROL_KI  # length unknown
    sae.set_progress(0.0, 100)
    assert sae.control_ki == pytest.approx(jumprelu.CONTROL_SPAN / 100)
    sae.set_progress(0.0, 10**6)
    assert sae.control_ki == jumprelu.CONTROL_KI
