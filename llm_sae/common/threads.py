"""Threads: background prefetch with bounded depth, and torch thread counts restored on exit."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def iter_in_background(items: Iterable[Any], depth: int, *, name: str) -> Iterator[Any]:
    """Iterate ``items`` on a daemon thread, keeping up to ``depth`` items ready.

    Order is unchanged; an exception in the producer is re-raised in the consumer; a
    consumer that stops early (break, close, garbage collection) stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # re-raised on the consuming thread
            put(e)

    threading.Thread(target=produce, daemon=True, name=name).start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class num_threads:
    """Restore the torch thread count on exit, however the block ends."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.n)
