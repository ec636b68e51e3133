"""Reconstruction and sparsity statistics accumulated over a stream of batches."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def fired_mask(sae: Any, z_BN: Tensor, tau: float | None) -> Tensor:
    if tau is not None:
        return z_BN > tau
    fn = getattr(sae, "fired", None)
    return fn(z_BN) if fn is not None else z_BN > 0


@torch.no_grad()
def reconstruct(sae: Any, x_BD: Tensor) -> tuple[Tensor, Tensor]:
    """``(z_BN, x_hat_BD)`` in float32 for any object with ``encode`` and ``decode``."""
    z_BN = sae.encode(x_BD.float())
    return z_BN, sae.decode(z_BN)


class ReconstructionStats:
    """Streaming sums for every row-level metric; float64 so millions of rows stay exact."""

    def __init__(self, n_latents: int, tau: float | None, *, token_ids: bool = True) -> None:
        self.N, self.tau = n_latents, tau
        self.rows = 0
        self.d_in = 0
        self.sum_err2 = self.sum_x2 = self.sum_cos = self.sum_xhx = self.sum_xh2 = 0.0
        self.sum_x_D: Tensor | None = None
        self.fired_N = torch.zeros(n_latents, dtype=torch.float64)
        self.sum_a_N = torch.zeros(n_latents, dtype=torch.float64)
        self.sum_a2_N = torch.zeros(n_latents, dtype=torch.float64)
        self.l0_counts = torch.zeros(n_latents + 1, dtype=torch.float64)
        self.pop_tr: list[Tensor] = []
        self.want_tokens = token_ids
        self.keys: list[Tensor] = []
        self.vals: list[Tensor] = []
        self.token_count: dict[int, int] = {}
        self._tok_counts: list[Tensor] = []

    @torch.no_grad()
    def add(self, sae: Any, x_BD: Tensor, tokens_B: Tensor | None = None, *,
            target_BE: Tensor | None = None) -> None:
        """One batch. A transcoder's prediction (skip path included) is scored against
        ``target_BE``, its output hook's activations, instead of its input."""
        x_BD = x_BD.float()
        z_BN, x_hat_BD = reconstruct(sae, x_BD)
        if target_BE is not None:
            x_hat_BD, x_BD = sae.add_skip(x_hat_BD, x_BD), target_BE.float()
        self.add_coded(z_BN, x_hat_BD, x_BD, tokens_B, sae=sae)

    @torch.no_grad()
    def add_coded(self, z_BN: Tensor, x_hat_BD: Tensor, x_BD: Tensor, tokens_B: Tensor | None = None, *,
                  sae: Any = None) -> None:
        """One batch already encoded and predicted: latents ``z_BN``, the prediction
        ``x_hat_BD`` and what it should be, ``x_BD`` (a CLT's layer is scored this way:
        its output sums several layers' latents). ``sae`` supplies its ``fired`` rule."""
        B, D = x_BD.shape
        self.d_in = D
        xd, xhd = x_BD.double(), x_hat_BD.double()
        self.rows += B
        self.sum_err2 += float((xd - xhd).pow(2).sum())
        self.sum_x2 += float(xd.pow(2).sum())
        sx = xd.sum(0).cpu()
        self.sum_x_D = sx if self.sum_x_D is None else self.sum_x_D + sx
        self.sum_cos += float(F.cosine_similarity(xd, xhd, dim=-1, eps=1e-12).sum())
        self.sum_xhx += float((xd * xhd).sum())
        self.sum_xh2 += float(xhd.pow(2).sum())
        on_BN = fired_mask(sae, z_BN, self.tau)
        self.fired_N += on_BN.sum(0).double().cpu()
        l0_B = on_BN.sum(-1)
        self.l0_counts += torch.bincount(l0_B.cpu(), minlength=self.N + 1).double()[: self.N + 1]
        # float32 per batch (a float64 [B, N] copy would be gigabytes for wide SAEs),
        # accumulated across batches in float64.
        a_BN = z_BN.abs()
        a2_BN = a_BN * a_BN
        self.sum_a_N += a_BN.sum(0).double().cpu()
        self.sum_a2_N += a2_BN.sum(0).double().cpu()
        self.pop_tr.append(_tr(a_BN.mean(1), a2_BN.mean(1), a_BN.shape[1]).float().cpu())
        del a_BN, a2_BN
        if tokens_B is not None and self.want_tokens:
            rows, feats = on_BN.nonzero(as_tuple=True)
            toks = tokens_B.to(rows.device)[rows]
            self.keys.append((toks * self.N + feats).cpu())
            self.vals.append(z_BN[rows, feats].float().cpu())
            self._tok_counts.append(tokens_B.cpu())

    def summary(self, dense_threshold: float) -> dict[str, Any]:
        n, D = max(self.rows, 1), max(self.d_in, 1)
        assert self.sum_x_D is not None
        total_var = self.sum_x2 - float(self.sum_x_D.pow(2).sum()) / n
        fvu = self.sum_err2 / total_var if total_var > 0 else float("nan")
        freq_N = (self.fired_N / n).numpy()
        l0 = self.l0_counts.numpy()
        pop_tr = torch.cat(self.pop_tr).numpy() if self.pop_tr else np.zeros(0)
        life_tr = _treves_rolls_from_sums(self.sum_a_N, self.sum_a2_N, n).numpy()
        recon = {
            "rows": self.rows,
            "mse": self.sum_err2 / (n * D),
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "cosine": self.sum_cos / n,
            "shrinkage": self.sum_xhx / self.sum_xh2 if self.sum_xh2 > 0 else float("nan"),
            "relative_error": math.sqrt(self.sum_err2 / self.sum_x2) if self.sum_x2 > 0 else float("nan"),
        }
        sparsity = {
            "l0": _count_summary(l0),
            "dead_frac": float((freq_N == 0).mean()),
            "dense_frac": float((freq_N > dense_threshold).mean()),
            "dense_threshold": dense_threshold,
            "lifetime_sparsity": {**quantiles(freq_N), "log10_histogram": _log10_hist(freq_N)},
            "lifetime_treves_rolls": quantiles(life_tr[np.isfinite(life_tr)]),
            "population_sparsity": quantiles(
                np.repeat(np.arange(len(l0)), l0.astype(np.int64)) / max(self.N, 1)
            ),
            "population_treves_rolls": quantiles(pop_tr[np.isfinite(pop_tr)]),
        }
        return {"reconstruction": recon, "sparsity": sparsity}

    def per_feature(self) -> dict[str, Any]:
        n = max(self.rows, 1)
        out: dict[str, Any] = {"lifetime_sparsity": (self.fired_N / n).tolist()}
        sel = self.selectivity()
        if sel is not None:
            out["selectivity_gini"] = _nan_to_none(sel[0].tolist())
            out["top_token_share"] = _nan_to_none(sel[1].tolist())
            out["top_token"] = sel[2].tolist()
        return out

    def selectivity(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per latent: Gini of mean activation over token ids, top-token share, top token."""
        if not self._tok_counts:
            return None
        toks = torch.cat(self._tok_counts)
        keys = torch.cat(self.keys) if self.keys else torch.zeros(0, dtype=torch.long)
        vals = torch.cat(self.vals) if self.vals else torch.zeros(0)
        return selectivity(keys // self.N, keys % self.N, vals, toks, self.N)


def selectivity(
    tok_M: Tensor, feat_M: Tensor, val_M: Tensor, tokens_R: Tensor, n_latents: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gini over token ids of each latent's mean activation per token id (see module doc).

    ``(tok_M, feat_M, val_M)`` are the active (token id, latent, value) entries of the
    evaluated rows, ``tokens_R`` the token id of every row. Returns (gini_N, top_share_N,
    top_token_N); NaN/-1 for latents that never fire. The zeros of the token ids a latent
    never fires on are accounted for analytically, so nothing of size vocab × latents
    is ever formed.
    """
    uniq_tok, tok_count = torch.unique(tokens_R, return_counts=True)
    n_tok = uniq_tok.numel()
    key = tok_M.long() * n_latents + feat_M.long()
    ukey, inv = torch.unique(key, return_inverse=True)
    s = torch.zeros(ukey.numel(), dtype=torch.float64).index_add_(0, inv, val_M.double())
    t, f = ukey // n_latents, ukey % n_latents
    count_t = tok_count[torch.searchsorted(uniq_tok, t)].double()
    m = s / count_t  # mean activation of latent f over the rows with token t
    # Ascending m within each latent: sort by m, then stably by latent.
    o1 = torch.argsort(m, stable=True)
    o2 = torch.argsort(f[o1], stable=True)
    order = o1[o2]
    m, f, t = m[order], f[order], t[order]
    nnz_N = torch.bincount(f, minlength=n_latents)
    start_N = torch.cumsum(nnz_N, 0) - nnz_N
    j = torch.arange(m.numel()) - start_N[f] + 1  # 1-based rank among the nonzeros
    i = (n_tok - nnz_N[f] + j).double()  # rank among all n_tok values, zeros first
    sum_N = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, f, m)
    wsum_N = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, f, i * m)
    # Gini of ascending x_1..x_n: 2Σ i·x_i / (n Σ x) − (n + 1)/n.
    gini_N = 2 * wsum_N / (n_tok * sum_N) - (n_tok + 1) / n_tok
    max_N = torch.zeros(n_latents, dtype=torch.float64).scatter_reduce_(0, f, m, "amax")
    last = start_N + nnz_N - 1  # the largest m of each latent comes last
    top_tok_N = torch.full((n_latents,), -1, dtype=torch.long)
    alive = nnz_N > 0
    top_tok_N[alive] = t[last[alive]]
    dead = sum_N <= 0
    gini_N[dead] = float("nan")
    share_N = torch.where(dead, torch.full_like(max_N, float("nan")), max_N / sum_N.clamp_min(1e-300))
    return gini_N.float(), share_N.float(), top_tok_N


