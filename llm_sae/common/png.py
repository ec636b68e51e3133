"""PNG files from numpy pixel arrays with zlib and struct only: no imaging dependency.

Used for eval's frontier plot and for pictures of dictionary atoms.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(px: np.ndarray) -> bytes:
    """The PNG bytes of ``px``: uint8 [H, W] (grayscale) or [H, W, 3] (RGB), 8 bits."""
    px = np.ascontiguousarray(px)
    if px.dtype != np.uint8 or px.ndim not in (2, 3) or (px.ndim == 3 and px.shape[2] != 3):
        raise ValueError(f"need uint8 [H, W] or [H, W, 3] pixels, got {px.dtype} {px.shape}")
    h, w = px.shape[:2]
    color_type = 0 if px.ndim == 2 else 2
    # Each scanline starts with its filter type, 0 (none).
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, px: np.ndarray) -> Path:
    """Write ``px`` (see ``encode_png``) to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(encode_png(px))
    return path


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header; ValueError if ``data`` is not a PNG."""
    if data[:8] != SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    w, h = struct.unpack(">II", data[16:24])
    return w, h
