"""Train a sparse autoencoder from an activation store, with exact resume.

``train(cfg)`` opens the store, builds the SAE, and hands a ``Trainer`` the store's batch
iterator; ``Trainer`` is the reusable part (any SAE, any iterator of ``x_BD`` batches):
one ``step`` per batch, dead-latent bookkeeping (AuxK or resampling), logging, and
atomic checkpoints that restore every piece of state, so a killed run resumed with the
same command ends bit-identical (on CPU) to one that never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.adam import adam as adam_update

from llm_sae.config import ConfigError, add_arguments, from_args, to_dict
from llm_sae.distributed import Parallel, make_parallel, report_rank_failure
from llm_sae.errors import CheckpointError, DataError, LlmSaeError, StoreError
from llm_sae.kernels import DeferredWeightGrads
from llm_sae.sae import REGISTRY, SAE, ForwardOutput, SAEConfig, geometric_median

# Rows of a deferred weight gradient held at once by Trainer._update: 8 MB, where a
# whole gradient is 72 MB at n=24576, d=768 (written twice, in slabs, it costs ~30 ms a
# step more than once whole; the step still beats the old one, see BENCHMARKS.md).
_GRAD_SLAB_BYTES = 8 * 2**20


class TrainingError(LlmSaeError):
    """Training cannot go on (diverged, or bad data with on_nonfinite=stop)."""


@dataclass(kw_only=True)
class TrainConfig(SAEConfig):
    """Everything ``llm-sae train`` needs: the SAE's fields plus the run's."""

    store: str
    """Activation store directory (written by `llm-sae harvest`)."""
    out: str
    """Output directory: cfg.json + sae.safetensors, log.jsonl and the checkpoint."""
    expansion: int = 32
    """n_latents = expansion × d_in, unless --n-latents is given."""
    tokens: int = 100_000_000
    """Training length in tokens (activation rows); the store is cycled if smaller."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    lr: float | None = None
    """Adam learning rate (default 5e-4 / sqrt(n_latents / 2^14), at most 2e-3: sparsify's
    1/sqrt(n) scaling at 2.5x its constant, which recovers far more true features on the
    ground-truth benchmark; BENCHMARKS.md)."""
    lr_warmup: float = 0.01
    """Fraction of training over which the learning rate rises linearly from 0."""
    lr_schedule: str = "linear"
    """After warm-up: 'linear' (constant, then linear decay to 0 over the last lr_decay)
    or 'cosine' (cosine decay to 0 over the rest of training)."""
    lr_decay: float = 0.2
    """Fraction at the end of training over which a linear schedule decays to 0."""
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    """Adam β1, β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    dead_latents: str | None = None
    """Dead-latent handling: auxk, resample or none (default: auxk for topk/batchtopk,
    resample for relu_l1, none for the others)."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing (default: 10M as in Gao et
    al., or for shorter runs a 40th of --tokens with AuxK and a tenth with resampling,
    which restarts a latent from scratch and so waits longer)."""
    seed: int = 0
    """Seed for the initialisation, the data order and resampling."""
    init_rows: int = 16384
    """Rows sampled (with another seed) for the geometric-median b_dec initialisation."""
    log_every: int = 100
    """Steps between metric logs (progress bar, log.jsonl, wandb)."""
    checkpoint_every: int = 20_000_000
    """Tokens between checkpoints (0: only at the end)."""
    resume: bool = True
    """Resume from OUT/checkpoint when there is one; --no-resume starts over."""
    on_nonfinite: str = "skip"
    """A batch with NaN/Inf: 'skip' it (counted and logged) or 'stop' naming its rows."""
    verify_store: bool = False
    """Check the store's checksums and values before training (reads it all once)."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    precision: str = "auto"
    """Matmul precision: bf16 (autocast; float32 master weights and loss), tf32 (float32
    with TF32 matmuls on GPUs that have them), fp32, or auto (bf16 on CUDA, fp32 on CPU)."""
    wandb: bool = False
    """Log to Weights & Biases (WANDB_MODE=offline works without an account)."""
    wandb_project: str = "llm-sae"
    """wandb project name."""
    shard_latents: int = 1
    """Under torchrun: split the latents over this many ranks (TopK only; model parallel);
    the world size divided by it is the data-parallel degree. 1: data parallel only."""


PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; ConfigError for an unknown name."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


class _tf32:
    """TF32 matmuls for float32 on CUDA inside the block; the global flag is restored."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.before


def default_lr(n_latents: int) -> float:
    return min(2e-3, 5e-4 / math.sqrt(n_latents / 2**14))


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``."""
    warm = max(1, round(cfg.lr_warmup * total)) if cfg.lr_warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    decay_start = total - round(cfg.lr_decay * total)
    if step < decay_start or cfg.lr_decay <= 0:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


class Trainer:
    """Trains ``sae`` one batch at a time; owns the optimiser and all training state.

    ``input_scale`` multiplies every batch (so E‖x‖ = √D); ``export`` folds it back into
    the weights. Without one, ``init_from_sample`` estimates it.
    """

    def __init__(
        self,
        sae: SAE,
        cfg: TrainConfig,
        *,
        total_steps: int,
        input_scale: float | None = None,
        out_dir: str | Path | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        # The distributed hooks (no-ops in one process): see llm_sae/distributed.py.
        self.par = parallel or Parallel()
        if cfg.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"on_nonfinite must be 'skip' or 'stop', got {cfg.on_nonfinite!r}")
        if cfg.lr_schedule not in ("linear", "cosine"):
            raise ConfigError(f"lr_schedule must be 'linear' or 'cosine', got {cfg.lr_schedule!r}")
        self.dead_method = cfg.dead_latents or sae.default_dead_latents
        if self.dead_method not in ("auxk", "resample", "none"):
            raise ConfigError(f"dead_latents must be auxk, resample or none, got {self.dead_method!r}")
        self.sae, self.cfg, self.total_steps = sae, cfg, int(total_steps)
        self.input_scale = input_scale
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = sae.W_enc.device
        self.base_lr = cfg.lr or default_lr(sae.n_latents)
        self.precision = resolve_precision(cfg.precision, self.device)
        betas = tuple(cfg.adam_betas)
        if len(betas) != 2:
            raise ConfigError(f"adam_betas needs two values, got {cfg.adam_betas}")
        # fused: one multithreaded kernel over each tensor, ~7x faster than the default
        # per-op Adam on CPU for SAE-sized weights (38 vs 274 ms, 2 x [24576, 768], 2 cores).
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.base_lr, betas=betas, eps=cfg.adam_eps, fused=fused)  # type: ignore[arg-type]
        N = sae.W_enc.shape[0]  # this rank's latents (all of them unless sharded)
        total_tokens = self.total_steps * cfg.batch_size
        share = 10 if self.dead_method == "resample" else 40
        self.dead_tokens = int(cfg.dead_tokens or min(10_000_000, max(1, total_tokens // share)))
        self.tokens_since_fired_N = torch.zeros(N, dtype=torch.long, device=self.device)
        self.step_idx = 0  # optimiser steps taken
        self.batches_seen = 0  # batches consumed from the iterator (skipped ones too)
        self.tokens = 0
        self.skipped_batches = 0
        self.last_resample_tokens = 0
        self.n_resampled = 0
        # Test hook: slow each step down so a crash test can kill a run mid-way.
        self._test_sleep = float(os.environ.get("LLM_SAE_TEST_STEP_SLEEP", "0") or 0)
        # Weight gradients the sparse kernels hand over one at a time (see _update), into
        # one buffer kept across steps. Data-parallel ranks all-reduce whole gradients, so
        # there the kernels return them as usual.
        self._weight_grads = DeferredWeightGrads(
            [sae.W_enc, sae.W_dec] if self.par.defers_weight_grads else []
        )
        self._grad_buf: Tensor | None = None
        # GPU steps: the last loss and its step, checked at the next read-back (_read_back).
        self._unchecked_loss: tuple[Tensor, int] | None = None
        if self.device.type == "cpu":
            _return_large_blocks_to_os()
        self._reset_window()

    # --------------------------------------------------------------------- setup
    @torch.no_grad()
    def init_from_sample(self, x_sample_BD: Tensor) -> None:
        """Input scale (if not given) and b_dec at the geometric median of the sample."""
        x_BD = x_sample_BD.to(self.device, torch.float32)
        x_BD = x_BD[torch.isfinite(x_BD).all(-1)]
        if x_BD.shape[0] == 0:
            raise DataError("the initialisation sample has no finite rows; check the store")
        if self.input_scale is None:
            self.input_scale = math.sqrt(x_BD.shape[1]) / float(x_BD.norm(dim=1).mean().clamp_min(1e-12))
        self.sae.b_dec.copy_(geometric_median(x_BD * self.input_scale).to(self.device))

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired_N >= self.dead_tokens

    # ---------------------------------------------------------------------- a step
    def step(self, x_BD: Tensor, rows_B: Tensor | None = None) -> ForwardOutput | None:
        """One optimiser step on a batch of raw activations; None if the batch was skipped."""
        self.batches_seen += 1
        x_BD = x_BD.to(self.device, torch.float32, non_blocking=True)
        auxk = self.dead_method == "auxk"
        dead_N = None
        if self.device.type == "cuda":
            finite, dead_N = self._read_back(x_BD, auxk)
        else:
            finite = bool(_finite_flag(x_BD))
        if self.par.any(not finite):
            bad = (~torch.isfinite(x_BD).all(-1)).nonzero().squeeze(1)
            where = rows_B[bad.cpu()].tolist() if rows_B is not None else bad.tolist()
            if self.cfg.on_nonfinite == "stop":
                raise DataError(
                    f"batch {self.batches_seen - 1} has NaN/Inf in {len(where)} row(s), store rows "
                    f"{where[:10]}; fix the store (`llm-sae store verify`) or pass --on-nonfinite skip"
                )
            self.skipped_batches += 1
            return None
        if self.input_scale is None:
            self.init_from_sample(*self.par.global_batch(x_BD))  # the same b_dec on every rank
        assert self.input_scale is not None
        xs_BD = x_BD * self.input_scale
        sae = self.sae
        sae.train()
        sae.set_progress(self.step_idx / max(1, self.total_steps))
        lr = self.base_lr * lr_factor(self.step_idx, self.total_steps, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr

        if auxk and dead_N is None:
            dead_N = self.dead_mask()
        # bf16: the matmuls run under autocast on the float32 master weights; the loss is
        # float32, and backward runs outside autocast, as torch recommends.
        bf16, tf32 = self.precision == "bf16", self.precision == "tf32"
        with _tf32(tf32), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(xs_BD, dead_mask_N=dead_N)
        del xs_BD  # the backward needs only what the forward saved: 12 MB less at its peak
        out.loss = out.loss.float()
        if self.device.type == "cuda":
            # Not read here, which would stall the GPU between forward and backward: fused
            # Adam skips the update on the device when the loss is not finite, and the next
            # step's read-back (or a checkpoint, or the end of the run) raises.
            self._unchecked_loss = (out.loss.detach(), self.step_idx)
            self.opt.found_inf = (~torch.isfinite(out.loss.detach())).float()
        elif not bool(torch.isfinite(out.loss)):
            self._diverged(out.loss.item(), self.step_idx)
        self.opt.zero_grad(set_to_none=True)
        try:
            with _tf32(tf32), self._weight_grads.collecting():
                out.loss.backward()
            self._update()
        finally:
            self._weight_grads.clear()
        sae.constrain_weights()
        self.par.sync_buffers(sae)

        out.fired_N, B = self.par.reduce_fired(out.fired_N, x_BD.shape[0])
        self.tokens += B
        self.tokens_since_fired_N += B
        self.tokens_since_fired_N.masked_fill_(out.fired_N > 0, 0)  # no host sync on GPUs
        if self.dead_method == "resample" and self.tokens - self.last_resample_tokens >= self.dead_tokens:
            # Not in the last stretch: a resampled latent needs time to learn.
            if self.step_idx < 0.8 * self.total_steps:
                xs_BD = x_BD * self.input_scale
                self.resample(*self.par.global_batch(xs_BD, out.x_hat_BD.detach()))
            self.last_resample_tokens = self.tokens
        self.step_idx += 1
        self._accumulate(out, B)
        if self._test_sleep:
            time.sleep(self._test_sleep)
        return out

    def _read_back(self, x_BD: Tensor, auxk: bool) -> tuple[bool, Tensor | None]:
        """On a GPU, the step's one wait for the device: (the batch is finite, the dead
        mask on the host), and the previous step's loss check.

        It comes where the queue has all but drained anyway; the checks it replaces (the
        loss between forward and backward, AuxK's dead rows mid-forward) each stalled the
        GPU while the host launched the next kernels (6.1 → 5.1 ms a step on an H100 at
        n=24576). AuxK indexes the dead rows from the host mask (``SAE.aux_reconstruction``).
        """
        pending = self._unchecked_loss is not None
        parts = [_finite_flag(x_BD).view(1)]
        if pending:
            parts.append(torch.isfinite(self._unchecked_loss[0]).view(1))
        if auxk:
            parts.append(self.dead_mask())
        host = torch.cat(parts).cpu()
        if pending:
            self.check_loss(finite=bool(host[1]))
        return bool(host[0]), (host[len(parts) - 1 :] if auxk else None)

    def check_loss(self, finite: bool | None = None) -> None:
        """Raise if the last step's loss was not finite (GPU steps check it one step late);
        ``finite`` is that check when it was already read back."""
        if self._unchecked_loss is None:
            return
        loss, step = self._unchecked_loss
        self._unchecked_loss = None
        if not (bool(torch.isfinite(loss)) if finite is None else finite):
            self._diverged(loss.item(), step)

    def _diverged(self, loss: float, step: int) -> None:
        raise TrainingError(
            f"loss became {loss} at step {step}; lower --lr (now {self.base_lr:.3g}) or the "
            "sparsity coefficient. The last checkpoint is kept."
        )

    def _update(self) -> None:
        """Gradient projection, global-norm clipping and Adam, from the gradients backward left.

        A weight gradient the sparse kernels deferred (one process) is never whole: it is
        written a slab of rows at a time into one small buffer, twice, first for the clip
        coefficient (projected decoder rows, the norm over every parameter) and then for
        Adam on those rows. Same arithmetic as the plain path but for the order in which
        the global norm is summed (the tests pin it); it holds 8 MB where the plain path
        holds both gradients (150 MB at n=24576, d=768), in a buffer reused rather than
        page-faulted anew every step. A weight that also has an ordinary gradient (AuxK's
        dense encoder gradient while latents are dead) takes the plain path alone.
        """
        sae, grads, clip = self.sae, self._weight_grads, self.cfg.grad_clip
        slabbed = [p for p in (sae.W_dec, sae.W_enc) if grads.pending(p) and p.grad is None]
        grads.flush(keep=slabbed)
        if not slabbed:
            self.par.after_backward(sae)
            sae.constrain_grads()
            if clip > 0:
                self.par.clip_grad_norm_(sae, clip)
            self.opt.step()
            return
        sae.constrain_grads()  # W_dec.grad, if the decoder took the plain path
        rest = [p for p in sae.parameters() if p.grad is not None]
        coef = None
        if clip > 0:
            # torch.nn.utils.clip_grad_norm_'s formula: every gradient times
            # min(1, max_norm / (‖all gradients‖ + 1e-6)); the squares summed in float64.
            sq = torch.zeros((), dtype=torch.float64, device=sae.W_enc.device)
            for p in slabbed:
                for start in range(0, p.shape[0], self._slab_rows(p)):
                    sq += torch.linalg.vector_norm(self._grad_slab(p, start)).double().square()
            for p in rest:
                sq += torch.linalg.vector_norm(p.grad).double().square()
            total = sq.sqrt().to(sae.W_enc.dtype)
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in rest], coef)
        self.opt.step()  # the slabbed weights have no .grad: Adam skips them here
        for p in slabbed:
            self._adam_slabs(p, coef)

    def _slab_rows(self, p: Tensor) -> int:
        return max(1, _GRAD_SLAB_BYTES // max(1, p[0].numel() * p.element_size()))

    def _grad_slab(self, p: Tensor, start: int) -> Tensor:
        """Rows [start, start + slab) of ``p``'s deferred gradient, projected for W_dec."""
        rows = self._slab_rows(p)
        buf = self._grad_buf
        if buf is None or buf.numel() < rows * p.shape[1] or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._grad_buf = torch.empty(rows * p.shape[1], dtype=p.dtype, device=p.device)
        g_RD = buf[: min(rows, p.shape[0] - start) * p.shape[1]].view(-1, p.shape[1])
        self._weight_grads.materialize(p, g_RD, start)
        if p is self.sae.W_dec:
            self.sae.constrain_grads(g_RD, start)
        return g_RD

    @torch.no_grad()
    def _adam_slabs(self, p: Tensor, coef: Tensor | None) -> None:
        """``self.opt``'s Adam update of ``p``, one slab of rows of its gradient at a time:
        torch's own update (torch.optim.adam.adam) on row views of p and its moments."""
        opt = self.opt
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state = opt.state[p]
        if not state:  # Adam's lazy initialisation, as torch.optim.Adam does it
            if group["fused"] or group["capturable"]:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:  # torch keeps it on the CPU, in float64 if that is the default dtype
                wide = torch.get_default_dtype() == torch.float64
                state["step"] = torch.tensor(0.0, dtype=torch.float64 if wide else torch.float32)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        P = p.detach()
        for start in range(0, p.shape[0], self._slab_rows(p)):
            g_RD = self._grad_slab(p, start)
            if coef is not None:
                g_RD.mul_(coef)
            rows = slice(start, start + g_RD.shape[0])
            adam_update(
                [P[rows]], [g_RD], [state["exp_avg"][rows]], [state["exp_avg_sq"][rows]],
                [state["max_exp_avg_sq"][rows]] if group["amsgrad"] else [],
                [state["step"].clone()],  # each slab's call counts the step once; the state below
                foreach=False, fused=group["fused"], capturable=group["capturable"],
                differentiable=False, decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            )
        state["step"] += 1

    @torch.no_grad()
    def resample(self, x_BD: Tensor, x_hat_BD: Tensor) -> int:
        """Anthropic-style resampling: dead latents restart at badly reconstructed inputs.

        Inputs are drawn with probability ∝ (squared error)²; the atom becomes the
        (centred, normalised) input, the encoder row the same direction at 0.2× the mean
        alive encoder norm, b_enc 0, and their Adam moments are reset.
        """
        sae = self.sae
        dead_M = self.dead_mask().nonzero().squeeze(1)
        n_dead = dead_M.numel()
        if n_dead == 0:
            return 0
        loss_B = (x_BD - x_hat_BD).pow(2).sum(-1)
        p_B = loss_B.pow(2)
        p_B = p_B if float(p_B.sum()) > 0 else torch.ones_like(p_B)
        pick_M = torch.multinomial(p_B, n_dead, replacement=n_dead > x_BD.shape[0])
        v_MD = x_BD[pick_M] - sae.b_dec
        v_MD = v_MD / v_MD.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive_N = ~self.dead_mask()
        enc_norm = float(sae.W_enc[alive_N].norm(dim=1).mean()) if bool(alive_N.any()) else 1.0
        dec_norm = 1.0 if sae.unit_norm_decoder or not bool(alive_N.any()) else float(sae.W_dec[alive_N].norm(dim=1).mean())
        sae.W_dec[dead_M] = v_MD * dec_norm
        sae.W_enc[dead_M] = v_MD * (0.2 * enc_norm)
        sae.b_enc[dead_M] = 0.0
        for p in (sae.W_dec, sae.W_enc, sae.b_enc):
            state = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead_M] = 0.0
        self.tokens_since_fired_N[dead_M] = 0
        self.n_resampled += n_dead
        return n_dead

    # -------------------------------------------------------------------- logging
    def _reset_window(self) -> None:
        self._win_sums: dict[str, Tensor] = {}
        self._win_steps = 0
        self._win_tokens = 0
        self._win_fired_N: Tensor | None = None
        self._win_t0 = time.perf_counter()

    def _accumulate(self, out: ForwardOutput, B: int) -> None:
        for k, v in out.metrics.items():
            self._win_sums[k] = self._win_sums.get(k, 0) + v.float()
        self._win_steps += 1
        self._win_tokens += B
        self._win_fired_N = out.fired_N if self._win_fired_N is None else self._win_fired_N + out.fired_N

    def window_metrics(self) -> dict[str, float]:
        """Averages since the last call: metrics, dead/dense fractions, tokens/s."""
        steps = max(1, self._win_steps)
        self.check_loss()
        m_t = {k: v / steps for k, v in self._win_sums.items()}
        m_t["dead_frac"] = self.dead_mask().float().mean()
        if self._win_fired_N is not None and self._win_tokens:
            m_t["dense_frac"] = (self._win_fired_N / self._win_tokens > 0.1).float().mean()
        # Averaged over ranks: data-parallel ranks saw other rows, latent shards other latents.
        m = {k: float(v) for k, v in self.par.mean_metrics(m_t).items()}
        m["tokens_per_s"] = self._win_tokens / max(1e-9, time.perf_counter() - self._win_t0)
        m["lr"] = self.base_lr * lr_factor(max(0, self.step_idx - 1), self.total_steps, self.cfg)
        m.update(step=self.step_idx, tokens=self.tokens, skipped_batches=self.skipped_batches)
        if self.dead_method == "resample":
            m["resampled"] = self.n_resampled
        self._reset_window()
        return m

    # --------------------------------------------------------------------- the loop
    def fit(self, batches: Iterable[Any], *, progress: bool = True) -> None:
        """Step through ``batches`` (x_BD or (x_BD, rows_B)) until total_steps."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        main = self.par.is_main  # rank 0 alone shows progress, logs and writes
        bar = tqdm(total=self.total_steps, initial=self.step_idx, disable=not (progress and main), unit="step", dynamic_ncols=True)
        log_file = open(self.out_dir / "log.jsonl", "a") if self.out_dir is not None and main else None  # noqa: SIM115
        wandb_run = self._wandb_init() if cfg.wandb and main else None
        next_ckpt = self._next_checkpoint_tokens()
        it: Iterator[Any] = iter(batches)
        try:
            while self.step_idx < self.total_steps:
                try:
                    item = next(it)
                except StopIteration:
                    raise DataError(
                        f"the batch iterator ran out after {self.batches_seen} batches, "
                        f"before step {self.total_steps}; use a looping reader or fewer --tokens"
                    ) from None
                x_BD, rows_B = item if isinstance(item, (tuple, list)) else (item, None)
                out = self.step(x_BD, rows_B)
                if out is None:
                    continue
                bar.update(1)
                if self.step_idx % cfg.log_every == 0 or self.step_idx == self.total_steps:
                    m = self.window_metrics()
                    bar.set_postfix(
                        fvu=f"{m['fvu']:.4f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_frac']:.3f}",
                        tok_s=f"{m['tokens_per_s']:.3g}",
                    )
                    if log_file is not None:
                        log_file.write(json.dumps(m) + "\n")
                        log_file.flush()
                    if wandb_run is not None:
                        wandb_run.log(m, step=self.step_idx)
                if self.out_dir is not None and next_ckpt is not None and self.tokens >= next_ckpt:
                    self.save_checkpoint(self.out_dir / "checkpoint")
                    next_ckpt = self._next_checkpoint_tokens()
            self.check_loss()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
            if wandb_run is not None:
                wandb_run.finish()
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _next_checkpoint_tokens(self) -> int | None:
        every = self.cfg.checkpoint_every
        if every <= 0:
            return None
        return (self.tokens // every + 1) * every

    def _wandb_init(self) -> Any:
        import wandb

        assert self.out_dir is not None
        id_file = self.out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        id_file.write_text(run_id)
        return wandb.init(
            project=self.cfg.wandb_project, id=run_id, resume="allow", dir=str(self.out_dir),
            name=self.out_dir.name, config=to_dict(self.cfg),
        )

    # ------------------------------------------------------------------ state / ckpt
    def state_dict(self) -> dict[str, Any]:
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # Unsharded and rank-independent, so a run resumes with any number of ranks.
        sae_state, opt_state, dead_N = self.par.full_state(self.sae, self.opt, self.tokens_since_fired_N)
        return {
            "sae": sae_state,
            "opt": opt_state,
            "tokens_since_fired_N": dead_N,
            "counters": {
                "step_idx": self.step_idx, "batches_seen": self.batches_seen, "tokens": self.tokens,
                "skipped_batches": self.skipped_batches, "last_resample_tokens": self.last_resample_tokens,
                "n_resampled": self.n_resampled, "input_scale": self.input_scale,
            },
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.par.load_full_state(self.sae, self.opt, self.tokens_since_fired_N, state)
        for k, v in state["counters"].items():
            setattr(self, k, v)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """Atomically write the full training state to directory ``path``.

        Written under a temporary name, fsynced, then swapped in; a crash at any moment
        leaves either the previous checkpoint or the new one, never a torn one.
        """
        self.check_loss()  # never write the state of a diverged run
        path = Path(path)
        state = self.state_dict()  # a collective when distributed: every rank calls it
        if not self.par.is_main:
            self.par.barrier()
            return path
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        meta = {
            "step": self.step_idx, "tokens": self.tokens, "batches_seen": self.batches_seen,
            "sha256": hashlib.sha256(blob).hexdigest(), "sae": to_dict(self.sae.cfg),
            "train": to_dict(self.cfg),
        }
        for name, data in (("state.pt", blob), ("meta.json", json.dumps(meta, indent=2).encode())):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        self.par.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state written by ``save_checkpoint``; CheckpointError if unusable."""
        path = Path(path)
        meta = read_checkpoint_meta(path)
        blob = (path / "state.pt").read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise CheckpointError(
                f"checkpoint {path} is corrupt (state.pt checksum mismatch); delete {path} "
                "to start over, or rerun with --no-resume"
            )
        saved = meta.get("sae", {})
        mine = to_dict(self.sae.cfg)
        for key in ("arch", "d_in", "n_latents"):
            if saved.get(key) != mine[key]:
                raise CheckpointError(
                    f"checkpoint {path} has {key}={saved.get(key)} but this run has {key}={mine[key]} "
                    "(different store or SAE width); use the original settings, another --out, "
                    "or --no-resume to start over"
                )
        try:
            # To the CPU first: loading copies each tensor to its parameter's device, and a
            # latent-sharded rank keeps only its slice, so the full state never sits on it.
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
            self.load_state_dict(state)
        except Exception as e:  # anything torch raises on a damaged or foreign file
            raise CheckpointError(f"cannot restore checkpoint {path}: {e}; delete it or use --no-resume") from e

    # ------------------------------------------------------------------------ export
    def export(self, out_dir: str | Path) -> Path:
        """Save the SAE for inference (cfg.json + sae.safetensors), input scale folded in."""
        self.check_loss()
        sae = self.par.full_sae(self.sae)  # unsharded copy on rank 0, None elsewhere
        if sae is None:
            return Path(out_dir)
        sae.fold_input_scale(self.input_scale or 1.0)
        return sae.save(out_dir)


def _return_large_blocks_to_os() -> None:
    """glibc: serve blocks of 4 MB and more (a batch's [B, D] temporaries) from mmap.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MB),
    so after the first step the [B, D] temporaries live on its heap, which fragments and
    holds 40-80 MB more than the step ever uses at once: peak memory varied between 1.42x
    and 1.51x the floor from run to run (scripts/bench_train.py). A fixed threshold
    gives each such block back on free (1.42x every run, for ~15 ms of page faults a
    step); the trim threshold keeps smaller blocks on the heap as before. Process-wide;
    a no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _finite_flag(x_BD: Tensor) -> Tensor:
    """Whether every value is finite, as a bool tensor on x's device (nothing is read
    back): one pass and no [B, D] temporary, as min and max propagate NaN
    (``isfinite(x).all()`` allocates two [B, D] tensors per step)."""
    if x_BD.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x_BD.device)
    lo, hi = torch.aminmax(x_BD)
    return torch.isfinite(lo) & torch.isfinite(hi)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({e}); delete it to start over, or use --no-resume"
        ) from e


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: OUT/checkpoint, or .old if a swap was interrupted."""
    out_dir = Path(out_dir)
    for name in ("checkpoint", "checkpoint.old"):
        p = out_dir / name
        if (p / "meta.json").exists():
            return p
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_sae(cfg: TrainConfig, d_in: int) -> SAE:
    """The SAE a TrainConfig asks for, on an input of width ``d_in``."""
    n = cfg.n_latents or cfg.expansion * d_in
    sae_cfg = dataclasses.replace(cfg, d_in=d_in, n_latents=n).resolved()
    return REGISTRY[sae_cfg.arch](sae_cfg)


def train(cfg: TrainConfig) -> Path:
    """Train an SAE from ``cfg.store`` into ``cfg.out``; returns the output directory.

    Under ``torchrun`` every rank runs this: data parallel, latent-sharded with
    ``cfg.shard_latents`` > 1, or both (docs/distributed.md).
    """
    par = make_parallel(cfg.shard_latents)
    with report_rank_failure("training") if par.world_size > 1 else contextlib.nullcontext():
        return _train(cfg, par)


def _train(cfg: TrainConfig, par: Parallel) -> Path:
    from llm_sae.store import open_store, verify_store

    store = open_store(cfg.store)
    if store.n_rows == 0:
        raise StoreError(f"the store at {cfg.store} has no rows; harvest some activations first")
    if cfg.verify_store:
        problems = verify_store(cfg.store)
        if problems:
            raise StoreError(f"store {cfg.store} failed verification: {'; '.join(problems[:5])}")
    if not math.isfinite(store.mean_norm) or store.mean_norm <= 0:
        raise StoreError(
            f"the store at {cfg.store} has mean norm {store.mean_norm}; its statistics are "
            "broken (NaN/Inf rows?): run `llm-sae store verify` and harvest again"
        )
    total_steps = cfg.tokens // cfg.batch_size
    if total_steps <= 0:
        raise ConfigError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    if cfg.batch_size % par.dp_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} does not split over {par.dp_size} data-parallel ranks; "
            "use a multiple of that number"
        )
    if par.n_shards > 1 and cfg.dead_latents == "resample":
        raise ConfigError(
            "--dead-latents resample does not work with --shard-latents > 1 (a rank sees only "
            "its own latents); use auxk, the topk default, or none"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = par.device(cfg.device)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Built whole (same seed on every rank), then cut to this rank's latents if sharded.
    sae = par.shard(build_sae(cfg, store.d_in)).to(device)
    trainer = Trainer(
        sae, cfg, total_steps=total_steps, input_scale=math.sqrt(store.d_in) / store.mean_norm,
        out_dir=out, parallel=par,
    )
    ckpt = find_checkpoint(out) if cfg.resume else None
    par.barrier()  # every rank has looked before rank 0 clears anything
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
    else:
        if par.is_main:
            for stale in ("checkpoint", "checkpoint.old", "log.jsonl"):
                p = out / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        trainer.init_from_sample(_sample_rows(store, cfg))
    if par.is_main:
        (out / "train_cfg.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    if trainer.step_idx < total_steps:
        # Every rank follows the one-rank (global) batch order and reads only its slice of
        # each batch: step t sees the same global batch whatever the world size, so
        # resuming with another number of ranks continues the same run.
        reader = store.reader(
            cfg.batch_size, seed=cfg.seed, start_batch=trainer.batches_seen, loop=True,
            with_rows=True, device=device, rank=0, world_size=1,
            dtype=_batch_dtype(store, trainer), batch_slice=par.batch_slice(),
        )
        trainer.fit(reader)
        trainer.save_checkpoint(out / "checkpoint")
    trainer.export(out)
    return out


def _batch_dtype(store: Any, trainer: Trainer) -> torch.dtype:
    """bf16 batches straight from a bf16 store when training in bf16 (half the bytes to
    copy to the device, no conversion on the host); float32 otherwise."""
    if trainer.precision == "bf16" and store.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _sample_rows(store: Any, cfg: TrainConfig) -> Tensor:
    """A shuffled sample for initialisation, drawn with its own seed (not the training order)."""
    n = min(cfg.init_rows, store.n_rows)
    bs = min(n, 4096)
    reader = store.reader(bs, seed=cfg.seed + 1_000_003, loop=True, rank=0, world_size=1)
    rows, it = [], iter(reader)
    try:
        while sum(r.shape[0] for r in rows) < n:
            rows.append(next(it).float())
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return torch.cat(rows)[:n]


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, TrainConfig, exclude=("d_in",))


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(TrainConfig, args)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(f"saved SAE to {out} (load with llm_sae.sae.load_sae)")
    return 0
