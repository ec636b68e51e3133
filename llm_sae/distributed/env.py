"""torchrun set-up and rank failures."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from llm_sae.errors import LlmSaeError


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> tuple[int, int]:
    """(rank, world_size), initialising torch.distributed under torchrun if needed.

    NCCL when CUDA is available, gloo otherwise. ``LLM_SAE_DIST_TIMEOUT`` (seconds,
    default 600) bounds how long a rank waits in a collective for a peer that died.
    """
    if env_world_size() > 1 and dist.is_available():
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":  # one GPU per rank; NCCL collectives run on the current one
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            timeout = datetime.timedelta(
                seconds=float(os.environ.get("LLM_SAE_DIST_TIMEOUT", "600"))
            )
            dist.init_process_group(backend, timeout=timeout)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankFailed(LlmSaeError):
    """One rank of a distributed job raised; the job ends and the last checkpoint stays."""


def _peer_failed(e: BaseException) -> bool:
    """A collective broke because another rank went away (not this rank's own error)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        m in text
        for m in (
            "closed by peer",
            "remote worker",
            "Connection reset",
            "NCCL communicator was aborted",
        )
    )


@contextlib.contextmanager
def report_rank_failure(what: str = "training") -> Iterator[None]:
    """On an exception in a distributed job: say which rank failed and why, tear down the
    process group, and re-raise so the process exits non-zero and torchrun stops the
    other ranks. Checkpoints are written by rank 0 atomically, so the last one is intact.
    A rank whose collective broke because a peer died says only that (``RankFailed``),
    so the root cause is the one traceback in the log.
    """
    try:
        yield
    except BaseException as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        if _peer_failed(e):
            raise RankFailed(
                f"rank {rank} of {world} stopped during {what} because another rank failed "
                "(its message is above); the last checkpoint is intact: rerun the same "
                "command to resume"
            ) from None
        print(
            f"llm-sae: rank {rank} of {world} failed during {what}: {type(e).__name__}: {e}\n"
            "torchrun stops the other ranks; the last checkpoint (written atomically by "
            "rank 0) is intact, so rerunning the same command resumes from it.",
            file=sys.stderr,
            flush=True,
        )
        raise
