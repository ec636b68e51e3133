"""Row norms: their distribution (kept in the manifest) and the outlier rows left out.

A few tokens (attention sinks, massive activations) can have norms hundreds of times the
median; they dominate an SAE's loss and kill latents early. The writer keeps a histogram
of every row's norm (fixed log-spaced bins, so it merges, resumes and serialises exactly)
and, with ``max_norm_multiple`` M, leaves out rows above M × the running median, counting
them per token id in the manifest so nothing is lost silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm_sae.errors import StoreError

# Bins: [10^LO, 10^HI) in PER_DECADE log-spaced steps, plus one below and one above.
LO, HI, PER_DECADE = -4, 6, 20
N_BINS = (HI - LO) * PER_DECADE + 2


class NormHistogram:
    """Counts of row norms in log-spaced bins (±6% resolution); quantiles interpolate."""

    def __init__(self, counts: list[int] | None = None) -> None:
        self.counts = np.zeros(N_BINS, np.int64) if counts is None else np.asarray(counts, np.int64)
        if self.counts.shape != (N_BINS,):
            self.counts = np.zeros(N_BINS, np.int64)  # another binning: start afresh

    @staticmethod
    def bins(norms_N: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            b = np.floor((np.log10(np.asarray(norms_N, np.float64)) - LO) * PER_DECADE)
        return (np.clip(np.nan_to_num(b, nan=-1, neginf=-1, posinf=N_BINS), -1, N_BINS - 2) + 1).astype(np.int64)

    def add(self, norms_N: np.ndarray) -> None:
        if len(norms_N):
            self.counts += np.bincount(self.bins(norms_N), minlength=N_BINS)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Approximate q-quantile of the norms added (geometric interpolation in a bin)."""
        n = self.total
        if n == 0:
            return float("nan")
        cum = np.cumsum(self.counts)
        rank = q * (n - 1) + 0.5
        i = int(np.searchsorted(cum, rank, side="left"))
        before = cum[i] - self.counts[i]
        frac = (rank - before) / max(int(self.counts[i]), 1)
        if i == 0:
            return 10.0**LO
        if i == N_BINS - 1:
            return 10.0**HI
        return 10.0 ** (LO + (i - 1 + frac) / PER_DECADE)

    def to_json(self) -> dict[str, Any]:
        return {"lo": LO, "hi": HI, "per_decade": PER_DECADE, "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> NormHistogram:
        if not d or (d.get("lo"), d.get("hi"), d.get("per_decade")) != (LO, HI, PER_DECADE):
            return cls()
        return cls(list(d["counts"]))


class RowStats:
    """Running statistics of the rows a store holds, plus the norms of every row seen.

    Sums are float64 added in a fixed order, so a resumed run reproduces them exactly."""

    def __init__(self, d_in: int) -> None:
        self.count, self.sum_norm = 0, 0.0
        self.sum_x = np.zeros(d_in, np.float64)
        self.hist = NormHistogram()

    def add(self, xf_ND: np.ndarray, norms_N: np.ndarray) -> None:
        self.sum_norm += float(norms_N.sum(dtype=np.float64))
        self.sum_x += xf_ND.sum(0, dtype=np.float64)
        self.count += len(xf_ND)

    def to_json(self) -> dict[str, Any]:
        c = max(self.count, 1)
        return {"count": self.count, "sum_norm": self.sum_norm, "sum": self.sum_x.tolist(),
                "mean_norm": self.sum_norm / c, "mean": (self.sum_x / c).tolist(),
                "norm_hist": self.hist.to_json()}

    @classmethod
    def from_json(cls, d_in: int, st: Mapping[str, Any]) -> RowStats:
        out = cls(d_in)
        out.count, out.sum_norm = int(st["count"]), float(st["sum_norm"])
        out.sum_x = np.asarray(st["sum"], np.float64)
        out.hist = NormHistogram.from_json(st.get("norm_hist"))
        return out


def check_multiple(m: float | None) -> float | None:
    if m is not None and not m > 1:
        raise StoreError(f"--max-norm-multiple must be above 1 (a multiple of the median norm), got {m}")
    return None if m is None else float(m)


class OutlierLog:
    """Rows left out of a store: how many, and how often each token id was among them."""

    def __init__(self, max_norm_multiple: float | None, count: int = 0,
                 token_ids: dict[str, int] | None = None) -> None:
        self.max_norm_multiple, self.count = max_norm_multiple, count
        self.token_ids: dict[str, int] = dict(token_ids or {})

    def record(self, token_ids_N: np.ndarray) -> None:
        for t in np.asarray(token_ids_N).tolist():
            self.token_ids[str(t)] = self.token_ids.get(str(t), 0) + 1
        self.count += len(token_ids_N)

    def to_json(self) -> dict[str, Any]:
        return {"max_norm_multiple": self.max_norm_multiple, "count": self.count,
                "token_ids": dict(self.token_ids)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None, max_norm_multiple: float | None) -> OutlierLog:
        d = d or {}
        return cls(max_norm_multiple, int(d.get("count", 0)), d.get("token_ids"))


def row_norms(x_ND: np.ndarray) -> np.ndarray:
    x = np.asarray(x_ND, np.float32)
    return np.sqrt(np.einsum("nd,nd->n", x, x))


def norm_limit(hist: NormHistogram, norms_N: np.ndarray, multiple: float) -> float:
    """multiple × the median of every norm seen so far including this batch's."""
    h = NormHistogram(hist.counts.copy())
    h.add(norms_N)
    return multiple * h.quantile(0.5)


def joint_outliers(writers: Mapping[str, Any], rows: Mapping[str, Any]) -> np.ndarray | None:
    """Rows to leave out of every store of one batch: an outlier at any hook is left out of
    all of them, so stores harvested together stay row-aligned (a transcoder's pair).
    None when no writer filters outliers."""
    mask = None
    for h, x_ND in rows.items():
        w = writers[h]
        if not getattr(w, "max_norm_multiple", None):
            continue
        xf = x_ND.detach().float().cpu().numpy() if hasattr(x_ND, "detach") else np.asarray(x_ND, np.float32)
        norms = row_norms(xf)
        over = norms > norm_limit(w.stats.hist, norms, w.max_norm_multiple)
        mask = over if mask is None else mask | over
    return mask


def describe(stats: Mapping[str, Any], outliers: Mapping[str, Any] | None) -> list[str]:
    """``store info`` lines: norm quantiles, the tail relative to the median, what was left out."""
    hist = NormHistogram.from_json(stats.get("norm_hist"))
    lines = []
    if hist.total:
        qs = [(p, hist.quantile(p / 100)) for p in (1, 50, 99, 99.9)]
        med = qs[1][1]
        lines.append("‖x‖ quantiles " + "  ".join(f"p{p:g} {v:.4g}" for p, v in qs)
                     + f"  max≈{_top(hist):.4g}")
        tail = []
        for m in (10, 100):
            b = NormHistogram.bins(np.array([m * med]))[0]
            tail.append(f">{m}×median {int(hist.counts[b + 1:].sum()):,}")
        lines.append("‖x‖ tail     " + "  ".join(tail) + f"  (of {hist.total:,} rows seen, ±6%)")
        per = hist.counts[1:-1].reshape(HI - LO, PER_DECADE).sum(1)
        dec = [f"1e{LO + i}:{int(c):,}" for i, c in enumerate(per) if c]
        lines.append("‖x‖ decades  " + " ".join(dec))
    if outliers:
        ids = sorted(outliers.get("token_ids", {}).items(), key=lambda kv: -kv[1])[:8]
        lines.append(
            f"outliers     {outliers['count']:,} rows left out (norm > "
            f"{outliers['max_norm_multiple']:g}× running median); top token ids "
            + (", ".join(f"{t}×{c}" for t, c in ids) or "none")
        )
    return lines


def _top(hist: NormHistogram) -> float:
    nz = np.nonzero(hist.counts)[0]
    i = int(nz[-1]) if len(nz) else 0
    return 10.0 ** (LO + i / PER_DECADE) if 0 < i < N_BINS - 1 else (10.0**HI if i else math.nan)
