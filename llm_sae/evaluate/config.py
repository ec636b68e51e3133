"""What an evaluation is asked to measure."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llm_sae.errors import LlmSaeError


class EvalError(LlmSaeError):
    """SAEs and a store (or model) that cannot be evaluated together."""


@dataclass
class EvalConfig:
    """Evaluate one or more SAEs on a store (and the model it came from)."""

    sae: list[str]
    """Saved SAE directory (cfg.json + sae.safetensors), hf://ORG/REPO[/SUBFOLDER],
    saelens://RELEASE/SAE_ID, or a sweep folder (all its SAEs, as L0 frontiers per
    architecture); repeat or comma-separate to compare several. A cross-layer transcoder
    (the folder llm-sae train-clt wrote) is evaluated alone, one row per layer."""
    store: str | None = None
    """Activation store at the SAEs' hook; its last --eval-rows rows are evaluated, and its
    manifest names the model, hook and dataset (default: the store every SAE records in
    its train_cfg.json, when they name the same one). Not for transcoders: each run's own
    pair of stores is used, and the model with their MLPs replaced is evaluated."""
    out: str | None = None
    """Output directory for eval.json, eval.txt and frontier.png (default: FIRST_SAE/eval,
    or SWEEP/eval)."""
    eval_rows: int = 65536
    """Evaluate the store's last N rows. train.py samples every row of its store, so these
    are truly held out only when the SAE was trained on another store (e.g. one harvested
    from another --split): harvest a separate evaluation store for a clean split."""
    batch_size: int = 2048
    """Rows per SAE forward pass (the dense latents of a batch, rows × latents floats, must fit)."""
    active_threshold: float | None = None
    """τ: a latent is active when z > τ (default: the architecture's rule, z > 0, or > 0.5 for sigmoid units)."""
    dense_threshold: float = 0.1
    """A latent active on more than this share of rows counts as dense."""
    downstream: bool = True
    """Splice each SAE into the model and measure next-token loss, KL and loss recovered."""
    model: str | None = None
    """Model for the downstream metrics (default: the store's model)."""
    dataset: str | None = None
    """Text for the downstream metrics (default: the store's dataset, continuing after the
    text the store was harvested from, so the contexts are unseen)."""
    dataset_config: str | None = None
    """Config name of a hub --dataset."""
    split: str | None = None
    """Split of --dataset (default: the store's, else train)."""
    text_column: str | None = None
    """Text column of --dataset (default: the store's, else text)."""
    n_contexts: int = 128
    """Contexts (sequences) for the downstream metrics."""
    context_length: int | None = None
    """Tokens per context (default: the store's context length)."""
    model_batch_size: int = 8
    """Contexts per model forward pass."""
    exclude_special: bool = True
    """Leave BOS/EOS/pad positions clean and out of the loss averages (harvest leaves them
    out of the store, so the SAE never saw them)."""
    amortization: bool = True
    """Compare the encoder with FISTA sparse coding at the same L0 on the same dictionary."""
    amortization_rows: int = 256
    """Rows sparse-coded for the amortization gap. Each FISTA iteration costs about
    4·rows·n_latents·d_in FLOPs, times iterations × bisection steps (≤ 20): on a CPU with a
    wide SAE, lower this or pass --no-amortization."""
    fista_iters: int = 200
    """FISTA iterations per solve (each λ of the bisection; stops early once converged)."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, ..."""
    progress: bool = True
    """Show progress bars."""


T = TypeVar("T")


def from_train_cfg(run_dir: str | Path, read: Callable[[dict[str, Any]], T], needs: str, fix: str) -> T:
    """``read`` applied to the train_cfg.json of ``run_dir``; a missing or unusable file (or
    what ``read`` raises on it: OSError, ValueError, KeyError, TypeError) is one EvalError
    saying the run ``needs`` it, why, and the ``fix``."""
    try:
        return read(json.loads((Path(run_dir) / "train_cfg.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{run_dir} needs {needs} ({e}); {fix}") from None
