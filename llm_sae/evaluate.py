"""Evaluate trained SAEs in the numbers the field uses, so they can be compared.

For each SAE: reconstruction on a fixed range of store rows (MSE, fraction of variance
unexplained, cosine, shrinkage), sparsity (L0 distribution, dead/dense latents, lifetime
and population sparsity, per-feature selectivity over token ids), the downstream cost
(next-token loss and KL with the reconstruction spliced into the model, as loss recovered
against zero- and mean-ablation) and the amortization gap (the encoder against FISTA at
the same L0 on the same dictionary). Writes ``eval.json``, ``eval.txt`` and, for several
SAEs, ``frontier.png`` (the sparsity–fidelity frontier).

Formulas (all sums over the evaluated rows, x the activation, x̂ the reconstruction):

- FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: the mean of the evaluated rows); explained variance = 1 − FVU.
- MSE = Σ‖x − x̂‖² / (rows · d_in); cosine: mean over rows of cos(x, x̂).
- shrinkage γ = Σ⟨x̂, x⟩ / Σ‖x̂‖² = argmin_γ Σ‖γx̂ − x‖² (Wright & Sharkey 2024): γ > 1
  means the SAE systematically under-reconstructs (L1 shrinkage).
- lifetime sparsity of a latent: share of rows on which it is active (z > τ, or the
  architecture's own rule when τ is not given); population sparsity of a row: share of
  latents active on it. Both also as Treves–Rolls sparseness 1 − (E a)²/E a² over the
  other axis, normalised to [0, 1] (0: evenly spread, 1: one-hot).
- selectivity of a latent: with m_t its mean activation over the rows whose token id is
  t (t ranging over the token ids present in the evaluated rows, absent activations
  counting as 0), the Gini coefficient of (m_t) — 0 when the latent responds equally to
  every token, → 1 when it responds to one token only — and the top-token share
  max_t m_t / Σ_t m_t.
- loss recovered = (CE_ablate − CE_sae) / (CE_ablate − CE_clean), for zero- and
  mean-ablation (the mean is the store's E[x]).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llm_sae.config import ConfigError, add_arguments, from_args, to_dict
from llm_sae.errors import DataError, LlmSaeError, StoreError
from llm_sae.png import encode_png


class EvalError(LlmSaeError):
    """SAEs and a store (or model) that cannot be evaluated together."""


@dataclass
class EvalConfig:
    """Evaluate one or more SAEs on a store (and the model it came from)."""

    sae: list[str]
    """Saved SAE directory (cfg.json + sae.safetensors); repeat or comma-separate to compare several."""
    store: str
    """Activation store at the SAEs' hook; its last --eval-rows rows are evaluated, and its
    manifest names the model, hook and dataset."""
    out: str | None = None
    """Output directory for eval.json, eval.txt and frontier.png (default: FIRST_SAE/eval)."""
    eval_rows: int = 65536
    """Evaluate the store's last N rows. train.py samples every row of its store, so these
    are truly held out only when the SAE was trained on another store (e.g. one harvested
    from another --split): harvest a separate evaluation store for a clean split."""
    batch_size: int = 2048
    """Rows per SAE forward pass (the dense latents of a batch, rows × latents floats, must fit)."""
    active_threshold: float | None = None
    """τ: a latent is active when z > τ (default: the architecture's rule, z > 0, or > 0.5 for sigmoid units)."""
    dense_threshold: float = 0.1
    """A latent active on more than this share of rows counts as dense."""
    downstream: bool = True
    """Splice each SAE into the model and measure next-token loss, KL and loss recovered."""
    model: str | None = None
    """Model for the downstream metrics (default: the store's model)."""
    dataset: str | None = None
    """Text for the downstream metrics (default: the store's dataset, continuing after the
    text the store was harvested from, so the contexts are unseen)."""
    dataset_config: str | None = None
    """Config name of a hub --dataset."""
    split: str | None = None
    """Split of --dataset (default: the store's, else train)."""
    text_column: str | None = None
    """Text column of --dataset (default: the store's, else text)."""
    n_contexts: int = 128
    """Contexts (sequences) for the downstream metrics."""
    context_length: int | None = None
    """Tokens per context (default: the store's context length)."""
    model_batch_size: int = 8
    """Contexts per model forward pass."""
    exclude_special: bool = True
    """Leave BOS/EOS/pad positions clean and out of the loss averages (harvest leaves them
    out of the store, so the SAE never saw them)."""
    amortization: bool = True
    """Compare the encoder with FISTA sparse coding at the same L0 on the same dictionary."""
    amortization_rows: int = 256
    """Rows sparse-coded for the amortization gap. Each FISTA iteration costs about
    4·rows·n_latents·d_in FLOPs, times iterations × bisection steps (≤ 20): on a CPU with a
    wide SAE, lower this or pass --no-amortization."""
    fista_iters: int = 200
    """FISTA iterations per solve (each λ of the bisection; stops early once converged)."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, ..."""
    progress: bool = True
    """Show progress bars."""


# ======================================================================== SAE helpers


def _fired(sae: Any, z_BN: Tensor, tau: float | None) -> Tensor:
    if tau is not None:
        return z_BN > tau
    fn = getattr(sae, "fired", None)
    return fn(z_BN) if fn is not None else z_BN > 0


@torch.no_grad()
def reconstruct(sae: Any, x_BD: Tensor) -> tuple[Tensor, Tensor]:
    """``(z_BN, x_hat_BD)`` in float32 for any object with ``encode`` and ``decode``."""
    z_BN = sae.encode(x_BD.float())
    return z_BN, sae.decode(z_BN)


# ============================================================ reconstruction & sparsity


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
    def add(self, sae: Any, x_BD: Tensor, tokens_B: Tensor | None = None) -> None:
        x_BD = x_BD.float()
        z_BN, x_hat_BD = reconstruct(sae, x_BD)
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
        on_BN = _fired(sae, z_BN, self.tau)
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
            "lifetime_sparsity": {**_quantiles(freq_N), "log10_histogram": _log10_hist(freq_N)},
            "lifetime_treves_rolls": _quantiles(life_tr[np.isfinite(life_tr)]),
            "population_sparsity": _quantiles(
                np.repeat(np.arange(len(l0)), l0.astype(np.int64)) / max(self.N, 1)
            ),
            "population_treves_rolls": _quantiles(pop_tr[np.isfinite(pop_tr)]),
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


def _quantiles(a: np.ndarray) -> dict[str, Any]:
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


# ============================================================================ amortization


@torch.no_grad()
def amortization_gap(sae: Any, x_BD: Tensor, *, iters: int = 300, tau: float | None = None) -> dict[str, Any]:
    """The encoder's reconstruction at its L0 against FISTA's at the same mean L0.

    The dictionary is the SAE's (rows of W_dec, normalised — a row's scale only
    reparameterises its code — plus b_dec). ``fista_refit`` also refits the values on
    FISTA's support by least squares (z ≥ 0), removing the L1 shrinkage, which is the
    fairer comparison for SAEs trained without an L1 penalty.
    """
    from llm_sae.sparse_coding import fista, fista_matched_l0

    if not hasattr(sae, "W_dec") or not hasattr(sae, "b_dec"):
        return {"skipped": "the SAE has no W_dec/b_dec dictionary"}
    x_BD = x_BD.float()
    z_BN, x_hat_BD = reconstruct(sae, x_BD)
    target = float(_fired(sae, z_BN, tau).sum(-1).float().mean())
    W_ND = sae.W_dec.detach().float()
    D_ND = W_ND / W_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b_D = sae.b_dec.detach().float()
    if target >= D_ND.shape[0] or target <= 0:
        return {"skipped": f"encoder L0 {target:.1f} leaves nothing to match"}
    m = fista_matched_l0(x_BD, D_ND, target, bias_D=b_D, nonnegative=True, iters=iters)
    x_fista = m.z_BN @ D_ND + b_D
    z_refit = fista(x_BD, D_ND, 0.0, bias_D=b_D, nonnegative=True, iters=iters, z0_BN=m.z_BN,
                    mask_BN=(m.z_BN != 0).float())
    x_refit = z_refit @ D_ND + b_D
    var = float((x_BD - x_BD.mean(0)).pow(2).sum())

    def fvu(xh: Tensor) -> float:
        return float((x_BD - xh).pow(2).sum()) / var if var > 0 else float("nan")

    out = {
        "rows": x_BD.shape[0], "l0_encoder": target, "l0_fista": m.l0, "lambda": m.lam,
        "bisection_steps": m.steps, "fvu_encoder": fvu(x_hat_BD), "fvu_fista": fvu(x_fista),
        "fvu_fista_refit": fvu(x_refit),
    }
    out["gap"] = out["fvu_encoder"] - min(out["fvu_fista"], out["fvu_fista_refit"])
    return out


# ============================================================================= downstream


def _hook_fn(replace: Any, keep_BL: Tensor | None) -> Any:
    def fn(x: Tensor, hook: Any) -> Tensor:
        shape = x.shape
        x_hat = replace(x.reshape(-1, shape[-1]).float()).reshape(shape).to(x.dtype)
        if keep_BL is not None:
            x_hat = torch.where(keep_BL[..., None], x, x_hat)
        return x_hat

    return fn


class _LossAcc:
    def __init__(self) -> None:
        self.ce = self.kl = 0.0
        self.n = 0

    def add(self, logp_clean: Tensor, logits: Tensor, targets: Tensor, mask: Tensor) -> None:
        logp = logits[:, :-1].float().log_softmax(-1)
        ce = -logp.gather(-1, targets[..., None]).squeeze(-1)
        kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
        self.ce += float(ce[mask].double().sum())
        self.kl += float(kl[mask].double().sum())
        self.n += int(mask.sum())

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"ce": self.ce / n, "kl": self.kl / n}


