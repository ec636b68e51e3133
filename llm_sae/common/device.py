"""Device names to torch devices: one resolver for every stage."""

from __future__ import annotations

import os

import torch

from llm_sae.config import ConfigError


def resolve_device(name: str | None, *, per_rank: bool = False) -> torch.device:
    """``auto``/None: CUDA when there is one, else the CPU. ``per_rank``: under torchrun an
    unindexed ``cuda`` means this process's GPU (LOCAL_RANK). A CUDA device that does not
    exist is a ConfigError before any work starts."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {name!r} is not a device ({e}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
        if dev.index is None and per_rank:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {dev} does not exist: this machine has {torch.cuda.device_count()} "
                "GPU(s); use cuda:0 .. cuda:N-1 or auto"
            )
    return dev
