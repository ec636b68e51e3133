"""The dependency-free PNG writer: valid chunks, exact pixels back, clear errors."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from llm_sae.common.png import encode_png, png_size, write_png


def decode(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, color type, raw scanlines) of an 8-bit PNG, checking every CRC."""
    pos, idat, ihdr = 8, b"", b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        ihdr = body if tag == b"IHDR" else ihdr
        idat += body if tag == b"IDAT" else b""
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", ihdr[:10])
    assert depth == 8
    return w, h, color, zlib.decompress(idat)


@pytest.mark.parametrize("shape, color", [((5, 7), 0), ((4, 6, 3), 2)])
def test_pixels_round_trip(shape, color, tmp_path):
    px = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = write_png(tmp_path / "a.png", px).read_bytes()
    w, h, got_color, raw = decode(data)
    assert (w, h, got_color) == (shape[1], shape[0], color) and png_size(data) == (w, h)
    rows = np.frombuffer(raw, np.uint8).reshape(h, -1)
    assert (rows[:, 0] == 0).all()  # filter type "none" on every scanline
    np.testing.assert_array_equal(rows[:, 1:].reshape(shape), px)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(b"GIF89a" + b"\0" * 30)