@torch.no_grad()
def downstream_metrics(
    model: Any,
    hook: str,
    saes: dict[str, Any],
    contexts_CL: Tensor,
    *,
    mean_D: Tensor,
    special_ids: list[int] = (),  # type: ignore[assignment]
    exclude_special: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Next-token CE and KL to the clean model with each SAE spliced in at ``hook``.

    The hook replaces the activation at every position (but special tokens when
    ``exclude_special``, which also leaves those positions out of the averages) with the
    SAE's reconstruction, zeros, or ``mean_D``. Returns clean/zero/mean numbers and, per
    SAE, ce, kl, ce_delta and loss recovered against both ablations.
    """
    from tqdm.auto import tqdm

    device = next(iter(model.parameters())).device
    mean_D = mean_D.float().to(device)
    replacers: dict[str, Any] = {
        "zero_ablation": lambda x: torch.zeros_like(x),
        "mean_ablation": lambda x: mean_D.expand_as(x),
    }
    for name, sae in saes.items():
        replacers[name] = lambda x, sae=sae: reconstruct(sae, x)[1]
    acc = {"clean": _LossAcc(), **{k: _LossAcc() for k in replacers}}
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=device)
    bar = tqdm(total=len(contexts_CL), disable=not progress, desc="downstream", unit="ctx", file=sys.stderr)
    for s in range(0, len(contexts_CL), batch_size):
        toks_BL = contexts_CL[s : s + batch_size].to(device)
        keep_BL = torch.isin(toks_BL, special) if exclude_special and special.numel() else None
        mask = torch.ones_like(toks_BL[:, :-1], dtype=torch.bool) if keep_BL is None else ~keep_BL[:, :-1]
        targets = toks_BL[:, 1:]
        clean = model(toks_BL, return_type="logits")
        logp_clean = clean[:, :-1].float().log_softmax(-1)
        acc["clean"].add(logp_clean, clean, targets, mask)
        for name, rep in replacers.items():
            logits = model.run_with_hooks(toks_BL, fwd_hooks=[(hook, _hook_fn(rep, keep_BL))], return_type="logits")
            acc[name].add(logp_clean, logits, targets, mask)
        bar.update(len(toks_BL))
    bar.close()
    res = {k: a.result() for k, a in acc.items()}
    ce_clean = res["clean"]["ce"]
    out: dict[str, Any] = {
        "tokens": acc["clean"].n,
        "ce_clean": ce_clean,
        "ce_zero_ablation": res["zero_ablation"]["ce"],
        "ce_mean_ablation": res["mean_ablation"]["ce"],
        "kl_zero_ablation": res["zero_ablation"]["kl"],
        "kl_mean_ablation": res["mean_ablation"]["kl"],
        "saes": {},
    }
    for name in saes:
        ce = res[name]["ce"]
        out["saes"][name] = {
            "ce": ce,
            "ce_delta": ce - ce_clean,
            "kl": res[name]["kl"],
            "loss_recovered_zero": _recovered(out["ce_zero_ablation"], ce, ce_clean),
            "loss_recovered_mean": _recovered(out["ce_mean_ablation"], ce, ce_clean),
        }
    return out


def _recovered(ce_ablate: float, ce: float, ce_clean: float) -> float:
    den = ce_ablate - ce_clean
    return (ce_ablate - ce) / den if abs(den) > 1e-12 else float("nan")


def eval_contexts(
    store: Any, tokenizer: Any, cfg: EvalConfig, n_ctx: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Token contexts for the downstream metrics, and a note of where the text came from.

    With no --dataset, the store's dataset is read from just after the text the store was
    harvested from (its progress), so the contexts are ones the SAE never saw; when that
    text has run out, from the start of the dataset (noted in the report).
    """
    from llm_sae.data import StreamPos, iter_documents, pack_contexts

    spec = store.manifest.get("dataset") or {}
    L = cfg.context_length or store.context_length or 128
    if n_ctx:
        L = min(L, n_ctx)
    if cfg.dataset is not None:
        name, config = cfg.dataset, cfg.dataset_config
        start, source = StreamPos(), "--dataset"
    else:
        name, config = spec.get("name"), spec.get("config")
        if not name or str(name).startswith("<python"):
            raise EvalError(
                f"the store at {store.path} does not name a readable dataset ({name!r}); pass "
                "--dataset with text for the downstream metrics, or --no-downstream"
            )
        prog = store.manifest.get("progress") or {}
        start = StreamPos(int(prog.get("doc", 0)), int(prog.get("offset", 0))) if "doc" in prog else StreamPos()
        source = "store dataset, after the harvested text"
    split = cfg.split or spec.get("split") or "train"
    column = cfg.text_column or spec.get("text_column") or "text"

    def take(start: StreamPos) -> list[np.ndarray]:
        docs = iter_documents(name, config=config, split=split, text_column=column)
        out = []
        for toks, _ in pack_contexts(docs, tokenizer, L, start=start):
            out.append(toks)
            if len(out) >= cfg.n_contexts:
                break
        return out

    ctx = take(start)
    if len(ctx) < cfg.n_contexts and start != StreamPos():
        warnings.warn(
            f"only {len(ctx)} unseen contexts after the harvested text of {name!r}; using the "
            "dataset from its start (text the SAE may have been trained on)", stacklevel=2,
        )
        ctx, source = take(StreamPos()), "store dataset from its start (overlaps the harvested text)"
    if not ctx:
        raise DataError(f"dataset {name!r} gives no context of {L} tokens; give more text or a smaller --context-length")
    info = {"dataset": str(name), "split": split, "source": source, "contexts": len(ctx), "context_length": L}
    return torch.from_numpy(np.stack(ctx)), info


# ============================================================================== main entry


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = Path(p).resolve().name or str(p)
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


@torch.no_grad()
def evaluate_saes(
    saes: dict[str, Any], store: Any, cfg: EvalConfig, *, model: Any = None
) -> dict[str, Any]:
    """Evaluate already-loaded SAE(-like) objects (``encode``/``decode``) on a store.

    ``model`` (a TransformerBridge) is needed only for the downstream metrics; ``evaluate``
    loads it from the store's manifest.
    """
    from tqdm.auto import tqdm

    n = store.n_rows
    if n == 0:
        raise StoreError(f"the store at {store.path} has no rows to evaluate")
    start = max(0, n - cfg.eval_rows)
    device = next(iter(saes.values())).W_dec.device if all(hasattr(s, "W_dec") for s in saes.values()) else torch.device("cpu")
    report: dict[str, Any] = {
        "store": str(store.path), "model": store.model, "hook": store.hook,
        "eval_rows": {"start": start, "stop": n, "note": "the store's last rows; see --eval-rows"},
        "config": to_dict(cfg), "saes": {},
    }
    stats = {}
    for name, sae in saes.items():
        N = _n_latents(sae, store.d_in)
        stats[name] = ReconstructionStats(N, cfg.active_threshold)
    bar = tqdm(total=n - start, disable=not cfg.progress, desc="reconstruction", unit="row", file=sys.stderr)
    for s in range(start, n, cfg.batch_size):
        e = min(n, s + cfg.batch_size)
        x_BD = store.acts(s, e).to(device, torch.float32)
        tok_B = store.token_ids(s, e)
        for name, sae in saes.items():
            stats[name].add(sae, x_BD, tok_B)
        bar.update(e - s)
    bar.close()
    per_feature = {}
    for name, sae in saes.items():
        st = stats[name]
        entry = {"arch": getattr(getattr(sae, "cfg", None), "arch", type(sae).__name__),
                 "n_latents": st.N, "k": getattr(getattr(sae, "cfg", None), "k", None)}
        entry.update(st.summary(cfg.dense_threshold))
        pf = st.per_feature()
        per_feature[name] = pf
        if "selectivity_gini" in pf:
            g = np.array([x for x in pf["selectivity_gini"] if x is not None])
            sh = np.array([x for x in pf["top_token_share"] if x is not None])
            entry["selectivity"] = {"gini": _quantiles(g), "top_token_share": _quantiles(sh),
                                    "n_token_ids": int(torch.unique(torch.cat(st._tok_counts)).numel())}
        report["saes"][name] = entry
    if cfg.amortization:
        m = min(cfg.amortization_rows, n - start)
        x_BD = store.acts(start, start + m).to(device, torch.float32)
        for name, sae in saes.items():
            report["saes"][name]["amortization"] = amortization_gap(
                sae, x_BD, iters=cfg.fista_iters, tau=cfg.active_threshold
            )
    if cfg.downstream and model is not None:
        tok = model.tokenizer
        contexts, info = eval_contexts(store, tok, cfg, getattr(model.cfg, "n_ctx", None))
        special = store.manifest.get("special_token_ids")
        if special is None:
            special = [t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None]
        ds = downstream_metrics(
            model, store.hook, saes, contexts, mean_D=store.mean, special_ids=special,
            exclude_special=cfg.exclude_special, batch_size=cfg.model_batch_size, progress=cfg.progress,
        )
        per_sae = ds.pop("saes")
        report["downstream"] = {**ds, "text": info}
        for name in saes:
            report["saes"][name]["downstream"] = per_sae[name]
    report["per_feature"] = per_feature
    return report


def _n_latents(sae: Any, d_in: int) -> int:
    n = getattr(sae, "n_latents", None)
    if n is not None:
        return int(n)
    with torch.no_grad():
        dev = sae.W_dec.device if hasattr(sae, "W_dec") else "cpu"
        return int(sae.encode(torch.zeros(1, d_in, device=dev)).shape[-1])


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Load the SAEs (and the model), evaluate, write eval.json/eval.txt/frontier.png."""
    from llm_sae.sae import load_sae
    from llm_sae.store import open_store

    if not cfg.sae:
        raise ConfigError("give at least one --sae DIR")
    if cfg.eval_rows <= 0 or cfg.batch_size <= 0:
        raise ConfigError("--eval-rows and --batch-size must be positive")
    store = open_store(cfg.store)
    device = _device(cfg.device)
    saes = {}
    for name, path in zip(_names(cfg.sae), cfg.sae, strict=True):
        sae = load_sae(path, device=device)
        if sae.d_in != store.d_in:
            raise EvalError(
                f"SAE {path} takes d_in={sae.d_in} but the store {cfg.store} holds d_in={store.d_in} "
                f"(hook {store.hook}); evaluate it on a store of the hook it was trained on"
            )
        _check_hook(path, store)
        saes[name] = sae
    model = None
    if cfg.downstream:
        from llm_sae.harvest import check_hooks, load_model

        model_name = cfg.model or store.model
        if not model_name or not store.hook:
            raise EvalError(
                f"the store at {cfg.store} does not name its model/hook; pass --model, or --no-downstream"
            )
        model = load_model(model_name, device=str(device))
        check_hooks(model, [store.hook], model_name)
    report = evaluate_saes(saes, store, cfg, model=model)
    out = Path(cfg.out) if cfg.out else Path(cfg.sae[0]) / "eval"
    write_report(report, out)
    return report


def _check_hook(sae_dir: str, store: Any) -> None:
    """Warn when the SAE's training store was harvested at another hook than --store."""
    tc = Path(sae_dir) / "train_cfg.json"
    try:
        train_store = json.loads(tc.read_text()).get("store")
        m = json.loads((Path(train_store) / "manifest.json").read_text())
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if m.get("hook") and store.hook and m["hook"] != store.hook:
        warnings.warn(
            f"SAE {sae_dir} was trained at hook {m['hook']} but --store is at {store.hook}", stacklevel=2
        )


# ================================================================================ output


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width comparison table, one row per SAE."""
    cols = [
        ("sae", lambda n, e: n, "<"),
        ("arch", lambda n, e: e["arch"], "<"),
        ("latents", lambda n, e: str(e["n_latents"]), ">"),
        ("L0", lambda n, e: _fmt(e["sparsity"]["l0"].get("mean"), ".1f"), ">"),
        ("FVU", lambda n, e: _fmt(e["reconstruction"]["fvu"]), ">"),
        ("MSE", lambda n, e: _fmt(e["reconstruction"]["mse"], ".4g"), ">"),
        ("cos", lambda n, e: _fmt(e["reconstruction"]["cosine"]), ">"),
        ("shrink", lambda n, e: _fmt(e["reconstruction"]["shrinkage"], ".3f"), ">"),
        ("dead", lambda n, e: _fmt(e["sparsity"]["dead_frac"], ".3f"), ">"),
        ("dense", lambda n, e: _fmt(e["sparsity"]["dense_frac"], ".3f"), ">"),
        ("gini", lambda n, e: _fmt(e.get("selectivity", {}).get("gini", {}).get("p50"), ".3f"), ">"),
    ]
    if "downstream" in report:
        cols += [
            ("ΔCE", lambda n, e: _fmt(e["downstream"]["ce_delta"]), ">"),
            ("KL", lambda n, e: _fmt(e["downstream"]["kl"]), ">"),
            ("LR(zero)", lambda n, e: _fmt(e["downstream"]["loss_recovered_zero"]), ">"),
            ("LR(mean)", lambda n, e: _fmt(e["downstream"]["loss_recovered_mean"]), ">"),
        ]
    if any("fvu_fista" in e.get("amortization", {}) for e in report["saes"].values()):
        cols += [
            ("FVU@L0 fista", lambda n, e: _fmt(e.get("amortization", {}).get("fvu_fista_refit")), ">"),
            ("amort.gap", lambda n, e: _fmt(e.get("amortization", {}).get("gap")), ">"),
        ]
    rows = [[c[0] for c in cols]] + [[c[1](n, e) for c in cols] for n, e in report["saes"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(format(v, f"{c[2]}{w}") for v, c, w in zip(r, cols, widths, strict=True)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    head = [f"store {report['store']}  hook {report['hook']}  rows "
            f"{report['eval_rows']['start']}..{report['eval_rows']['stop']}"]
    if "downstream" in report:
        d = report["downstream"]
        head.append(
            f"next-token CE over {d['tokens']} tokens: clean {d['ce_clean']:.4f}, zero-ablation "
            f"{d['ce_zero_ablation']:.4f}, mean-ablation {d['ce_mean_ablation']:.4f} ({d['text']['source']})"
        )
    foot = ("FVU = Σ‖x−x̂‖²/Σ‖x−x̄‖²; shrink = Σ⟨x̂,x⟩/Σ‖x̂‖²; gini = median selectivity over token ids; "
            "LR = loss recovered; FVU@L0 fista = FISTA (refit) at the encoder's L0")
    return "\n".join(head + [""] + lines + ["", foot]) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """eval.json (per-feature arrays in features.json), eval.txt, and frontier.png for ≥ 2 SAEs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_feature = report.get("per_feature", {})
    summary = {k: v for k, v in report.items() if k != "per_feature"}
    (out / "eval.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    (out / "features.json").write_text(json.dumps(_json_safe(per_feature)) + "\n")
    (out / "eval.txt").write_text(format_table(report))
    if len(report["saes"]) >= 2:
        write_frontier_png(report, out / "frontier.png")
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


# ==================================================== a dependency-free PNG frontier plot
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
    # A line joins SAEs of the same architecture, in order of L0: its frontier.
    for g in set(groups):
        srt = sorted(p for p, gg in zip(pts, groups, strict=True) if gg == g and p in fin)
        for (a, b, _), (c, d, _) in zip(srt, srt[1:], strict=False):
            cv.line(sx(a), sy(b), sx(c), sy(d), (170, 170, 170))
    for a, b, i in fin:
        col = _COLORS[i % len(_COLORS)]
        x, y = int(sx(a)), int(sy(b))
        cv.rect(x - 4, y - 4, x + 5, y + 5, col)


def write_frontier_png(report: dict[str, Any], path: str | Path) -> Path:
    """L0 vs FVU and L0 vs loss recovered (mean ablation), one colour per SAE, with a legend."""
    names = list(report["saes"])
    W, H, legend_h = 1000, 420, 24 * ((len(names) + 1) // 2) + 10
    cv = _Canvas(W, H + legend_h)
    nan = float("nan")
    fvu = [(e["sparsity"]["l0"].get("mean") or nan, e["reconstruction"]["fvu"], i)
           for i, e in enumerate(report["saes"].values())]
    lr = [(e["sparsity"]["l0"].get("mean") or nan, e.get("downstream", {}).get("loss_recovered_mean", nan), i)
          for i, e in enumerate(report["saes"].values())]
    archs = [str(e.get("arch")) for e in report["saes"].values()]
    _panel(cv, 0, 0, W // 2, H, fvu, archs, "L0", "FVU")
    _panel(cv, W // 2, 0, W // 2, H, lr, archs, "L0", "LOSS RECOVERED (MEAN)")
    for i, n in enumerate(names):
        x, y = 70 + (i % 2) * (W // 2), H + 6 + (i // 2) * 24
        cv.rect(x, y, x + 12, y + 12, _COLORS[i % len(_COLORS)])
        cv.text(x + 20, y + 1, f"{n} ({report['saes'][n]['arch']})"[:55])
    path = Path(path)
    path.write_bytes(cv.png())
    return path


# =================================================================================== CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, EvalConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = from_args(EvalConfig, args)
    report = evaluate(cfg)
    print(format_table(report), end="")
    out = Path(cfg.out) if cfg.out else Path(cfg.sae[0]) / "eval"
    print(f"\nwrote {out / 'eval.json'}" + (f" and {out / 'frontier.png'}" if len(report["saes"]) > 1 else ""))
    return 0

