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
    consumer that stops early (break, close, garbage collection) stops the producer and
    waits for it to end.

    Waiting matters: a looping reader's producer is always busy with the next batch, in
    torch or numpy code that runs without the GIL. Left running, it was still inside such
    a call when the process exited, and a daemon thread that takes the GIL back during
    interpreter shutdown is ended with pthread_exit, whose unwinding through torch's
    noexcept frames aborts the process ("terminate called without an active exception"):
    the 1-in-6 SIGABRT of a rank at the end of tests/test_distributed.py's 2-D mesh test.
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
        it = iter(items)
        try:
            for item in it:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # re-raised on the consuming thread
            put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator's own clean-up runs here, on its thread

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
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
        if thread is not threading.current_thread():
            thread.join()


class num_threads:
    """Restore the torch thread count on exit, however the block ends."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.n)
