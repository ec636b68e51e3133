"""``--distribute-saes``: under torchrun, each SAE of a sweep lives on one rank.

Data parallel copies every SAE to every rank and all-reduces every gradient; for a sweep
of many SAEs that is many all-reduces of whole weight matrices a step. Here SAE i lives on
rank i mod world and trains as in one process; the ranks share only the data: each reads
its equal part of every global batch and all-gathers the whole batch, so every SAE sees
exactly the batches of the one-process sweep (and so ends bit-identical to it).

Each round of the stream begins with an all-reduce of "does any rank still train?", so a
rank whose SAEs have finished (or resumed from later checkpoints) keeps reading and
gathering with the others until all are done; no rank waits on a collective alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llm_sae.common.device import resolve_device
from llm_sae.config import ConfigError
from llm_sae.distributed.comm import all_gather_cat, all_reduce_
from llm_sae.distributed.parallel import Parallel
from llm_sae.sources.base import ActivationSource
from llm_sae.train.config import TrainConfig
from llm_sae.train.loop import fit_together
from llm_sae.train.run import InitSample, start_trainer


class OwnSAEs(Parallel):
    """The one-process hooks, on this rank's own device: the SAEs here are this rank's alone."""

    def device(self, name: str) -> torch.device:
        return resolve_device(name, per_rank=True)


class GatheredBatches:
    """The global batches, each assembled from every rank's part with one all-gather."""

    def __init__(self, parts: Iterator[tuple[torch.Tensor, ...]], device: torch.device) -> None:
        self.parts, self.device = parts, device

    def __iter__(self) -> GatheredBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        got = self._round(need=True)
        assert got is not None  # this rank needs one, so the round happened
        return got

    def drain(self) -> None:
        """Keep gathering (for the others) until no rank needs another batch."""
        while self._round(need=False) is not None:
            pass

    def _round(self, need: bool) -> tuple[torch.Tensor, ...] | None:
        flag = torch.tensor([int(need)], device=self.device)
        if not all_reduce_(flag, dist.group.WORLD, dist.ReduceOp.MAX).item():
            return None
        # (x_BD, rows_B) or a transcoder's (x_BD, rows_B, y_BE): every part gathered; the
        # row indices go back to the host, where the trainer reads them.
        x_BD, rows_B, *y = next(self.parts)
        gather = lambda t: all_gather_cat(t.to(self.device), dist.group.WORLD)  # noqa: E731
        return (gather(x_BD), gather(rows_B).cpu(), *(gather(t) for t in y))


def train_spread(cfgs: list[TrainConfig], names: list[str], par: Parallel, source: ActivationSource,
                 out: Path) -> list[Any]:
    """Train SAE i of the sweep on rank i mod world; returns this rank's trainers (exported)."""
    world, rank = par.world_size, par.rank
    if par.n_shards > 1:
        raise ConfigError("--distribute-saes and --shard-latents > 1 do not combine; choose one")
    if len(cfgs) < world:
        raise ConfigError(
            f"--distribute-saes puts at least one SAE on each of {world} ranks, and the sweep has "
            f"{len(cfgs)}; launch fewer ranks or sweep more SAEs"
        )
    base = cfgs[0]
    if base.batch_size % world:
        raise ConfigError(f"--batch-size {base.batch_size} does not split over {world} ranks; use a multiple of {world}")
    own = OwnSAEs()
    init = InitSample(source)
    trainers = [start_trainer(c, own, source, out / n, init)
                for i, (c, n) in enumerate(zip(cfgs, names, strict=True)) if i % world == rank]
    device = own.device(base.device)
    first = torch.tensor([min(t.batches_seen for t in trainers)], device=device)
    start = int(all_reduce_(first, dist.group.WORLD, dist.ReduceOp.MIN).item())
    batches = GatheredBatches(iter(source.batches(
        base.batch_size, seed=base.seed, start_batch=start, device=device, dtype=torch.float32,
        batch_slice=(rank, world),
    )), device)
    todo = [t for t in trainers if t.step_idx < t.total_steps]
    if todo:
        fit_together(todo, _from(batches, start, todo), progress=par.is_main)
    batches.drain()
    for t in todo:
        t.save_checkpoint(t.out_dir / "checkpoint")
    for t, n in zip(trainers, [n for i, n in enumerate(names) if i % world == rank], strict=True):
        t.export(out / n)
    return trainers


def _from(batches: GatheredBatches, start: int, trainers: list[Any]) -> Iterator[tuple[torch.Tensor, ...]]:
    """The gathered stream from global batch ``start`` up to where these trainers begin
    (``fit_together`` expects its stream to start at their earliest position)."""
    for _ in range(min(t.batches_seen for t in trainers) - start):
        next(batches)
    yield from batches
