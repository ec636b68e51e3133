"""A dependency-free PNG of the L0 frontiers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from llm_sae.common.png import encode_png

# matplotlib is a heavy dependency for two scatter plots; a raster with a 3×5 pixel font
# written with zlib + struct is enough and always works.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "(": "010100100100010", ")": "010001001001010", "/": "001001010100100",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "_": "000000000000111", ":": "000010000010000",
    "#": "101111101111101", "=": "000111000111000", "+": "000010111010000",
}


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = np.full((h, w, 3), 255, np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int]) -> None:
        x0, x1 = sorted((max(0, x0), min(self.w, x1)))
        y0, y1 = sorted((max(0, y0), min(self.h, y1)))
        self.px[y0:y1, x0:x1] = c

    def line(self, x0: float, y0: float, x1: float, y1: float, c: tuple[int, int, int], t: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for s in np.linspace(0, 1, n):
            x, y = int(round(x0 + s * (x1 - x0))), int(round(y0 + s * (y1 - y0)))
            self.rect(x - t // 2, y - t // 2, x - t // 2 + t, y - t // 2 + t, c)

    def text(self, x: int, y: int, s: str, c: tuple[int, int, int] = (0, 0, 0), scale: int = 2,
             vertical: bool = False) -> None:
        for i, ch in enumerate(s.upper()):
            bits = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for q in range(3):
                    if bits[r * 3 + q] == "1":
                        if vertical:  # rotated 90° counter-clockwise, reading bottom-up
                            px, py = x + r * scale, y - (i * 4 + q) * scale
                        else:
                            px, py = x + (i * 4 + q) * scale, y + r * scale
                        self.rect(px, py, px + scale, py + scale, c)

    def png(self) -> bytes:
        return encode_png(self.px)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


def _panel(cv: _Canvas, x0: int, y0: int, w: int, h: int, pts: list[tuple[float, float, int]],
           groups: list[str], xlabel: str, ylabel: str) -> None:
    black, grey = (0, 0, 0), (225, 225, 225)
    left, bottom = 60, 40
    px0, py0, pw, ph = x0 + left, y0 + 10, w - left - 10, h - bottom - 10
    cv.rect(px0, py0 + ph, px0 + pw, py0 + ph + 1, black)
    cv.rect(px0, py0, px0 + 1, py0 + ph, black)
    fin = [(a, b, i) for a, b, i in pts if math.isfinite(a) and math.isfinite(b)]
    if not fin:
        cv.text(px0 + 10, py0 + 10, "NO DATA")
        return
    xs, ys = [p[0] for p in fin], [p[1] for p in fin]
    xlo, xhi = min(0.0, min(xs)), max(xs) * 1.1 or 1.0
    ypad = (max(ys) - min(ys)) * 0.1 or abs(max(ys)) * 0.1 or 1.0
    ylo, yhi = min(ys) - ypad, max(ys) + ypad
    sx = lambda v: px0 + (v - xlo) / (xhi - xlo) * pw  # noqa: E731
    sy = lambda v: py0 + ph - (v - ylo) / (yhi - ylo) * ph  # noqa: E731
    for t in _ticks(xlo, xhi):
        x = int(sx(t))
        cv.rect(x, py0, x + 1, py0 + ph, grey)
        cv.rect(x, py0 + ph, x + 1, py0 + ph + 5, black)
        lab = _tick_label(t)
        cv.text(x - len(lab) * 4, py0 + ph + 8, lab)
    for t in _ticks(ylo, yhi):
        y = int(sy(t))
        cv.rect(px0 + 1, y, px0 + pw, y + 1, grey)
        cv.rect(px0 - 5, y, px0, y + 1, black)
        lab = _tick_label(t)
        cv.text(px0 - 8 - len(lab) * 8, y - 5, lab)
    cv.text(px0 + pw // 2 - len(xlabel) * 4, py0 + ph + 24, xlabel)
    cv.text(x0 + 4, py0 + ph // 2 + len(ylabel) * 4, ylabel, vertical=True)
    # A line in the frontier's colour joins its SAEs in order of L0.
    for g in set(groups):
        srt = sorted(p for p, gg in zip(pts, groups, strict=True) if gg == g and p in fin)
        for (a, b, i), (c, d, _) in zip(srt, srt[1:], strict=False):
            cv.line(sx(a), sy(b), sx(c), sy(d), _COLORS[i % len(_COLORS)])
    for a, b, i in fin:
        col = _COLORS[i % len(_COLORS)]
        x, y = int(sx(a)), int(sy(b))
        cv.rect(x - 4, y - 4, x + 5, y + 5, col)


def frontier_groups(report: dict[str, Any]) -> list[str]:
    """The frontier each SAE of ``report`` is on: its architecture, and its width where one
    architecture comes in several (a sweep over --expansion), so that a line joins only
    SAEs that differ in L0."""
    entries = list(report["saes"].values())
    widths: dict[str, set[Any]] = {}
    for e in entries:
        widths.setdefault(str(e.get("arch")), set()).add(e.get("n_latents"))
    return [f"{e.get('arch')} n={e.get('n_latents')}" if len(widths[str(e.get("arch"))]) > 1 else str(e.get("arch"))
            for e in entries]


def _shorten(names: list[str]) -> str:
    """Names with their common start said once: topk-x4-k16/32/64 (the font has no comma)."""
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names)
    return head + "/".join(n[len(head):] for n in names) if head else " ".join(names)


def write_frontier_png(report: dict[str, Any], path: str | Path) -> Path:
    """L0 vs FVU and L0 vs loss recovered (mean ablation): one colour and one line per
    frontier (``frontier_groups``), and a legend naming each frontier's SAEs."""
    names = list(report["saes"])
    groups = frontier_groups(report)
    order = list(dict.fromkeys(groups))
    colour = [order.index(g) for g in groups]
    W, H, legend_h = 1000, 420, 24 * ((len(order) + 1) // 2) + 10
    cv = _Canvas(W, H + legend_h)
    nan = float("nan")
    entries = list(report["saes"].values())
    fvu = [(e["sparsity"]["l0"].get("mean") or nan, e["reconstruction"]["fvu"], c)
           for e, c in zip(entries, colour, strict=True)]
    lr = [(e["sparsity"]["l0"].get("mean") or nan, e.get("downstream", {}).get("loss_recovered_mean", nan), c)
          for e, c in zip(entries, colour, strict=True)]
    _panel(cv, 0, 0, W // 2, H, fvu, groups, "L0", "FVU")
    _panel(cv, W // 2, 0, W // 2, H, lr, groups, "L0", "LOSS RECOVERED (MEAN)")
    for i, g in enumerate(order):
        x, y = 70 + (i % 2) * (W // 2), H + 6 + (i // 2) * 24
        cv.rect(x, y, x + 12, y + 12, _COLORS[i % len(_COLORS)])
        members = [n for n, gg in zip(names, groups, strict=True) if gg == g]
        label = g if members == [g] else f"{g}: {_shorten(members)}"
        cv.text(x + 20, y + 1, label if len(label) <= 55 else label[:52] + "...")
    path = Path(path)
    path.write_bytes(cv.png())
    return path
