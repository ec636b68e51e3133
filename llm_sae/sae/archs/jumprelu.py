"""JumpReLU (Rajamanoharan et al. 2024), in its current recipe: a learned threshold per latent."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_sae.config import ConfigError
from llm_sae.kernels.batch_topk import add_rows, kept_values
from llm_sae.kernels.dead_pre_act import dead_pre_act_loss, dead_pre_acts
from llm_sae.kernels.threshold_pairs import fold_rows, near_probe, threshold_pairs
from llm_sae.sae.archs.jumprelu_gate import (
    JumpReLUFn,
    StepFn,
    relative,
    revival_thresholds,
    start_thresholds,
)
from llm_sae.sae.base import SAE, ForwardOutput
from llm_sae.sae.ops import (
    control_l0,
    dead_rows,
    decode_sparse,
    fit_encoder_scale,
    relative_row_scale,
    warmup,
)
from llm_sae.sae.registry import register

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig

SPARSITY_LOSSES = ("quadratic", "step", "tanh")
_ALIASES = {"target": "quadratic", "l0": "step"}  # the names before the current recipe
CONTROL_KI, CONTROL_KP = 0.05, 2.0
"""The L0 controller's gains (``ops.control_l0``), per step on e = log(L0/target)."""
CONTROL_SPAN = 30.0
"""Over a run of S steps the integral gain is at least CONTROL_SPAN / S: the knob's
balance point drifts as the encoder learns, by about as much in a short run as in a long
one, so a short run needs a faster integral to follow it (292 steps: 0.1, not 0.05)."""
CONTROL_RANGE = (-2.0, 10.0)
"""Its integral's range: step and tanh's coefficient stays within e^-2 to e^10 times
l0_coef (tanh needs 50x on bench recovery; step ~1x), quadratic's aim within e^-10..e^2 T."""
SPARSE_FRACTION = 8
"""The training forward runs sparse while no row has more than N / SPARSE_FRACTION pairs."""