def _treves_rolls_from_sums(s1: Tensor, s2: Tensor, n: int) -> Tensor:
    return _tr(s1 / n, s2 / n, n)


def _tr(m1: Tensor, m2: Tensor, n: int) -> Tensor:
    # 1 − (E a)²/E a², normalised by its maximum 1 − 1/n; NaN where a ≡ 0.
    with torch.no_grad():
        r = 1 - m1.pow(2) / m2.where(m2 > 0, torch.full_like(m2, float("nan")))
        return r / (1 - 1 / n) if n > 1 else r


def _count_summary(counts: np.ndarray) -> dict[str, Any]:
    """Mean, std and quantiles of an integer-valued distribution given as counts per value."""
    total = counts.sum()
    if total == 0:
        return {"mean": None}
    v = np.arange(len(counts))
    mean = float((v * counts).sum() / total)
    std = float(math.sqrt(max(0.0, (v * v * counts).sum() / total - mean * mean)))
    cdf = np.cumsum(counts) / total
    q = {f"p{int(p * 100)}": int(np.searchsorted(cdf, p - 1e-12)) for p in (0.05, 0.25, 0.5, 0.75, 0.95)}
    nz = np.nonzero(counts)[0]
    return {"mean": mean, "std": std, "min": int(nz.min()), **q, "max": int(nz.max())}


def quantiles(a: np.ndarray) -> dict[str, Any]:
    if a.size == 0:
        return {"mean": None}
    qs = np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95])
    out = {"mean": float(a.mean())}
    out.update({k: float(v) for k, v in zip(("p5", "p25", "p50", "p75", "p95"), qs, strict=True)})
    return out


def _log10_hist(freq: np.ndarray) -> dict[str, Any]:
    live = freq[freq > 0]
    edges = np.arange(-8.0, 0.0001, 0.5)
    counts = np.histogram(np.log10(np.clip(live, 1e-8, 1)), bins=edges)[0] if live.size else np.zeros(len(edges) - 1)
    return {"log10_edges": edges.tolist(), "counts": [int(c) for c in counts], "n_dead": int((freq == 0).sum())}


def _nan_to_none(xs: list[float]) -> list[float | None]:
    return [None if not math.isfinite(x) else x for x in xs]
