"""Fault points for crash tests: a test names a point and the process dies there."""

from __future__ import annotations

import os


def maybe_kill(point: str) -> None:
    """Test hook: SIGKILL this process at a named point of the write path.

    ``LLM_SAE_TEST_KILL=POINT:N`` kills at the N-th time (1-based) ``POINT`` is reached,
    POINT in {mid_file, before_manifest, after_manifest, before_swap, mid_swap}. Used by
    the crash tests only.
    """
    spec = os.environ.get("LLM_SAE_TEST_KILL")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != point:
        return
    KILL_COUNTS[point] = KILL_COUNTS.get(point, 0) + 1
    if KILL_COUNTS[point] >= int(n or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


KILL_COUNTS: dict[str, int] = {}
