"""The training loop: one stream of batches, one or many trainers.

A sweep reads (and shuffles) each batch once and hands the same tensor to every trainer;
a single run is a sweep of one. Each trainer keeps its own state, so the loop only decides
who steps on which batch: a trainer steps on the batch whose index equals its
``batches_seen``. After a resume the stream restarts at the trainer furthest behind, and
a trainer whose checkpoint is newer waits until the stream reaches its own position, so
every trainer sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from llm_sae.errors import DataError

if TYPE_CHECKING:
    from llm_sae.train.trainer import Trainer


def fit_together(trainers: Sequence[Trainer], batches: Iterable[Any], *, progress: bool = True) -> None:
    """Step every trainer through ``batches`` (x_BD, (x_BD, rows_B) or (x_BD, rows_B,
    y_BE)), which must start
    at batch ``min(t.batches_seen)``, until each has taken its ``total_steps``."""
    main = trainers[0].par.is_main  # rank 0 alone shows progress, logs and writes
    done = lambda: min(t.step_idx for t in trainers)  # noqa: E731
    bar = tqdm(total=max(t.total_steps for t in trainers), initial=done(), unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    # One SAE shows its metrics on the bar; a sweep's go to each SAE's own log.jsonl.
    sinks = [t.open_sinks(bar if len(trainers) == 1 else None) for t in trainers]
    position = min(t.batches_seen for t in trainers)  # index of the next batch in the stream
    it: Iterator[Any] = iter(batches)
    try:
        while any(t.step_idx < t.total_steps for t in trainers):
            item = next(it, None)
            if item is None:
                raise DataError(
                    f"the batch iterator ran out after {position} batches, before step "
                    f"{max(t.total_steps for t in trainers)}; use a looping reader or fewer --tokens"
                )
            # (x_BD, rows_B) or, from a paired source, (x_BD, rows_B, y_BE).
            x_BD, rows_B, *y = item if isinstance(item, (tuple, list)) else (item, None)
            before = done()
            for t, s in zip(trainers, sinks, strict=True):
                if t.batches_seen == position and t.step_idx < t.total_steps:
                    if t.step(x_BD, rows_B, *y) is not None:
                        t.after_step(s)
            position += 1
            bar.update(done() - before)
        for t in trainers:
            t.check_loss()
    finally:
        bar.close()
        for s in sinks:
            for sink in s:
                sink.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
