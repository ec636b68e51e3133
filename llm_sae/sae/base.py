"""The SAE base class: encode → decode → reconstruction loss + the architecture's terms."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_sae.config import to_dict
from llm_sae.kernels.auxk import dead_decode
from llm_sae.sae.ops import arch_setting, aux_k_of, dead_rows, fitted_residual_loss

if TYPE_CHECKING:
    from llm_sae.sae.config import SAEConfig


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


class SAE(nn.Module):
    """Base class: parameters, dense encode/decode, losses common to all, save/load.

    With ``cfg.d_out`` set it is a transcoder: it reads x_BD (width D) and predicts another
    hook's y_BE (width E), with an optional linear skip path ``W_skip_ED``. Every
    architecture is a transcoder this way; the decoder and its sparse kernels do not care
    what width they write, and the loss only needs a target (the input, for an SAE).
    """

    arch: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True
    """Keep dictionary rows at unit norm (gradient projection + renormalisation)."""
    default_aux_coef: ClassVar[float] = 1 / 32
    """The AuxK weight unless ``--aux-coef`` says otherwise."""
    default_relative_fade: ClassVar[float | None] = None
    """``relative_fade`` unless set: a number for the architectures whose training ranks
    relative to the row norm (``ops.relative_row_scale``), else None (unused)."""
    default_dead_latents: ClassVar[str] = "auxk"
    """What the trainer does about dead latents unless told: auxk, resample or none."""
    homogeneous: ClassVar[bool] = True
    """Activation commutes with positive scaling (ReLU-like), so the input scale can be
    folded into the latents (decoder rows stay unit norm); else into W_enc/W_dec."""
    decoder_init_norm: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = dataclasses.replace(cfg.resolved(), arch=self.arch)
        D, N, E = self.cfg.d_in, self.cfg.n_latents, self.d_out
        assert N is not None
        W_dec_NE = torch.randn(N, E)
        W_dec_NE *= self.decoder_init_norm / W_dec_NE.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_NE)
        # Encoder starts as the decoder's transpose: each latent first reads the direction
        # it writes, which makes early training far better conditioned (Gao et al. 2024).
        # A transcoder's input and output spaces differ: its encoder starts at random.
        if self.is_transcoder:
            W_enc_ND = torch.randn(N, D)
            W_enc_ND *= self.decoder_init_norm / W_enc_ND.norm(dim=1, keepdim=True)
        else:
            W_enc_ND = W_dec_NE.clone()
        self.W_enc = nn.Parameter(W_enc_ND)
        self.b_enc = nn.Parameter(torch.zeros(N))
        self.b_dec = nn.Parameter(torch.zeros(E))
        if self.cfg.skip:
            # Starts at zero (as in SAELens and sparsify): the latents learn first.
            self.W_skip = nn.Parameter(torch.zeros(E, D))
        self.progress, self.total_steps = 1.0, None  # set_progress

    # ----------------------------------------------------------------- hooks for subclasses
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """ConfigError for values of this architecture's parameters it cannot use."""

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
    def d_out(self) -> int:
        """Output width: d_in for an SAE, the target hook's width for a transcoder."""
        return self.cfg.d_in if self.cfg.d_out is None else self.cfg.d_out

    @property
    def is_transcoder(self) -> bool:
        return self.cfg.d_out is not None

    @property
    def n_latents(self) -> int:
        assert self.cfg.n_latents is not None
        return self.cfg.n_latents

    def init_from_sample(self, x_BD: Tensor) -> None:
        """An architecture's own start from the (scaled) initialisation sample, after b_dec."""

    def set_progress(self, progress: float, total_steps: int | None = None) -> None:
        """Fraction of training done, in [0, 1] (sparsity warm-ups), and the run's length in
        steps when known (a controller scales its gains with it)."""
        self.progress, self.total_steps = float(progress), total_steps or self.total_steps

    def centered(self, x_BD: Tensor) -> Tensor:
        """What the encoder reads: x − b_dec for an SAE, x itself for a transcoder (whose
        b_dec lives in the output space; b_enc absorbs any input offset)."""
        # x + (−b_dec) is x − b_dec bit for bit, but subtraction's backward negates the
        # whole [B, D] gradient before summing it for b_dec; this negates the [D] sum.
        return x_BD if self.is_transcoder else x_BD + -self.b_dec

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return F.linear(self.centered(x_BD), self.W_enc, self.b_enc)

    def add_skip(self, y_hat_BE: Tensor, x_BD: Tensor) -> Tensor:
        """The skip path's x·W_skipᵀ added to a decode (a no-op without one)."""
        if not self.cfg.skip:
            return y_hat_BE
        return y_hat_BE + F.linear(x_BD.to(y_hat_BE.dtype), self.W_skip.to(y_hat_BE.dtype))

    def predict(self, x_BD: Tensor) -> Tensor:
        """The reconstruction (SAE) or prediction of the output hook (transcoder) for raw
        inputs, skip path included: what a spliced-in replacement computes."""
        return self.add_skip(self.decode(self.encode(x_BD)), x_BD)

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense latent activations [B, N] (the reference path)."""
        return self.activate(self.pre_acts(x_BD))

    def decode(self, z_BN: Tensor) -> Tensor:
        return z_BN @ self.W_dec + self.b_dec

    def forward(
        self, x_BD: Tensor, *, target_BE: Tensor | None = None,
        dead_mask_N: Tensor | None = None, aux: bool = True,
    ) -> ForwardOutput:
        """Training forward: reconstruction of ``target_BE`` (default: the input) +
        sparsity (+ AuxK over ``dead_mask_N``)."""
        pre_BN = self.pre_acts(x_BD)
        z_BN = self.train_activate(pre_BN)
        x_hat_BD = self.add_skip(self.decode(z_BN), x_BD)
        sparsity, metrics = self.sparsity_loss(pre_BN, z_BN)
        fired_BN = self.fired(z_BN)
        metrics.setdefault("l0", fired_BN.sum(-1).float().mean().detach())
        return self._finish(x_BD, x_hat_BD, sparsity, metrics, fired_BN.sum(0).float(), dead_mask_N, aux,
                            target_BE=target_BE)

    def target_of(self, x_BD: Tensor, target_BE: Tensor | None) -> Tensor:
        """What the loss reconstructs: the input for an SAE; a transcoder must be given one."""
        if target_BE is None and self.is_transcoder:
            raise ValueError("a transcoder's forward needs target_BE, the output hook's activations")
        return x_BD if target_BE is None else target_BE

    def _finish(
        self,
        x_BD: Tensor,
        x_hat_BD: Tensor,
        sparsity: Tensor,
        metrics: dict[str, Tensor],
        fired_N: Tensor,
        dead_mask_N: Tensor | None,
        aux: bool,
        *,
        target_BE: Tensor | None = None,
    ) -> ForwardOutput:
        """The loss against ``target_BE`` (a transcoder's output hook; default the input)."""
        y_BE = self.target_of(x_BD, target_BE)
        # Summed over D, averaged over B: the convention of the L1 papers, whose
        # coefficients (e.g. λ = 5) assume inputs scaled to E‖x‖ = √D.
        recon, err_BD = _SquaredError.apply(y_BE, x_hat_BD)
        with torch.no_grad():  # for the metrics only; one pass, no [B, D] temporaries
            total_var = y_BE.var(0, correction=0).sum().clamp_min(1e-12)
        loss = recon + sparsity
        aux_loss = x_BD.new_zeros(())
        aux_coef = arch_setting(self, "aux_coef")
        if aux and dead_mask_N is not None and aux_coef > 0:
            aux_loss = self.auxk_loss(x_BD, err_BD.detach(), dead_mask_N)  # err_BD is [B, E]
            loss = loss + aux_coef * aux_loss
        metrics.update(
            mse=(recon / y_BE.shape[-1]).detach(),
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
        # Scaled down when only a few latents are dead, as in sparsify, so a handful of
        # dead latents cannot dominate the loss.
        return fitted_residual_loss(err_BD, e_hat_BD, min(n_dead / k_aux, 1.0))

    def aux_reconstruction(self, x_BD: Tensor, dead_mask_N: Tensor) -> tuple[Tensor, int, int]:
        """(ê_BD, n_dead, k_aux): the decode (no bias) of each row's top k_aux dead latents.

        The one part of AuxK that touches the latents (a latent-sharded SAE overrides it);
        ê is undefined when n_dead is 0.
        """
        dead_M = dead_rows(dead_mask_N, self.W_enc.device)
        n_dead = dead_M.numel()
        if n_dead == 0:
            return x_BD.new_zeros(()), 0, 0
        k_aux = min(aux_k_of(self), n_dead)
        xin_BD = self.centered(x_BD).detach()  # AuxK trains only the dead latents
        return dead_decode(xin_BD, self.W_enc, self.b_enc, self.W_dec, dead_M, k_aux), n_dead, k_aux

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
    def fold_input_scale(self, scale: float, output_scale: float | None = None) -> None:
        """Make this SAE take raw x when it was trained on ``scale · x`` (and, for a
        transcoder, to predict ``output_scale · y``; default: ``scale``).

        After folding, ``predict(x) == old_predict(scale·x) / output_scale``.
        ReLU-like archs divide the latents by ``output_scale`` (decoder rows stay unit
        norm, and latent values come out in the units of the raw outputs); others scale the
        encoder up and the decoder down.
        """
        s_in = float(scale)
        s_out = s_in if output_scale is None else float(output_scale)
        self.b_dec /= s_out
        if self.cfg.skip:
            self.W_skip *= s_in / s_out
        if self.homogeneous:
            # relu(a·u) = a·relu(u) for a > 0: z_new(x) = z_old(s_in·x) / s_out.
            if s_in != s_out:
                self.W_enc *= s_in / s_out
            self.b_enc /= s_out
            self._scale_latents(1.0 / s_out)
        else:
            self.W_enc *= s_in
            self.W_dec /= s_out

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
