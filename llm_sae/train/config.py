"""What a training run is asked to do, and the schedule it follows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm_sae.config import ConfigError
from llm_sae.errors import LlmSaeError
from llm_sae.sae.config import SAEConfig


class TrainingError(LlmSaeError):
    """Training cannot go on (diverged, or bad data with on_nonfinite=stop)."""


@dataclass(kw_only=True)
class TrainConfig(SAEConfig):
    """Everything ``llm-sae train`` needs: the SAE's fields plus the run's."""

    out: str
    """Output directory: cfg.json + sae.safetensors, log.jsonl and the checkpoint (a sweep:
    one such folder per SAE, named from its spec, and sweep.json)."""
    store: str = ""
    """Activation store directory (written by `llm-sae harvest`); or train on the fly with
    --model, --dataset and --hook."""
    target_store: str | None = None
    """Train a transcoder: the store of the output hook to predict from --store's input hook
    (both written by one `llm-sae harvest --pair IN:OUT`)."""
    model: str = ""
    """On the fly, instead of --store: the HF causal LM to run (as for harvest); its
    activations go through a shuffle buffer on the device into training, never to disk."""
    dataset: str = ""
    """On the fly: the text (HF hub dataset name or a local .txt/.jsonl/.parquet file or folder)."""
    hook: str = ""
    """On the fly: the TransformerLens hook to train on, e.g. blocks.6.hook_resid_post."""
    dataset_config: str | None = None
    """On the fly: config (subset) name of a hub dataset."""
    split: str = "train"
    """On the fly: dataset split."""
    text_column: str = "text"
    """On the fly: column that holds the text."""
    context_length: int = 128
    """On the fly: tokens per context, BOS included (BOS/EOS/pad rows are left out, as in harvest)."""
    model_batch_size: int = 32
    """On the fly: contexts per model forward pass."""
    model_dtype: str = "float32"
    """On the fly: dtype the model runs in: float32, float16 or bfloat16."""
    buffer_rows: int = 65536
    """On the fly: rows in the device shuffle buffer; each buffer-full of the stream is
    shuffled as a block, so a resume replays only the text, not the model."""
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
    verify_store: bool = True
    """Check every shard's checksum before training (xxh3: one read of the store at disk
    speed), so flipped bytes never train silently; --no-verify-store skips it. Shapes and
    sizes are checked against the manifest either way."""
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
    distribute_saes: bool = False
    """Under torchrun, a sweep: each SAE lives on one rank (SAE i on rank i mod world) and
    trains on whole batches that the ranks read a part of each and all-gather; without
    it every SAE is data parallel over all ranks."""


PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse values that would crash or silently misbehave mid-run, naming the flag;
    called before the store is read or anything is written."""

    def bad(flag: str, value: object, want: str) -> ConfigError:
        return ConfigError(f"--{flag} {value} is not usable; give {want}")

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    if cfg.lr is not None and not (finite(cfg.lr) and cfg.lr > 0):
        raise bad("lr", cfg.lr, "a positive finite learning rate such as 5e-4, or leave it out for the default")
    for flag, v in (("batch-size", cfg.batch_size), ("tokens", cfg.tokens), ("expansion", cfg.expansion),
                    ("log-every", cfg.log_every), ("init-rows", cfg.init_rows),
                    ("shard-latents", cfg.shard_latents)):
        if v <= 0:
            raise bad(flag, v, "a positive integer")
    if cfg.n_latents is not None and cfg.n_latents <= 0:
        raise bad("n-latents", cfg.n_latents, "a positive integer (or leave it out: --expansion decides)")
    if cfg.checkpoint_every < 0:
        raise bad("checkpoint-every", cfg.checkpoint_every, "a token count >= 0 (0: only at the end)")
    betas = tuple(cfg.adam_betas)
    if len(betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in betas):
        raise bad("adam-betas", ",".join(map(str, betas)), "two numbers in [0, 1), e.g. --adam-betas 0.9,0.999")
    if not (finite(cfg.adam_eps) and cfg.adam_eps > 0):
        raise bad("adam-eps", cfg.adam_eps, "a small positive number such as 1e-8")
    if not (finite(cfg.grad_clip) and cfg.grad_clip >= 0):
        raise bad("grad-clip", cfg.grad_clip, "a finite norm >= 0 (0 turns clipping off)")
    for flag, v in (("lr-warmup", cfg.lr_warmup), ("lr-decay", cfg.lr_decay)):
        if not (finite(v) and 0 <= v <= 1):
            raise bad(flag, v, "a fraction of training between 0 and 1")
    for flag, v, choices in (("lr-schedule", cfg.lr_schedule, ("linear", "cosine")),
                             ("on-nonfinite", cfg.on_nonfinite, ("skip", "stop")),
                             ("precision", cfg.precision, PRECISIONS)):
        if v not in choices:
            raise bad(flag, repr(v), "one of " + ", ".join(choices))
    if cfg.dead_latents not in (None, "auxk", "resample", "none"):
        raise bad("dead-latents", repr(cfg.dead_latents), "one of auxk, resample, none")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; ConfigError for an unknown name."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


class TF32:
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