@register
class JumpReLUSAE(SAE):
    """JumpReLU: pre·H(pre − θ) with a learned per-latent threshold θ ≥ 0.

    θ is the parameter itself, in float32 whatever autocast does to the matmuls. It used to
    be exp(log θ): Adam moves a parameter by about lr a step, so a log-parameterised θ
    moved by about lr·θ and small thresholds barely moved at all (SAELens found and fixed
    the same in 2026). θ is projected back to ≥ 0 after each step. The trainer's
    dead-latent losses for this architecture (``--dead-latents auxk``, the default) are
    AuxK and Anthropic's pre-activation loss on the dead latents: on bench recovery the
    pair leaves 25% (1M tokens) and 44% (2M) of latents dead where the pre-activation
    loss alone left 48% and 68% (BENCHMARKS.md).
    """

    arch = "jumprelu"
    default_aux_coef = 1.0
    default_relative_fade = 0.2

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        mode = _ALIASES.get(cfg.jumprelu_sparsity, cfg.jumprelu_sparsity)
        if mode not in SPARSITY_LOSSES:
            raise ConfigError(
                f"jumprelu_sparsity must be one of {', '.join(SPARSITY_LOSSES)}, got {cfg.jumprelu_sparsity!r}"
            )
        if cfg.target_l0 is not None and not 0 < cfg.target_l0 < (cfg.n_latents or 0):
            raise ConfigError(f"target_l0={cfg.target_l0} must be in (0, n_latents={cfg.n_latents})")

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((self.n_latents,), float(self.cfg.init_threshold)))
        self.mode = _ALIASES.get(self.cfg.jumprelu_sparsity, self.cfg.jumprelu_sparsity)
        if self.controlled:
            # The L0 controller's integral (ops.control_l0): log(coefficient / l0_coef) for
            # step and tanh, log(target / aim) for quadratic. Saved, so a resume continues.
            self.register_buffer("l0_control", torch.zeros(()))

    @property
    def target(self) -> float:
        return float(self.cfg.target_l0 if self.cfg.target_l0 is not None else self.cfg.k)

    def activate(self, pre_BN: Tensor) -> Tensor:
        return pre_BN * (pre_BN > self.threshold)

    def forward(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """Training forward on the pairs that matter: those that fire (pre > θ) and those
        within ε/2 of θ (the threshold's straight-through gradient), found without a dense
        float32 [B, N] tensor (``threshold_pairs``) and folded into virtual rows. While no
        row has more than N / SPARSE_FRACTION of them, decode and backward run on them
        alone through the sparse kernels, with the same loss and gradients as the dense
        path (``forward_dense``; tested)."""
        if not self.training:
            return self.forward_dense(x_BD, target_BE=target_BE, dead_mask_N=dead_mask_N, aux=aux)
        B, eps = x_BD.shape[0], self.cfg.bandwidth
        xin_BD = self.centered(x_BD)
        s_B1 = self.row_scale(xin_BD)
        s_B = None if s_B1 is None else s_B1[:, 0]
        pre_act = self.dead_terms(xin_BD, s_B, dead_mask_N, aux)  # revives θ first
        with torch.no_grad():
            th_N = self.threshold
            rows_P, cols_P, pre_P = threshold_pairs(xin_BD.detach(), self.W_enc, self.b_enc, th_N - eps / 2, s_B)
            rel_P = relative(pre_P, None if s_B is None else s_B[rows_P])
            fired_P = rel_P > th_N[cols_P]
            near_P = (rel_P - th_N[cols_P]).abs() < eps / 2
            count_B = torch.bincount(rows_P[fired_P | near_P], minlength=B)
        if B and int(count_B.max()) * SPARSE_FRACTION > self.n_latents:
            return self.forward_dense(x_BD, target_BE=target_BE, dead_mask_N=dead_mask_N, aux=aux)
        with torch.no_grad():
            # The firing pairs decode; those near θ without firing decode 0 and only feed
            # θ's straight-through gradient (``near_probe``).
            fire = fired_P.nonzero().view(-1)
            rows_F, cols_F, pre_F, near_F = rows_P[fire], cols_P[fire], pre_P[fire], near_P[fire]
            rows_V, v_P, j_P, J = fold_rows(rows_F, B)
            idx_VJ = rows_V.new_zeros(rows_V.numel(), J).index_put_((v_P, j_P), cols_F)
            at_VJ = xin_BD.new_zeros(2, rows_V.numel(), J)  # the value, near
            at_VJ[:, v_P, j_P] = torch.stack([pre_F, near_F.to(pre_F.dtype)])
            probe = (near_P & ~fired_P).nonzero().view(-1)
            rows_Q, cols_Q = rows_P[probe], cols_P[probe]
            coef_Q = -th_N[cols_Q] / eps * (1 if s_B is None else s_B[rows_Q])
        vals_VJ = kept_values(at_VJ[0], xin_BD.index_select(0, rows_V), self.W_enc, self.b_enc, idx_VJ)
        # pre·H(pre − θ), plus a term that is 0 with θ's straight-through gradient −θ/ε.
        th_VJ = self.threshold[idx_VJ]
        ste_VJ = (th_VJ - th_VJ.detach()) * (-th_VJ.detach() / eps) * at_VJ[1]
        s_V1 = None if s_B is None else s_B[rows_V, None]
        z_VJ = vals_VJ + (ste_VJ if s_V1 is None else ste_VJ * s_V1).to(vals_VJ.dtype)
        dec_BE = add_rows(decode_sparse(z_VJ, idx_VJ, self.W_dec), rows_V, B) + self.b_dec
        x_hat_BD = self.add_skip(near_probe(dec_BE, self.threshold, self.W_dec, rows_Q, cols_Q, coef_Q), x_BD)
        # The batch L0 with StepFn's straight-through θ gradient, from the near pairs.
        th_Q = self.threshold[cols_P[near_P]]
        l0 = (rows_F.numel() + ((th_Q - th_Q.detach()) * (-1.0 / eps)).sum().to(pre_P.dtype)) / max(1, B)
        sparsity, metrics = self.sparsity_terms(l0, lambda: self.tanh_penalty(relative(z_VJ, s_V1), idx_VJ, B))
        if pre_act is not None:
            sparsity = sparsity + self.cfg.pre_act_coef * pre_act
            metrics["pre_act"] = pre_act.detach()
        fired_N = torch.bincount(cols_F, minlength=self.n_latents).float()
        return self._finish(x_BD, x_hat_BD, sparsity, metrics, fired_N, dead_mask_N, aux, target_BE=target_BE)

    def dead_terms(self, xin_BD: Tensor, s_B: Tensor | None, dead_mask_N: Tensor | None, aux: bool) -> Tensor | None:
        """Revive the dead latents' thresholds (``revive``) and return their pre-activation
        loss (None when off), both from the dead latents' pre-activations alone, with the
        loss's gradients as [M, D] blocks of rows (``kernels.dead_pre_act``)."""
        if dead_mask_N is None:
            return None
        dead_M = dead_rows(dead_mask_N, self.W_enc.device)
        if dead_M.numel() == 0:
            return None
        pre_BM = dead_pre_acts(xin_BD, self.W_enc, self.b_enc, dead_M)
        rel_BM = pre_BM if s_B is None else pre_BM.div_(s_B[:, None])
        self.revive(rel_BM, dead_M)
        if not (aux and self.cfg.pre_act_coef > 0):
            return None
        shift_D = None if self.is_transcoder else -self.b_dec  # xin = x + shift: b_dec's gradient
        return dead_pre_act_loss(rel_BM, s_B, xin_BD, shift_D, self.W_enc, self.b_enc, self.threshold, self.W_dec, dead_M)

    def forward_dense(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """The reference training forward, on the dense [B, N] latents."""
        s_B1 = self.row_scale(self.centered(x_BD))
        pre_BN = relative(self.pre_acts(x_BD), s_B1)  # relative to the row's norm early in training
        if dead_mask_N is not None:
            dead_M = dead_rows(dead_mask_N, pre_BN.device)
            self.revive(pre_BN.detach()[:, dead_M], dead_M)
        z_BN = JumpReLUFn.apply(pre_BN, self.threshold, self.cfg.bandwidth)
        x_hat_BD = self.add_skip(self.decode(z_BN if s_B1 is None else z_BN * s_B1), x_BD)
        sparsity, metrics = self.sparsity_loss(pre_BN, z_BN)
        if aux and dead_mask_N is not None and self.cfg.pre_act_coef > 0:
            dead_N = dead_mask_N.to(pre_BN.device, non_blocking=True)
            pre_act = self.pre_act_loss(pre_BN, self.threshold, self.W_dec, dead_N)
            sparsity = sparsity + self.cfg.pre_act_coef * pre_act
            metrics["pre_act"] = pre_act.detach()
        fired_BN = z_BN != 0
        return self._finish(x_BD, x_hat_BD, sparsity, metrics, fired_BN.sum(0).float(), dead_mask_N, aux,
                            target_BE=target_BE)

    def row_scale(self, xin_BD: Tensor) -> Tensor | None:
        """[B, 1] or None: what a row's pre-activations are divided by before the gate
        (``ops.relative_row_scale``, θ keeps its units): early in training the gate is
        relative to the row's norm, as BatchTopK's ranking is, so the L0 target is not met
        by cutting the small rows' features while the large rows' interference fires
        (``bench recovery``: 30% recovered, 25% dead at 1M tokens, against 81% and 0.7%).
        Then None: the plain JumpReLU that inference runs."""
        s_B = relative_row_scale(self, xin_BD)
        return None if s_B is None else s_B[:, None]

    @torch.no_grad()
    def init_from_sample(self, x_BD: Tensor) -> None:
        """Start on target: θ where the sample's L0 through the first step's gate (relative
        to the rows' norms) is ``target`` (``start_thresholds``), and the encoder at the
        scale whose selection best reconstructs the sample in least squares (as
        ``BatchTopKSAE.init_from_sample``). At the old start (θ = 1 for all) tiny-stdlib
        fired 126 latents a row for a target of 32 (training FVU 4.3 at step 10); the L0 fell
        to 11, the controller wound up on the undershoot, and a 292-step run ended at 40
        (BENCHMARKS.md, issue 17 fourth pass). A transcoder keeps its encoder's scale."""
        if x_BD.shape[0] == 0:
            return
        was = self.training
        self.train()
        try:
            xs_BD = x_BD[: max(64, min(16384, (1 << 25) // self.n_latents))].to(self.W_enc.dtype)
            xin_BD = self.centered(xs_BD)
            s_B1 = self.row_scale(xin_BD)
            pre_BN = F.linear(xin_BD, self.W_enc, self.b_enc)
            pre_BN = pre_BN if s_B1 is None else pre_BN.div_(s_B1)  # in place: [S, N] is large
        finally:
            self.train(was)
        theta_N = start_thresholds(pre_BN, self.target)
        if not self.is_transcoder:
            z_BN = pre_BN.masked_fill_(pre_BN <= theta_N, 0)
            dec_BD = (z_BN if s_B1 is None else z_BN.mul_(s_B1)) @ self.W_dec
            theta_N = theta_N * fit_encoder_scale(self, xin_BD, dec_BD)
        self.threshold.copy_(theta_N)

    @torch.no_grad()
    def revive(self, pre_BM: Tensor, dead_M: Tensor) -> None:
        """A dead latent's θ comes down to where it fires on this batch (``revival_thresholds``):
        on target/N of its rows until --relative-selection, on one row from there on.

        A latent that stops firing gets no threshold gradient (none of its pre-activations
        is within ε/2 of θ) and AuxK and the pre-activation loss turn its encoder row
        without bringing θ back in reach; lowering θ lets it rejoin the reconstruction,
        where its gradients decide whether it stays. One row each at the end keeps the L0
        on target: with a hard switch to the plain gate, target/N there took bench
        recovery's L0 from 8 to 9.9."""
        if dead_M.numel() == 0 or not self.training:
            return
        early = self.progress < self.cfg.relative_selection
        n = round(self.target / self.n_latents * pre_BM.shape[0]) if early else 1
        theta_M = revival_thresholds(pre_BM, n)
        self.threshold[dead_M] = torch.minimum(self.threshold[dead_M], theta_M)

    @property
    def controlled(self) -> bool:
        """Whether a controller steers the trained L0 to ``target``: always for quadratic,
        with --target-l0 for step and tanh (without it they keep a fixed l0_coef)."""
        return self.mode == "quadratic" or self.cfg.target_l0 is not None

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        l0 = StepFn.apply(pre_BN, self.threshold, self.cfg.bandwidth).sum(-1).mean()
        return self.sparsity_terms(l0, lambda: self.tanh_penalty(z_BN))

    def tanh_penalty(self, z_BK: Tensor, idx_BK: Tensor | None = None, rows: int | None = None) -> Tensor:
        """Σ tanh(c·f·‖W_dec‖) per row, averaged over ``rows`` (default z's rows): over the
        dense latents, or over the pairs ``idx_BK`` (the others are 0 and add nothing, nor
        any gradient), which may be virtual rows of the batch's ``rows`` rows."""
        norm_N = self.W_dec.norm(dim=1)
        norm = norm_N if idx_BK is None else norm_N[idx_BK]
        return torch.tanh(self.cfg.tanh_scale * F.relu(z_BK) * norm).sum() / max(1, rows or z_BK.shape[0])

    def sparsity_terms(self, l0: Tensor, tanh_penalty: Callable[[], Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sparsity loss from the batch L0 (with its straight-through θ gradient)."""
        T = self.target
        if self.mode == "quadratic":
            # Quadratic alone settles above T (reconstruction pulls L0 up until the two
            # gradients balance); the controller lowers its aim until the L0 is T.
            coef = self.cfg.l0_coef * warmup(self.progress, self.cfg.sparsity_warmup)
            aim = T * (-self._control(l0)).exp()
            return coef * (2.0 / T) * (l0 - aim).pow(2), {"l0": l0.detach(), "l0_aim": aim.detach()}
        penalty = tanh_penalty() if self.mode == "tanh" else l0
        if self.controlled:
            c: Tensor | float = self.cfg.l0_coef * self._control(l0).exp()
        else:
            c = self.cfg.l0_coef * warmup(self.progress, self.cfg.sparsity_warmup)
        return c * penalty, {"l0": l0.detach(), "l0_coef": torch.as_tensor(c).detach()}

    @property
    def control_ki(self) -> float:
        """The integral gain for this run's length (``CONTROL_SPAN``)."""
        return max(CONTROL_KI, CONTROL_SPAN / self.total_steps) if self.total_steps else CONTROL_KI

    def _control(self, l0: Tensor) -> Tensor:
        """The controller's knob for this batch; it learns only in training, and not
        during the quadratic loss's warm-up (when nothing yet pulls the L0 down)."""
        state = self.l0_control
        if not self.training or (self.mode == "quadratic" and self.progress < self.cfg.sparsity_warmup):
            return state.clone()
        with torch.no_grad():
            return control_l0(state, l0, self.target, ki=self.control_ki, kp=CONTROL_KP, lo=CONTROL_RANGE[0], hi=CONTROL_RANGE[1])

    def pre_act_loss(self, pre_BM: Tensor, theta_M: Tensor, W_dec_MD: Tensor, dead_M: Tensor | None = None) -> Tensor:
        """Anthropic's pre-activation loss (January 2025), on the dead latents only as in
        SAELens: Σ_dead relu(θ − pre)·‖W_dec‖, averaged over rows. It gives a latent that
        never crosses its threshold a gradient that raises its pre-activations. Over the
        dead latents' columns, or over all of them with the mask ``dead_M``."""
        if dead_M is not None and not bool(dead_M.any()):
            return pre_BM.new_zeros((), dtype=torch.float32)
        w_M = W_dec_MD.norm(dim=1) if dead_M is None else W_dec_MD.norm(dim=1) * dead_M
        return (F.relu(theta_M - pre_BM) * w_M).sum(-1).mean()

    @torch.no_grad()
    def constrain_weights(self) -> None:
        super().constrain_weights()
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative values

    def _scale_latents(self, factor: float) -> None:
        self.threshold *= factor

    def _apply(self, fn: Any, recurse: bool = True) -> JumpReLUSAE:
        """``.to(dtype)`` casts every parameter; the threshold stays float32 (Adam's lr-sized
        steps on an O(1) threshold round away in bfloat16)."""
        out = super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold.data = self.threshold.data.float()
        return out

    def _load_from_state_dict(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        # SAEs saved before the threshold was parameterised directly hold log θ.
        old = state.pop(prefix + "log_threshold", None)
        if old is not None and prefix + "threshold" not in state:
            state[prefix + "threshold"] = old.exp()
        # The controller's state: log c under its old name, or none (older saves, peers).
        log_coef = state.pop(prefix + "log_l0_coef", None)
        if self.controlled and prefix + "l0_control" not in state:
            start = 0.0 if log_coef is None else float(log_coef) - math.log(self.cfg.l0_coef)
            state[prefix + "l0_control"] = torch.tensor(start)
        super()._load_from_state_dict(state, prefix, *args)
