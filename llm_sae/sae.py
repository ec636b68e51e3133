"""Sparse autoencoder architectures: one small subclass per sparsity mechanism.

Every SAE encodes ``x_BD`` into latents ``z_BN`` and decodes them with a dictionary whose
rows are the atoms: ``pre_BN = (x_BD - b_dec) @ W_enc.T + b_enc`` and
``x_hat_BD = z_BN @ W_dec + b_dec``. Subclasses fill in only what differs (the
activation, the sparsity loss, running statistics); the trainer never branches on the
architecture. A saved SAE is ``cfg.json`` + ``sae.safetensors`` and takes raw
activations: the input scaling used in training is folded into the weights on save.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_sae.config import ConfigError, from_dict, to_dict
from llm_sae.errors import CheckpointError

try:  # the fast path: decode and backward touch only the k active latents
    from llm_sae.kernels import topk_decode as _topk_decode
    from llm_sae.kernels import topk_encode as _topk_encode
except ImportError:  # pragma: no cover - only while kernels.py does not exist yet
    _topk_encode = _topk_decode = None

ARCHS = ("topk", "batchtopk", "relu_l1", "jumprelu", "kl_sigmoid", "wta")


@dataclass(kw_only=True)
class SAEConfig:
    """What defines an SAE: its shape, its sparsity mechanism and that mechanism's knobs."""

    arch: str = "topk"
    """SAE architecture: topk, batchtopk, relu_l1, jumprelu, kl_sigmoid, wta or lista."""
    d_in: int = 0
    """Input width (the model's d_model at the hook); taken from the store when training."""
    n_latents: int | None = None
    """Number of latents (dictionary size); default: expansion × d_in."""
    k: int = 32
    """Sparsity target, active latents per token: exact for topk, the batch average for
    batchtopk and wta, the L0 target for jumprelu, and k/n_latents is the default target
    mean activation for kl_sigmoid."""
    aux_k: int | None = None
    """Latents used by the AuxK loss to model the residual error (default: d_in/2, at most 512)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK dead-latent loss (Gao et al. 2024 use 1/32)."""
    l1_coef: float = 5.0
    """relu_l1: coefficient λ of the L1 penalty Σ f_i·‖W_dec_i‖ (Anthropic, April 2024)."""
    sparsity_warmup: float = 0.05
    """relu_l1 and jumprelu: fraction of training over which the sparsity coefficient
    rises linearly from 0."""
    jumprelu_sparsity: str = "target"
    """jumprelu: 'target' penalises l0_coef·d_in·(L0/k − 1)²; 'l0' penalises l0_coef·L0."""
    l0_coef: float = 1.0
    """jumprelu: coefficient of the L0 penalty (see jumprelu_sparsity)."""
    bandwidth: float = 0.1
    """jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient."""
    init_threshold: float = 1.0
    """jumprelu: initial threshold of every latent."""
    rho: float | None = None
    """kl_sigmoid: target mean activation ρ (default k / n_latents)."""
    kl_coef: float = 1.0
    """kl_sigmoid: weight β of the KL(ρ‖ρ̂) sparsity penalty."""
    stat_momentum: float = 0.99
    """Momentum of running statistics: kl_sigmoid's ρ̂, batchtopk's and wta's inference thresholds."""
    lista_steps: int = 3
    """lista: unrolled ISTA steps T after the one-layer first guess (0 = a ReLU encoder)."""

    def resolved(self) -> SAEConfig:
        """Only the SAE's own fields (a TrainConfig is an SAEConfig), with checks."""
        names = [f.name for f in dataclasses.fields(SAEConfig)]
        cfg = SAEConfig(**{n: getattr(self, n) for n in names})
        if cfg.arch not in REGISTRY:
            raise ConfigError(f"unknown SAE architecture {cfg.arch!r}; choose one of {sorted(REGISTRY)}")
        if cfg.d_in <= 0:
            raise ConfigError(f"d_in must be positive, got {cfg.d_in}")
        if cfg.n_latents is None or cfg.n_latents <= 0:
            raise ConfigError(f"n_latents must be positive, got {cfg.n_latents}")
        if not 0 < cfg.k < cfg.n_latents:
            raise ConfigError(
                f"k={cfg.k} must be at least 1 and below n_latents={cfg.n_latents}; "
                "lower --k or raise --expansion/--n-latents"
            )
        if cfg.jumprelu_sparsity not in ("target", "l0"):
            raise ConfigError(f"jumprelu_sparsity must be 'target' or 'l0', got {cfg.jumprelu_sparsity!r}")
        return cfg


