"""An HTTP server whose idle connections cost a file descriptor, not a thread.

``ThreadingHTTPServer`` starts a thread per connection at accept time, so 3,000 local
connections that never send a byte hold 3,000 threads and leave a real request waiting
for minutes. Here a connection waits in a selector until it has bytes to read; only then
does one of a fixed number of worker threads handle it. Connections idle longer than
``idle_timeout`` are closed, and at most ``max_waiting`` wait at once (the oldest is
dropped for a new one), so neither threads nor descriptors grow without bound.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import HTTPServer
from typing import Any


class BoundedHTTPServer(HTTPServer):
    """``HTTPServer`` with a bounded worker pool and idle connections parked in a selector."""

    workers = 16
    """Requests handled at once; each also has the handler's socket timeout."""
    max_waiting = 1024
    """Connections accepted but not yet sending; beyond it the oldest is closed."""
    idle_timeout = 10.0
    """Seconds a connection may stay silent before it is closed."""
    request_queue_size = 256
    """The listen backlog (socketserver's default, 5, makes the kernel drop the SYNs of a
    burst of connections, which then retry only after one second and more)."""

    def __init__(self, address: tuple[str, int], handler: type, bind_and_activate: bool = True) -> None:
        super().__init__(address, handler, bind_and_activate)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        """Serve until ``shutdown``; the worker threads end with it."""
        self._stop.clear()
        self._stopped.clear()
        waiting: dict[socket.socket, tuple[Any, float]] = {}  # insertion order = age
        try:
            with selectors.DefaultSelector() as sel, ThreadPoolExecutor(
                self.workers, thread_name_prefix="llm-sae-serve"
            ) as pool:
                sel.register(self.socket, selectors.EVENT_READ)
                while not self._stop.is_set():
                    for key, _ in sel.select(poll_interval):
                        if key.fileobj is self.socket:
                            self._accept(sel, waiting)
                        else:
                            conn = key.fileobj
                            sel.unregister(conn)
                            addr, _ = waiting.pop(conn)  # type: ignore[call-overload]
                            pool.submit(self._handle, conn, addr)
                    now = time.monotonic()
                    for conn in [c for c, (_, t) in waiting.items() if now - t > self.idle_timeout]:
                        self._drop(sel, waiting, conn)
                for conn in list(waiting):
                    self._drop(sel, waiting, conn)
        finally:
            self._stopped.set()

    def _accept(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, tuple[Any, float]]) -> None:
        """Accept every connection the backlog holds (up to 64 a round)."""
        self.socket.setblocking(False)
        try:
            for _ in range(64):
                try:
                    conn, addr = self.socket.accept()
                except OSError:  # none left, the client left, or descriptors ran out
                    return
                conn.setblocking(True)
                if len(waiting) >= self.max_waiting:
                    self._drop(sel, waiting, next(iter(waiting)))
                waiting[conn] = (addr, time.monotonic())
                sel.register(conn, selectors.EVENT_READ)
        finally:
            self.socket.setblocking(True)

    def _drop(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, tuple[Any, float]],
              conn: socket.socket) -> None:
        sel.unregister(conn)
        waiting.pop(conn, None)
        self.shutdown_request(conn)

    def _handle(self, conn: socket.socket, addr: Any) -> None:
        try:
            self.finish_request(conn, addr)
        except Exception:  # noqa: BLE001 - one bad connection must not end the worker
            self.handle_error(conn, addr)
        finally:
            self.shutdown_request(conn)

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and wait until it has returned."""
        self._stop.set()
        self._stopped.wait()
