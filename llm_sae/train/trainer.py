"""The trainer: one step and the loop; the parts it is made of live beside it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm_sae.config import ConfigError
from llm_sae.distributed.parallel import Parallel
from llm_sae.errors import DataError
from llm_sae.sae.base import SAE, ForwardOutput
from llm_sae.sae.ops import geometric_median
from llm_sae.train.checkpoint import load_checkpoint, save_checkpoint
from llm_sae.train.config import (
    TF32,
    TrainConfig,
    TrainingError,
    default_lr,
    lr_factor,
    resolve_precision,
)
from llm_sae.train.dead import METHODS as DEAD_METHODS
from llm_sae.train.dead import DeadLatents
from llm_sae.train.loop import fit_together
from llm_sae.train.metrics import BarSink, JsonlSink, MetricSink, MetricWindow, WandbSink
from llm_sae.train.nonfinite import finite_flag, finite_rows
from llm_sae.train.optim import SlicedAdam
from llm_sae.train.update import GradientUpdate


class Trainer:
    """Trains ``sae`` one batch at a time; owns the optimiser and all training state.

    ``input_scale`` multiplies every batch (so E‖x‖ = √D); ``export`` folds it back into
    the weights. Without one, ``init_from_sample`` estimates it. The parts it is made of
    have their own modules: the optimiser (``optim``), dead latents (``dead``), metric
    windows and sinks (``metrics``), checkpoints (``checkpoint``).
    """

    def __init__(
        self,
        sae: SAE,
        cfg: TrainConfig,
        *,
        total_steps: int,
        input_scale: float | None = None,
        target_scale: float | None = None,
        out_dir: str | Path | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        # The distributed hooks (no-ops in one process): see llm_sae/distributed/parallel.py.
        self.par = parallel or Parallel()
        if cfg.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"on_nonfinite must be 'skip' or 'stop', got {cfg.on_nonfinite!r}")
        if cfg.lr_schedule not in ("linear", "cosine"):
            raise ConfigError(f"lr_schedule must be 'linear' or 'cosine', got {cfg.lr_schedule!r}")
        self.dead_method = cfg.dead_latents or sae.default_dead_latents
        if self.dead_method not in DEAD_METHODS:
            raise ConfigError(f"dead_latents must be auxk, resample or none, got {self.dead_method!r}")
        self.sae, self.cfg, self.total_steps = sae, cfg, int(total_steps)
        self.input_scale = input_scale
        # A transcoder's targets get their own scale (E‖y‖ = √E); None: the input scale.
        self.target_scale = target_scale
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
        self.opt = SlicedAdam(sae.parameters(), lr=self.base_lr, betas=betas, eps=cfg.adam_eps, fused=fused)  # type: ignore[arg-type]
        total_tokens = self.total_steps * cfg.batch_size
        share = 10 if self.dead_method == "resample" else 40
        dead_tokens = int(cfg.dead_tokens or min(10_000_000, max(1, total_tokens // share)))
        # This rank's latents (all of them unless sharded).
        self.dead = DeadLatents(sae.W_enc.shape[0], self.device, dead_tokens)
        self.step_idx = 0  # optimiser steps taken
        self.batches_seen = 0  # batches consumed from the iterator (skipped ones too)
        self.tokens = 0
        self.skipped_batches = 0
        self.skipped_rows = 0  # rows with NaN/Inf left out ('skip'), whole skipped batches included
        # Test hook: slow each step down so a crash test can kill a run mid-way.
        self._test_sleep = float(os.environ.get("LLM_SAE_TEST_STEP_SLEEP", "0") or 0)
        # Weight gradients the sparse kernels hand over a slab at a time (one process;
        # data-parallel ranks all-reduce whole gradients, so there they come whole).
        self.update = GradientUpdate(sae, self.opt, self.par, cfg.grad_clip)
        # GPU steps: the last loss and its step, checked at the next read-back (_read_back).
        self._unchecked_loss: tuple[Tensor, int] | None = None
        self._found_inf: Tensor | None = None
        self.window = MetricWindow()

    def dead_mask(self) -> Tensor:
        return self.dead.mask()

    @property
    def output_scale(self) -> float | None:
        """The scale of the targets: the input scale unless a transcoder was given its own."""
        return self.input_scale if self.target_scale is None else self.target_scale

    @torch.no_grad()
    def init_from_sample(
        self, x_sample_BD: Tensor, y_sample_BE: Tensor | None = None, b_dec_E: Tensor | None = None
    ) -> None:
        """Input scale (if not given), b_dec at the geometric median of the sample (of the
        targets ``y_sample_BE`` for a transcoder; ``b_dec_E`` when already computed), then
        the architecture's own start (``SAE.init_from_sample``)."""
        x_BD = x_sample_BD.to(self.device, torch.float32)
        y_BE = x_BD if y_sample_BE is None else y_sample_BE.to(self.device, torch.float32)
        ok_B = torch.isfinite(x_BD).all(-1) & torch.isfinite(y_BE).all(-1)
        x_BD, y_BE = x_BD[ok_B], y_BE[ok_B]
        if x_BD.shape[0] == 0:
            raise DataError("the initialisation sample has no finite rows; check the store")
        if self.input_scale is None:
            self.input_scale = math.sqrt(x_BD.shape[1]) / float(x_BD.norm(dim=1).mean().clamp_min(1e-12))
        if self.target_scale is None and y_sample_BE is not None:
            self.target_scale = math.sqrt(y_BE.shape[1]) / float(y_BE.norm(dim=1).mean().clamp_min(1e-12))
        assert self.output_scale is not None
        if b_dec_E is None:
            b_dec_E = geometric_median(y_BE * self.output_scale)
        self.sae.b_dec.copy_(b_dec_E.to(self.device))
        self.sae.set_progress(self.step_idx / max(1, self.total_steps), self.total_steps)  # the first step's selection
        self.sae.init_from_sample(x_BD * self.input_scale)

    # ---------------------------------------------------------------------- a step
    def step(
        self, x_BD: Tensor, rows_B: Tensor | None = None, y_BE: Tensor | None = None
    ) -> ForwardOutput | None:
        """One optimiser step on a batch of raw activations (and a transcoder's raw
        targets ``y_BE``); None if the batch was skipped."""
        self.batches_seen += 1
        x_BD = x_BD.to(self.device, torch.float32, non_blocking=True)
        finite_t = finite_flag(x_BD)
        if y_BE is not None:
            # Checked with the inputs: a NaN target skips the batch as a NaN input does.
            y_BE = y_BE.to(self.device, torch.float32, non_blocking=True)
            finite_t = finite_t & finite_flag(y_BE)

        auxk = self.dead_method == "auxk"
        dead_N = None
        if self.device.type == "cuda":
            finite, dead_N = self._read_back(finite_t, auxk)
        else:
            finite = bool(finite_t)
        if self.par.any(not finite):
            kept = self._drop_nonfinite(x_BD, rows_B, y_BE)
            if kept is None:
                return None
            x_BD, y_BE = kept
        if self.input_scale is None:
            # The same b_dec on every rank.
            self.init_from_sample(*self.par.global_batch(x_BD, *([] if y_BE is None else [y_BE])))
        assert self.input_scale is not None
        xs_BD = x_BD * self.input_scale
        ys_BE = None if y_BE is None else y_BE * self.output_scale
        sae = self.sae
        sae.train()
        sae.set_progress(self.step_idx / max(1, self.total_steps), self.total_steps)
        lr = self.base_lr * lr_factor(self.step_idx, self.total_steps, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr

        if auxk and dead_N is None:
            dead_N = self.dead_mask()
        # bf16: the matmuls run under autocast on the float32 master weights; the loss is
        # float32, and backward runs outside autocast, as torch recommends.
        bf16, tf32 = self.precision == "bf16", self.precision == "tf32"
        with TF32(tf32), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(xs_BD, dead_mask_N=dead_N, **({} if ys_BE is None else {"target_BE": ys_BE}))
        del xs_BD, ys_BE  # the backward needs only what the forward saved: 12 MB less at its peak
        out.loss = out.loss.float()
        if self.device.type == "cuda":
            # Not read here, which would stall the GPU between forward and backward: fused
            # Adam skips the update on the device when the loss is not finite, and the next
            # step's read-back (or a checkpoint, or the end of the run) raises.
            self._unchecked_loss = (out.loss.detach(), self.step_idx)
            self._found_inf = (~torch.isfinite(out.loss.detach())).float()
        elif not bool(torch.isfinite(out.loss)):
            self._diverged(out.loss.item(), self.step_idx)
        found_inf, self._found_inf = self._found_inf, None
        with TF32(tf32):
            self.update.backward_and_step(out.loss, found_inf)
        sae.constrain_weights()
        self.par.sync_buffers(sae)

        out.fired_N, B = self.par.reduce_fired(out.fired_N, x_BD.shape[0])
        self.tokens += B
        self.dead.update(out.fired_N, B)  # no host sync on GPUs
        if self.dead_method == "resample" and self.tokens - self.dead.last_resample_tokens >= self.dead.dead_tokens:
            # Not in the last stretch: a resampled latent needs time to learn.
            if self.step_idx < 0.8 * self.total_steps:
                self.resample(*self.par.global_batch(x_BD * self.input_scale, out.x_hat_BD.detach()))
            self.dead.last_resample_tokens = self.tokens
        self.step_idx += 1
        self.window.add(out.metrics, out.fired_N, B)
        if self._test_sleep:
            time.sleep(self._test_sleep)
        return out

    def resample(self, x_BD: Tensor, x_hat_BD: Tensor) -> int:
        """Anthropic-style resampling of the dead latents (``DeadLatents.resample``)."""
        return self.dead.resample(self.sae, self.opt, x_BD, x_hat_BD)

    def _drop_nonfinite(
        self, x_BD: Tensor, rows_B: Tensor | None, y_BE: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None] | None:
        """'skip': the batch without its NaN/Inf rows (inputs or a transcoder's targets;
        counted in ``skipped_rows``), so a store with a few bad rows loses those rows, not
        most of its batches. Under several ranks, or when no row is left, the whole batch
        is skipped instead (the ranks' batches must keep one size)."""
        ok_B = finite_rows(x_BD, y_BE)
        bad = (~ok_B).nonzero().squeeze(1)
        where = rows_B[bad.cpu()].tolist() if rows_B is not None else bad.tolist()
        if self.cfg.on_nonfinite == "stop":
            raise DataError(
                f"batch {self.batches_seen - 1} has NaN/Inf in {len(where)} row(s), store rows "
                f"{where[:10]}; fix the store (`llm-sae store verify`) or pass --on-nonfinite skip"
            )
        if self.par.world_size == 1 and len(where) < x_BD.shape[0]:
            self.skipped_rows += len(where)
            return x_BD[ok_B], None if y_BE is None else y_BE[ok_B]
        self.skipped_batches += 1
        self.skipped_rows += x_BD.shape[0]
        return None

    def _read_back(self, finite_t: Tensor, auxk: bool) -> tuple[bool, Tensor | None]:
        """On a GPU, the step's one wait for the device: (the batch is finite, the dead
        mask on the host), and the previous step's loss check.

        It comes where the queue has all but drained anyway; the checks it replaces (the
        loss between forward and backward, AuxK's dead rows mid-forward) each stalled the
        GPU while the host launched the next kernels (6.1 → 5.1 ms a step on an H100 at
        n=24576). AuxK indexes the dead rows from the host mask (``SAE.aux_reconstruction``).
        """
        pending = self._unchecked_loss is not None
        parts = [finite_t.view(1)]
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

    # --------------------------------------------------------------------- the loop
    def window_metrics(self) -> dict[str, float]:
        """Averages since the last call: metrics, dead/dense fractions, tokens/s."""
        self.check_loss()
        m_t = self.window.means()
        m_t["dead_frac"] = self.dead_mask().float().mean()
        # Averaged over ranks: data-parallel ranks saw other rows, latent shards other latents.
        m = {k: float(v) for k, v in self.par.mean_metrics(m_t).items()}
        m["tokens_per_s"] = self.window.tokens_per_s()
        m["lr"] = self.base_lr * lr_factor(max(0, self.step_idx - 1), self.total_steps, self.cfg)
        m.update(step=self.step_idx, tokens=self.tokens, skipped_batches=self.skipped_batches,
                 skipped_rows=self.skipped_rows)
        if self.dead_method == "resample":
            m["resampled"] = self.dead.n_resampled
        self.window.reset()
        return m

    def fit(self, batches: Iterable[Any], *, progress: bool = True) -> None:
        """Step through ``batches`` (x_BD, (x_BD, rows_B) or a transcoder's (x_BD, rows_B,
        y_BE)) until total_steps, logging
        every ``log_every`` steps and checkpointing every ``checkpoint_every`` tokens."""
        fit_together([self], batches, progress=progress)

    def open_sinks(self, bar: Any | None) -> list[MetricSink]:
        """Where this trainer's metrics go (rank 0 only): ``bar`` (if given), log.jsonl, wandb."""
        self._next_ckpt = self._next_checkpoint_tokens()
        return self._sinks(bar) if self.par.is_main else []

    def after_step(self, sinks: list[MetricSink]) -> None:
        """The bookkeeping after a step that was taken: a metric log every ``log_every``
        steps, a checkpoint every ``checkpoint_every`` tokens."""
        if self.step_idx % self.cfg.log_every == 0 or self.step_idx == self.total_steps:
            m = self.window_metrics()
            for sink in sinks:
                sink.write(m)
        nxt = getattr(self, "_next_ckpt", None)
        if self.out_dir is not None and nxt is not None and self.tokens >= nxt:
            self.save_checkpoint(self.out_dir / "checkpoint")
            self._next_ckpt = self._next_checkpoint_tokens()

    def _sinks(self, bar: Any | None) -> list[MetricSink]:
        sinks: list[MetricSink] = [BarSink(bar)] if bar is not None else []
        if self.out_dir is not None:
            sinks.append(JsonlSink(self.out_dir / "log.jsonl"))
            if self.cfg.wandb:
                sinks.append(WandbSink(self.out_dir, self.cfg.wandb_project, self.cfg))
        return sinks

    def _next_checkpoint_tokens(self) -> int | None:
        every = self.cfg.checkpoint_every
        if every <= 0:
            return None
        return (self.tokens // every + 1) * every

    # ------------------------------------------------------------------ state / export
    def save_checkpoint(self, path: str | Path) -> Path:
        """Atomically write the full training state to folder ``path`` (see ``checkpoint``)."""
        return save_checkpoint(self, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state written by ``save_checkpoint``; CheckpointError if unusable."""
        load_checkpoint(self, path)

    def export(self, out_dir: str | Path) -> Path:
        """Save the SAE for inference (cfg.json + sae.safetensors), input scale folded in."""
        self.check_loss()
        sae = self.par.full_sae(self.sae)  # unsharded copy on rank 0, None elsewhere
        if sae is None:
            return Path(out_dir)
        sae.fold_input_scale(self.input_scale or 1.0, self.output_scale or 1.0)
        return sae.save(out_dir)
