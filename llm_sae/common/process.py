"""Process-wide tuning that only a command (never library code) opts in to."""

from __future__ import annotations

import ctypes


def return_large_blocks_to_os() -> None:
    """glibc: serve blocks of 4 MB and more (a batch's [B, D] temporaries) from mmap.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MB),
    so after the first step the [B, D] temporaries live on its heap, which fragments and
    holds 40-80 MB more than the step ever uses at once: peak memory varied between 1.42x
    and 1.51x the floor from run to run (scripts/bench_train.py). A fixed threshold
    gives each such block back on free (1.42x every run, for ~15 ms of page faults a
    step); the trim threshold keeps smaller blocks on the heap as before. Process-wide;
    a no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