@dataclass
class ForwardOutput:
    """What one training forward pass returns. Dict-like: ``out["loss"]`` works too."""

    x_hat_BD: Tensor
    loss: Tensor
    """The total loss to backpropagate."""
    fired_N: Tensor
    """How many rows of the batch each latent fired on (float, detached)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars (mse, fvu, l0, aux, ...): call .item() only when logging."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    REGISTRY[cls.arch] = cls
    return cls


def geometric_median(x_BD: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed distance to the rows (Weiszfeld iterations).

    A better b_dec start than the mean: robust to the few huge-norm rows (e.g. BOS
    positions) that language-model activations have.
    """
    x_BD = x_BD.double()
    y_D = x_BD.mean(0)
    for _ in range(iters):
        w_B = 1.0 / (x_BD - y_D).norm(dim=1).clamp_min(1e-8)
        y_new_D = (w_B[:, None] * x_BD).sum(0) / w_B.sum()
        shift = (y_new_D - y_D).norm()
        y_D = y_new_D
        if shift <= tol * (1.0 + y_D.norm()):
            break
    return y_D.float()


class SAE(nn.Module):
    """Base class: parameters, dense encode/decode, losses common to all, save/load."""

    arch: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True
    """Keep dictionary rows at unit norm (gradient projection + renormalisation)."""
    default_dead_latents: ClassVar[str] = "auxk"
    """What the trainer does about dead latents unless told: auxk, resample or none."""
    homogeneous: ClassVar[bool] = True
    """Activation commutes with positive scaling (ReLU-like), so the input scale can be
    folded into the latents (decoder rows stay unit norm); else into W_enc/W_dec."""
    decoder_init_norm: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = dataclasses.replace(cfg.resolved(), arch=self.arch)
        D, N = self.cfg.d_in, self.cfg.n_latents
        assert N is not None
        W_dec_ND = torch.randn(N, D)
        W_dec_ND *= self.decoder_init_norm / W_dec_ND.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_ND)
        # Encoder starts as the decoder's transpose: each latent first reads the direction
        # it writes, which makes early training far better conditioned (Gao et al. 2024).
        self.W_enc = nn.Parameter(W_dec_ND.clone())
        self.b_enc = nn.Parameter(torch.zeros(N))
        self.b_dec = nn.Parameter(torch.zeros(D))
        self.progress = 1.0

    # ----------------------------------------------------------------- hooks for subclasses
    def activate(self, pre_BN: Tensor) -> Tensor:
        """Dense latents from pre-activations (batch-level rules only in training mode)."""
        raise NotImplementedError

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The architecture's sparsity penalty (already weighted) and its metrics."""
        return pre_BN.new_zeros(()), {}

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        """The activation used by ``forward``; may update running statistics."""
        return self.activate(pre_BN)

    def fired(self, z_BN: Tensor) -> Tensor:
        return z_BN > 0

    def _scale_latents(self, factor: float) -> None:
        """Latents were multiplied by ``factor``: rescale thresholds/statistics to match."""

    # ----------------------------------------------------------------------- the model
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        assert self.cfg.n_latents is not None
        return self.cfg.n_latents

    def set_progress(self, progress: float) -> None:
        """Fraction of training done, in [0, 1]; drives sparsity-coefficient warm-ups."""
        self.progress = float(progress)

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return F.linear(x_BD - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense latent activations [B, N] (the reference path)."""
        return self.activate(self.pre_acts(x_BD))

    def decode(self, z_BN: Tensor) -> Tensor:
        return z_BN @ self.W_dec + self.b_dec

    def forward(
        self, x_BD: Tensor, *, dead_mask_N: Tensor | None = None, aux: bool = True
    ) -> ForwardOutput:
        """Training forward: reconstruction + sparsity (+ AuxK over ``dead_mask_N``)."""
        pre_BN = self.pre_acts(x_BD)
        z_BN = self.train_activate(pre_BN)
        x_hat_BD = self.decode(z_BN)
        sparsity, metrics = self.sparsity_loss(pre_BN, z_BN)
        fired_BN = self.fired(z_BN)
        metrics.setdefault("l0", fired_BN.sum(-1).float().mean().detach())
        return self._finish(x_BD, x_hat_BD, sparsity, metrics, fired_BN.sum(0).float(), dead_mask_N, aux)

    def _finish(
        self,
        x_BD: Tensor,
        x_hat_BD: Tensor,
        sparsity: Tensor,
        metrics: dict[str, Tensor],
        fired_N: Tensor,
        dead_mask_N: Tensor | None,
        aux: bool,
    ) -> ForwardOutput:
        # Summed over D, averaged over B: the convention of the L1 papers, whose
        # coefficients (e.g. λ = 5) assume inputs scaled to E‖x‖ = √D.
        recon, err_BD = _SquaredError.apply(x_BD, x_hat_BD)
        with torch.no_grad():  # for the metrics only; one pass, no [B, D] temporaries
            total_var = x_BD.var(0, correction=0).sum().clamp_min(1e-12)
        loss = recon + sparsity
        aux_loss = x_BD.new_zeros(())
        if aux and dead_mask_N is not None and self.cfg.aux_coef > 0:
            aux_loss = self.auxk_loss(x_BD, err_BD.detach(), dead_mask_N)
            loss = loss + self.cfg.aux_coef * aux_loss
        metrics.update(
            mse=(recon / x_BD.shape[-1]).detach(),
            fvu=(recon / total_var).detach(),
            aux=(aux_loss / total_var).detach(),
            sparsity_loss=sparsity.detach(),
        )
        return ForwardOutput(x_hat_BD=x_hat_BD, loss=loss, fired_N=fired_N.detach(), metrics=metrics)

    def auxk_loss(self, x_BD: Tensor, err_BD: Tensor, dead_mask_N: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the top aux_k dead latents reconstruct the residual.

        Gives dead latents a gradient toward directions the live ones miss. Only the dead
        rows of W_enc are multiplied, so it is cheap when few latents are dead.

        One change from the paper: each token's auxiliary reconstruction ê is first
        shrunk to its least-squares fit of the residual e, by s = clamp(⟨e, ê⟩/‖ê‖², 0, 1)
        (not differentiated). The residual of a good SAE is small, and the plain loss
        ‖e − ê‖² mostly teaches dead latents to fire *weakly*: their encoder rows shrink
        until they can never win the main top-k, so AuxK that acts early kills more latents
        than it revives (22.6% dead against 1.9% without AuxK on the ground-truth
        benchmark with dead_tokens=50k; 0.1% with the fitted scale; BENCHMARKS.md). With
        the scale, an overshooting ê costs nothing, so the gradient turns dead latents
        toward the residual's directions and can only grow their activations.
        """
        e_hat_BD, n_dead, k_aux = self.aux_reconstruction(x_BD, dead_mask_N)
        if n_dead == 0:
            return x_BD.new_zeros(())
        with torch.no_grad():
            fit_B1 = (err_BD * e_hat_BD).sum(-1, keepdim=True)
            fit_B1 = (fit_B1 / e_hat_BD.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)).clamp_(0, 1)
        e_hat_BD = e_hat_BD * fit_B1
        # Scaled down when only a few latents are dead, as in sparsify, so a handful of
        # dead latents cannot dominate the loss.
        scale = min(n_dead / k_aux, 1.0)
        return scale * (err_BD - e_hat_BD).pow(2).sum(-1).mean()

    def aux_reconstruction(self, x_BD: Tensor, dead_mask_N: Tensor) -> tuple[Tensor, int, int]:
        """(ê_BD, n_dead, k_aux): the decode (no bias) of each row's top k_aux dead latents.

        The one part of AuxK that touches the latents (a latent-sharded SAE overrides it);
        ê is undefined when n_dead is 0.
        """
        dead_M = _dead_rows(dead_mask_N, self.W_enc.device)
        n_dead = dead_M.numel()
        if n_dead == 0:
            return x_BD.new_zeros(()), 0, 0
        k_aux = self.cfg.aux_k or min(512, max(1, self.d_in // 2))
        k_aux = min(k_aux, n_dead)
        pre_BM = F.linear((x_BD - self.b_dec).detach(), self.W_enc[dead_M], self.b_enc[dead_M])
        vals_BK, pos_BK = F.relu(pre_BM).topk(k_aux, dim=-1, sorted=False)
        return _decode_sparse(vals_BK, dead_M[pos_BK], self.W_dec), n_dead, k_aux

    # -------------------------------------------------------------- training constraints
    @torch.no_grad()
    def constrain_grads(self, g_RD: Tensor | None = None, start: int = 0) -> None:
        """Drop the part of each decoder row's gradient that would change its norm: in
        ``W_dec.grad``, or in ``g_RD``, the gradient of decoder rows [start, start + R)."""
        if g_RD is None:
            g_RD = self.W_dec.grad
        if not self.unit_norm_decoder or g_RD is None:
            return
        W_RD = self.W_dec[start : start + g_RD.shape[0]]
        # Row-wise dot products and an in-place update, 4 MB of rows at a time: no [N, D]
        # temporaries (75 MB each at n=24576, d=768), and vecdot is 2.5x faster on CPU
        # than the same dot products as a batched matmul.
        step = max(1, 2**20 // max(1, g_RD.shape[1]))
        for s in range(0, g_RD.shape[0], step):
            g_SD, W_SD = g_RD[s : s + step], W_RD[s : s + step]
            g_SD.addcmul_(W_SD, torch.linalg.vecdot(g_SD, W_SD).unsqueeze(1), value=-1)

    @torch.no_grad()
    def constrain_weights(self) -> None:
        """Put decoder rows back on the unit sphere after an optimiser step."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------------- folding
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make this SAE take raw x when it was trained on ``scale · x``.

        After folding, ``decode(encode(x)) == old_decode(old_encode(scale·x)) / scale``.
        ReLU-like archs divide the latents by ``scale`` (decoder rows stay unit norm, and
        latent values come out in the units of the raw activations); others scale the
        encoder up and the decoder down.
        """
        s = float(scale)
        self.b_dec /= s
        if self.homogeneous:
            self.b_enc /= s
            self._scale_latents(1.0 / s)
        else:
            self.W_enc *= s
            self.W_dec /= s

    # --------------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae.safetensors`` into directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / "sae.safetensors"))
        (path / "cfg.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a saved SAE for inference (eval mode, no training state).

    Directories written by SAELens or sparsify load too, converted exactly (docs/interop.md).
    """
    from safetensors.torch import load_file

    from llm_sae.interop import load_peer, peer_format  # lazy: interop imports this module

    path = Path(path)
    if peer_format(path) is not None:
        return load_peer(path).to(device).eval()
    cfg_file, weights = path / "cfg.json", path / "sae.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path} is not a saved SAE: it needs cfg.json and sae.safetensors "
            "(written by `llm-sae train` or SAE.save)"
        )
    try:
        data = json.loads(cfg_file.read_text())
        cfg = from_dict(SAEConfig, data)
        state = load_file(str(weights))
    except Exception as e:  # JSON, config and safetensors errors all mean a damaged save
        raise CheckpointError(f"cannot read the SAE in {path}: {e}; re-save or re-train it") from e
    sae = REGISTRY[cfg.arch](cfg) if cfg.arch in REGISTRY else None
    if sae is None:
        raise CheckpointError(f"{cfg_file} names unknown architecture {cfg.arch!r}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {weights} do not fit {cfg_file}: {e}") from e
    return sae.to(device).eval()


class _SquaredError(torch.autograd.Function):
    """(mean over rows of ‖x − x̂‖², the error x − x̂): ``err.pow(2).sum(-1).mean()``
    and its gradient with the same arithmetic, with fewer [B, D] temporaries.

    Autograd through the plain expression holds the [B, D] square in the forward and
    three [B, D] tensors in the backward (err¹, 2·err, the product, then its negation);
    here the squares are summed a slab of rows at a time and the backward writes one
    tensor per input that needs a gradient (a training step's peak memory is in its
    backward). The error is returned without a gradient (for AuxK and metrics).
    """

    @staticmethod
    def forward(ctx: Any, x_BD: Tensor, x_hat_BD: Tensor) -> tuple[Tensor, Tensor]:
        err_BD = x_BD - x_hat_BD
        rows_RD = err_BD.reshape(-1, err_BD.shape[-1])
        step = max(1, 2**18 // max(1, rows_RD.shape[1]))  # 1 MB of float32 squares at a time
        sq_R = torch.cat([rows_RD[s : s + step].pow(2).sum(-1) for s in range(0, rows_RD.shape[0], step)])
        ctx.save_for_backward(err_BD)
        ctx.mark_non_differentiable(err_BD)
        ctx.set_materialize_grads(False)  # no [B, D] of zeros for the error's gradient
        return sq_R.mean(), err_BD

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_err: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        (err_BD,) = ctx.saved_tensors
        # Autograd's chain computes (g / rows) · (2 · err); 2·err is exact, so err · (2 · (g /
        # rows)) rounds to the same numbers, and its negation is the x̂ gradient bit for bit.
        c2 = 2 * (g / (err_BD.numel() // max(1, err_BD.shape[-1])))
        grad_x = err_BD * c2 if ctx.needs_input_grad[0] else None
        grad_x_hat = err_BD * -c2 if ctx.needs_input_grad[1] else None
        return grad_x, grad_x_hat


def _dead_rows(dead_mask_N: Tensor, device: torch.device) -> Tensor:
    """The dead latents' indices on ``device``. On a GPU the trainer passes the mask from
    the host (read back with the step's other checks), so nothing here waits for the GPU."""
    dead_M = dead_mask_N.nonzero().squeeze(1)
    if dead_M.device != device:
        dead_M = (dead_M.pin_memory() if device.type == "cuda" else dead_M).to(device, non_blocking=True)
    return dead_M


def _decode_sparse(vals_BK: Tensor, idx_BK: Tensor, W_dec_ND: Tensor) -> Tensor:
    """Σ_k vals·W_dec[idx] without a dense [B, N] intermediate (no bias)."""
    if _topk_decode is not None:
        return _topk_decode(vals_BK, idx_BK, W_dec_ND)
    return F.embedding_bag(idx_BK, W_dec_ND, per_sample_weights=vals_BK, mode="sum")


# ============================================================================ archs


@register
class TopKSAE(SAE):
    """TopK (Gao et al. 2024): keep the k largest pre-activations per token (after ReLU).

    Training uses the sparse kernels: one dense encoder matmul, and a decode and backward
    that touch only the k active latents.
    """

    arch = "topk"

    def activate(self, pre_BN: Tensor) -> Tensor:
        vals_BK, idx_BK = F.relu(pre_BN).topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BN).scatter_(-1, idx_BK, vals_BK)

    def encode_topk(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """The sparse form: values [B, K] (≥ 0) and latent indices [B, K]."""
        if _topk_encode is not None:
            # x + (−b_dec) is x − b_dec bit for bit, but subtraction's backward negates the
            # whole [B, D] gradient before summing it for b_dec; this negates the [D] sum.
            vals_BK, idx_BK = _topk_encode(x_BD + -self.b_dec, self.W_enc, self.b_enc, self.cfg.k)
        else:
            vals_BK, idx_BK = self.pre_acts(x_BD).topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(vals_BK), idx_BK

    def forward(
        self, x_BD: Tensor, *, dead_mask_N: Tensor | None = None, aux: bool = True
    ) -> ForwardOutput:
        vals_BK, idx_BK = self.encode_topk(x_BD)
        x_hat_BD = _decode_sparse(vals_BK, idx_BK, self.W_dec)
        # In place where the dtypes allow: the decode is a fresh tensor nothing saved, so
        # this is the same sum without a second [B, D] tensor.
        x_hat_BD = x_hat_BD.add_(self.b_dec) if x_hat_BD.dtype == self.b_dec.dtype else x_hat_BD + self.b_dec
        on_BK = (vals_BK > 0).float()
        fired_N = torch.zeros(self.n_latents, device=x_BD.device).index_add_(
            0, idx_BK.flatten(), on_BK.flatten()
        )
        metrics = {"l0": on_BK.sum(-1).mean().detach()}
        zero = x_BD.new_zeros(())
        return self._finish(x_BD, x_hat_BD, zero, metrics, fired_N, dead_mask_N, aux)


@register
class BatchTopKSAE(SAE):
    """BatchTopK (Bussmann et al. 2024): the B·k largest activations over the whole batch.

    Tokens get a variable number of latents (k on average). Inference cannot depend on
    the batch, so a global threshold (running average of the smallest kept activation)
    is learned during training and used as a JumpReLU-style cut-off in eval mode.
    """

    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    def activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        if self.training:
            flat = z_BN.flatten()
            vals, idx = flat.topk(min(flat.numel(), self.cfg.k * z_BN.shape[0]), sorted=False)
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(z_BN)
        return z_BN * (z_BN > self.threshold.clamp_min(0))

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = self.activate(pre_BN)
        with torch.no_grad():
            kept = z_BN[z_BN > 0]
            if kept.numel():
                _update_ema(self.threshold, kept.min(), self.cfg.stat_momentum)
        return z_BN

    def _scale_latents(self, factor: float) -> None:
        if self.threshold > 0:
            self.threshold *= factor


@register
class ReLUL1SAE(SAE):
    """ReLU + L1 in Anthropic's April 2024 form.

    The decoder is not constrained; the penalty λ·Σ_i f_i·‖W_dec_i‖ weights each
    activation by its atom's norm so shrinking atoms cannot dodge it. λ warms up
    linearly over the first ``sparsity_warmup`` of training.
    """

    arch = "relu_l1"
    unit_norm_decoder = False
    default_dead_latents = "resample"
    decoder_init_norm = 0.1

    def activate(self, pre_BN: Tensor) -> Tensor:
        return F.relu(pre_BN)

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        coef = self.cfg.l1_coef * _warmup(self.progress, self.cfg.sparsity_warmup)
        l1 = (z_BN * self.W_dec.norm(dim=1)).sum(-1).mean()
        return coef * l1, {"l1": l1.detach()}


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ); the θ gradient uses a rectangle kernel of width ε (straight-through)."""

    @staticmethod
    def forward(ctx: Any, pre_BN: Tensor, log_theta_N: Tensor, eps: float) -> Tensor:
        theta_N = log_theta_N.exp()
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return pre_BN * (pre_BN > theta_N)

    @staticmethod
    def backward(ctx: Any, g_BN: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BN, theta_N = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g_BN * (pre_BN > theta_N)
        near_BN = ((pre_BN - theta_N).abs() < eps / 2).to(g_BN.dtype)
        # d/dθ via the kernel, times θ for the log parameterisation.
        g_theta_N = (g_BN * near_BN * (-theta_N / eps)).sum(0)
        return g_pre, g_theta_N * theta_N, None


class _Step(torch.autograd.Function):
    """H(z − θ) with a straight-through θ gradient; no gradient to z (as in the paper)."""

    @staticmethod
    def forward(ctx: Any, pre_BN: Tensor, log_theta_N: Tensor, eps: float) -> Tensor:
        theta_N = log_theta_N.exp()
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return (pre_BN > theta_N).to(pre_BN.dtype)

    @staticmethod
    def backward(ctx: Any, g_BN: Tensor) -> tuple[None, Tensor, None]:
        pre_BN, theta_N = ctx.saved_tensors
        eps = ctx.eps
        near_BN = ((pre_BN - theta_N).abs() < eps / 2).to(g_BN.dtype)
        g_theta_N = (g_BN * near_BN * (-1.0 / eps)).sum(0)
        return None, g_theta_N * theta_N, None


@register
class JumpReLUSAE(SAE):
    """JumpReLU (Rajamanoharan et al. 2024): z·H(z − θ) with a learned per-latent θ.

    θ = exp(log_threshold); its gradient comes from a straight-through estimator with a
    rectangle kernel of width ``bandwidth``. Sparsity is an L0 penalty, or by default an
    L0 target: l0_coef·d_in·(L0/k − 1)² (d_in makes it comparable with the summed error).
    """

    arch = "jumprelu"
    default_dead_latents = "none"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((self.n_latents,), math.log(self.cfg.init_threshold)))

    def activate(self, pre_BN: Tensor) -> Tensor:
        return pre_BN * (pre_BN > self.log_threshold.exp())

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_BN, self.log_threshold, self.cfg.bandwidth)

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        l0 = _Step.apply(pre_BN, self.log_threshold, self.cfg.bandwidth).sum(-1).mean()
        coef = self.cfg.l0_coef * _warmup(self.progress, self.cfg.sparsity_warmup)
        if self.cfg.jumprelu_sparsity == "target":
            penalty = coef * self.d_in * (l0 / self.cfg.k - 1.0).pow(2)
        else:
            penalty = coef * l0
        return penalty, {"l0": l0.detach()}

    def _scale_latents(self, factor: float) -> None:
        self.log_threshold += math.log(factor)


@register
class KLSigmoidSAE(SAE):
    """Classic sparse autoencoder: sigmoid units with a KL(ρ‖ρ̂) target-sparsity penalty.

    ρ̂ is a running average of each unit's mean activation (a buffer, saved with
    checkpoints). The penalty's value is taken at the running estimate, its gradient
    flows through the current batch mean undamped by the momentum.
    """

    arch = "kl_sigmoid"
    unit_norm_decoder = False  # sigmoid units saturate at 1: atoms must carry the magnitude
    default_dead_latents = "none"
    homogeneous = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("rho_hat", torch.full((self.n_latents,), self.rho))

    @property
    def rho(self) -> float:
        return self.cfg.rho if self.cfg.rho is not None else self.cfg.k / self.n_latents

    def activate(self, pre_BN: Tensor) -> Tensor:
        return torch.sigmoid(pre_BN)

    def fired(self, z_BN: Tensor) -> Tensor:
        return z_BN > 0.5

    def sparsity_loss(self, pre_BN: Tensor, z_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mean_N = z_BN.mean(0)
        with torch.no_grad():
            _update_ema(self.rho_hat, mean_N, self.cfg.stat_momentum)
        rho_hat_N = (self.rho_hat + (mean_N - mean_N.detach())).clamp(1e-6, 1 - 1e-6)
        rho = self.rho
        kl = (
            rho * torch.log(rho / rho_hat_N) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat_N))
        ).sum()
        return self.cfg.kl_coef * kl, {"kl": kl.detach(), "mean_act": mean_N.mean().detach()}


@register
class WTASAE(SAE):
    """Winner-take-all with lifetime sparsity (Makhzani & Frey 2015).

    In training each latent keeps only its top ρ = k/N fraction of activations across the
    batch (so every latent fires, and tokens average k latents). Eval mode uses a
    per-latent threshold, the running average of the smallest kept activation.
    """

    arch = "wta"
    default_dead_latents = "none"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((self.n_latents,), -1.0))

    def _winners(self, B: int) -> int:
        return max(1, min(B, math.ceil(self.cfg.k / self.n_latents * B)))

    def activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        if self.training:
            kth_N = z_BN.topk(self._winners(z_BN.shape[0]), dim=0).values[-1]
            return z_BN * (z_BN >= kth_N.clamp_min(1e-12))
        return z_BN * (z_BN > self.threshold.clamp_min(0))

    def train_activate(self, pre_BN: Tensor) -> Tensor:
        z_BN = F.relu(pre_BN)
        kth_N = z_BN.topk(self._winners(z_BN.shape[0]), dim=0).values[-1]
        with torch.no_grad():
            first = self.threshold < 0
            new_N = torch.where(first, kth_N, self.threshold * self.cfg.stat_momentum + kth_N * (1 - self.cfg.stat_momentum))
            self.threshold.copy_(new_N)
        return z_BN * (z_BN >= kth_N.clamp_min(1e-12))

    def _scale_latents(self, factor: float) -> None:
        self.threshold.copy_(torch.where(self.threshold > 0, self.threshold * factor, self.threshold))


def _update_ema(buf: Tensor, value: Tensor, momentum: float) -> None:
    """Running average; a negative (unset) scalar buffer takes the first value as is."""
    if buf.ndim == 0 and buf < 0:
        buf.copy_(value)
    else:
        buf.mul_(momentum).add_(value.to(buf.dtype), alpha=1 - momentum)


def _warmup(progress: float, frac: float) -> float:
    return 1.0 if frac <= 0 else min(1.0, progress / frac)


# Registers "lista" (llm_sae/lista.py): it subclasses SAE, so it is imported last.
import llm_sae.lista  # noqa: E402, F401
