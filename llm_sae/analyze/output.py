"""Writing the analysis folder: summary, index and one record per feature."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.analyze.accumulate import FINE_BINS, SEQ_MUL, FeatureAccumulator, pair_hash
from llm_sae.common.analysis_files import FORMAT_VERSION
from llm_sae.common.faults import maybe_kill
from llm_sae.config import to_dict
from llm_sae.errors import StoreError


def _r(x: float) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def round4(a: Any) -> np.ndarray:
    """Round to 4 significant digits, vectorised; the results print as short decimals
    (an integer divided by a power of ten is the double nearest that decimal)."""
    a = np.array(a, dtype=np.float64)
    nz = np.isfinite(a) & (a != 0)
    x = a[nz]
    e = np.floor(np.log10(np.abs(x))).astype(np.int64) - 3
    r = np.empty_like(x)
    neg = e < 0
    r[neg] = np.round(x[neg] * 10.0 ** (-e[neg])) / 10.0 ** (-e[neg])
    r[~neg] = np.round(x[~neg] / 10.0 ** e[~neg]) * 10.0 ** e[~neg]
    a[nz] = r
    return a


def _lst(a: Any) -> list[float | None]:
    """A rounded JSON list; NaN/Inf (no value) become null."""
    return [v if math.isfinite(v) else None for v in round4(a).tolist()]


def _round_windows(w: np.ndarray) -> np.ndarray:
    w = round4(w)
    w[~np.isfinite(w)] = np.nan  # float16 overflow or "no row": both written as null
    return w


def _edge_cells(max_N: torch.Tensor, exp_N: torch.Tensor, n_bins: int, G: int = FINE_BINS) -> torch.Tensor:
    """[N, n_bins+1] fine-cell indices of n_bins near-equal bins covering [0, max]:
    c_0 = 0 < c_1 < ... < c_n = the cell holding max, plus one. Since max ≥ U/2, at least
    G/2 + 1 cells are in use, so n_bins ≤ G/2 bins are never empty of cells."""
    scale = torch.exp2((-exp_N).double().clamp(max=1000) + math.log2(G))
    used = (max_N.double() * scale).floor().long().add(1).clamp(1, G)
    j = torch.arange(n_bins + 1, dtype=torch.float64)
    return torch.floor(j[None, :] * used[:, None].double() / n_bins + 0.5).long()


def _density_histogram(dens: np.ndarray) -> dict[str, Any]:
    live = dens[dens > 0]
    lo = min(-1.0, math.floor(float(np.log10(live.min())) * 4) / 4) if live.size else -1.0
    edges = np.arange(lo, 0.0001, 0.25)
    counts = np.histogram(np.log10(live), bins=edges)[0] if live.size else np.zeros(len(edges) - 1, int)
    return {"log10_edges": [round(float(x), 3) for x in edges], "counts": counts.tolist(),
            "n_dead": int((dens == 0).sum())}


def _l0_summary(l0_counts: np.ndarray) -> dict[str, Any]:
    total = int(l0_counts.sum())
    if total == 0:
        return {"mean": None, "median": None, "p10": None, "p90": None, "max": None,
                "histogram": {"edges": [], "counts": []}}
    vals = np.arange(len(l0_counts))
    cdf = np.cumsum(l0_counts) / total
    q = lambda p: int(np.searchsorted(cdf, p))  # noqa: E731
    mx = int(vals[l0_counts > 0].max())
    if mx < 64:
        edges = np.arange(mx + 2)
    else:
        edges = np.unique(np.linspace(0, mx + 1, 51).round().astype(int))
    counts = np.add.reduceat(l0_counts[: edges[-1]], edges[:-1]) if len(edges) > 1 else l0_counts
    return {"mean": _r(float((vals * l0_counts).sum() / total)), "median": q(0.5), "p10": q(0.1),
            "p90": q(0.9), "max": mx, "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


class _Tokens:
    """Token ids → display strings, and windows of tokens from the store's sequences."""

    def __init__(self, strings: list[str] | None, store: Any) -> None:
        self.strings, self.store = strings, store
        self.has_seqs = any("seqs" in sh["files"] for sh in store.shards)

    def s(self, i: int) -> str:
        if self.strings is not None and 0 <= i < len(self.strings):
            return self.strings[i]
        return f"<id {i}>"

    def many(self, ids: list[int]) -> list[str]:
        S = self.strings
        if S is None:
            return [f"<id {i}>" for i in ids]
        n = len(S)
        return [S[i] if 0 <= i < n else f"<id {i}>" for i in ids]

    def contexts(self, seqs: list[int]) -> dict[int, np.ndarray]:
        seqs = sorted({s for s in seqs if s >= 0})
        if not seqs or not self.has_seqs:
            return {}
        try:
            toks = self.store.sequence_tokens(seqs).numpy()
        except StoreError:
            return {}
        return dict(zip(seqs, toks.tolist(), strict=True))


def _example(row: int, seqpos: int, act: float, win: list, before: int, ctx: dict, tk: _Tokens) -> dict:
    """One example; ``act`` and ``win`` (a list with NaN for "no row") are already rounded."""
    seq, pos = divmod(seqpos, SEQ_MUL) if seqpos >= 0 else (-1, -1)
    full = ctx.get(seq)
    if full is not None:
        a, b = max(0, pos - before), min(len(full), pos - before + len(win))
        ids, acts, peak = full[a:b], win[a - (pos - before) : b - (pos - before)], pos - a
    else:  # no stored contexts: show the token alone
        ids, acts, peak = [int(tk.store.token_ids(row, row + 1)[0])], win[before : before + 1], 0
    acts = [None if v != v else (v or 0) for v in acts]  # zeros as 0: shorter JSON
    if 0 <= peak < len(acts):
        acts[peak] = act
    return {"row": row, "seq": seq, "pos": pos, "act": act, "peak": peak, "tokens": tk.many(ids), "acts": acts}


def interval_selection(acc: FeatureAccumulator, n_bins: int, per_bin: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Choose the interval examples of every feature at once.

    Returns (edges [N, n_bins+1] in fine cells, pick_bin [N, R·p]: the bin each reservoir
    entry was chosen for, or -1). A final bin draws from the reservoir entries whose value
    lies in it; each entry stands for (its cell's count / samples kept in that cell)
    activations, and ``per_bin`` are drawn by weighted sampling without replacement
    (Efraimidis–Spirakis: the largest log(u)/w, u a hash of (row, feature)).
    """
    assert acc.res is not None
    N, G, R, res = acc.n, acc.G, acc.R, acc.res
    P = R * res.p
    dev = acc.device
    val = res.val.view(N, P).double()
    row = res.row.view(N, P)
    valid = res.prim.view(N, P) < res.EMPTY
    scale = torch.exp2((-acc.exp).double().clamp(max=1000) + math.log2(G))
    cell = (val * scale[:, None]).floor().clamp(0, G - 1).long()
    cell_r = cell // (G // R)
    n_r = acc.fine.view(N, R, G // R).sum(-1).double()
    s_r = torch.zeros(N, R, dtype=torch.float64, device=dev).scatter_add_(1, cell_r, valid.double())
    w = n_r.gather(1, cell_r) / s_r.gather(1, cell_r).clamp_min(1)
    f_NP = torch.arange(N, device=dev)[:, None].expand(N, P)
    u = (pair_hash(row.clamp_min(0), f_NP, seed + 1).double() + 0.5) / 2.0**32
    score = torch.where(valid, u.log() / w.clamp_min(1e-300), -math.inf)
    edges = _edge_cells(acc.max, acc.exp, n_bins, G)
    bin_ = torch.searchsorted(edges, cell, right=True) - 1
    bin_ = torch.where(valid, bin_.clamp(0, n_bins - 1), n_bins)
    # Per feature: order by (bin, score desc, row); rank within bin; keep the first per_bin.
    o = torch.argsort(row, dim=1, stable=True)
    o = o.gather(1, torch.argsort(-score.gather(1, o), dim=1, stable=True))
    o = o.gather(1, torch.argsort(bin_.gather(1, o), dim=1, stable=True))
    b_sorted = bin_.gather(1, o)
    start = torch.ones_like(b_sorted, dtype=torch.bool)
    start[:, 1:] = b_sorted[:, 1:] != b_sorted[:, :-1]
    ar = torch.arange(P, device=dev)[None, :].expand(N, P)
    rank = ar - torch.where(start, ar, 0).cummax(1).values
    chosen = (rank < per_bin) & (b_sorted < n_bins)
    pick = torch.full((N, P), -1, dtype=torch.int64, device=dev)
    pick.scatter_(1, o, torch.where(chosen, b_sorted, -1))
    return edges, pick


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_output(cfg, store, sae, acc, counts, strings, tok, logits, logit_info, neighbours, model_name) -> dict:
    """Write vocab.json, features.jsonl and the shards; returns the summary (not yet written)."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    N, T, G = acc.n, max(1, counts["tokens_analysed"]), acc.G
    if strings is not None:
        special = sorted(int(i) for i in getattr(tok, "all_special_ids", []))
        write_json(out / "vocab.json", {"tokens": strings, "special_ids": special})
    tk = _Tokens(strings, store)
    cnt = acc.count.cpu().numpy()
    mean = round4((acc.sum.cpu() / acc.count.cpu().clamp_min(1)).numpy())
    mx = round4(acc.max.cpu().numpy())
    dens = cnt / T
    log_dens = round4(np.log10(np.maximum(dens, 1e-300)))
    dens_r = round4(dens)
    # Histograms and interval bins of every feature at once, exact from the fine cells.
    width = torch.exp2(acc.exp.double().clamp(min=-1000)) / G
    cum = torch.cat([torch.zeros(N, 1, dtype=torch.int64, device=acc.device), acc.fine.long().cumsum(1)], 1)
    h_cells = _edge_cells(acc.max, acc.exp, cfg.hist_bins, G)
    h_edges = round4((h_cells * width[:, None]).cpu().numpy())
    h_counts = cum.gather(1, h_cells).diff(dim=1).cpu().numpy()
    if acc.res is not None:
        i_cells, pick = interval_selection(acc, cfg.n_bins, cfg.per_bin, cfg.seed)
        pick = pick.cpu().numpy()
        P = acc.R * acc.res.p
        res = [t.view(N, P, *t.shape[2:]) for t in (acc.res.row, acc.res.val, acc.res.seqpos, acc.res.win)]
    else:
        i_cells = _edge_cells(acc.max, acc.exp, cfg.n_bins, G)
        pick, res = None, None
    i_edges = round4((i_cells * width[:, None]).cpu().numpy())
    i_counts = cum.gather(1, i_cells).diff(dim=1).cpu().numpy()
    i_share = round4(i_counts / np.maximum(cnt, 1)[:, None])
    top = None
    if acc.top is not None:
        top = [acc.top.row, acc.top.val, acc.top.seqpos, acc.top.win]
        top_n = (acc.top.prim < acc.top.EMPTY).sum(1).cpu().numpy()
    nb_vals, nb_idx = neighbours[0].numpy(), neighbours[1].numpy()
    nb_vals = round4(nb_vals)
    if logits is not None:
        pv, pi, sv, si = (t.numpy() for t in logits)
        pv, sv = round4(pv), round4(sv)
    S = cfg.shard_size
    n_shards = (N + S - 1) // S
    index_lines = []
    def shard_np(arrs, a, b):
        # One shard's slice on the host, rounded: transient memory is per shard, not per SAE.
        out = [t[a:b].cpu().numpy() for t in arrs[:3]]
        return [out[0], round4(out[1]), out[2], _round_windows(arrs[3][a:b].float().cpu().numpy())]

    for s in tqdm(range(n_shards), desc="write", unit="shard", disable=not cfg.progress):
        a0 = s * S
        feats = range(a0, min(N, (s + 1) * S))
        tp = shard_np(top, a0, feats.stop) if top is not None else None
        rs = shard_np(res, a0, feats.stop) if res is not None else None
        # The contexts of this shard's examples are read in one go.
        seqs: list[int] = []
        for f in feats:
            if tp is not None:
                seqs += (tp[2][f - a0][: top_n[f]] // SEQ_MUL).tolist()
            if rs is not None:
                seqs += (rs[2][f - a0][pick[f] >= 0] // SEQ_MUL).tolist()
        ctx = tk.contexts(seqs)
        lines, offsets = [], [0]
        for f in feats:
            dead = bool(cnt[f] == 0)
            rec: dict[str, Any] = {
                "id": f, "dead": dead, "dense": bool(dens[f] > cfg.dense_threshold),
                "count": int(cnt[f]), "density": float(dens_r[f]),
                "log10_density": None if dead else float(log_dens[f]),
                "mean_act": float(mean[f]), "max_act": float(mx[f]),
            }
            tops = []
            if top is not None:
                rows, vals, sps, wins = (tp[j][f - a0][: top_n[f]].tolist() for j in range(4))
                tops = [_example(*z, cfg.context_before, ctx, tk) for z in zip(rows, sps, vals, wins, strict=True)]
            seen: list[str] = []
            for e in tops:
                t = e["tokens"][e["peak"]] if 0 <= e["peak"] < len(e["tokens"]) else None
                if t is not None and t not in seen and len(seen) < 5:
                    seen.append(t)
            rec["top_tokens"] = seen
            if dead:
                rec["histogram"] = {"edges": [], "counts": []}
                rec["interval_examples"] = []
            else:
                rec["histogram"] = {"edges": h_edges[f].tolist(), "counts": h_counts[f].tolist()}
                bins = []
                for j in range(cfg.n_bins):
                    exs = []
                    if pick is not None:
                        idx = np.nonzero(pick[f] == j)[0]
                        g = f - a0
                        idx = idx[np.lexsort((rs[0][g][idx], -rs[1][g][idx]))]
                        exs = [_example(int(rs[0][g][i]), int(rs[2][g][i]), float(rs[1][g][i]),
                                        rs[3][g][i].tolist(), cfg.context_before, ctx, tk) for i in idx]
                    bins.append({"lo": float(i_edges[f][j]), "hi": float(i_edges[f][j + 1]),
                                 "count": int(i_counts[f][j]), "share": float(i_share[f][j]), "examples": exs})
                rec["interval_examples"] = bins
            rec["top_examples"] = tops
            if logits is not None:
                rec["logits"] = {
                    "promoted": [{"token": tk.s(int(i)), "id": int(i), "value": float(v)}
                                 for v, i in zip(pv[f], pi[f], strict=True)],
                    "suppressed": [{"token": tk.s(int(i)), "id": int(i), "value": float(v)}
                                   for v, i in zip(sv[f], si[f], strict=True)],
                }
            else:
                rec["logits"] = None
            rec["neighbours"] = {
                "decoder_cosine": [{"id": int(i), "value": float(v)}
                                   for v, i in zip(nb_vals[f], nb_idx[f], strict=True)],
                "cooccurrence": None,
            }
            b = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            lines.append(b)
            offsets.append(offsets[-1] + len(b))
            index_lines.append(json.dumps(
                {k: rec[k] for k in ("id", "dead", "dense", "count", "log10_density", "max_act",
                                     "mean_act", "top_tokens")}, ensure_ascii=False, separators=(",", ":")))
        shard = out / "features" / f"shard_{s:05d}.jsonl"
        tmp = shard.with_name(shard.name + ".tmp")
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, shard)
        (out / "features" / f"shard_{s:05d}.idx.json").write_text(json.dumps(offsets))
        maybe_kill("mid_output")
    (out / "features.jsonl.tmp").write_text("\n".join(index_lines) + "\n", encoding="utf-8")
    os.replace(out / "features.jsonl.tmp", out / "features.jsonl")

    l0 = _l0_summary(acc.l0_counts.cpu().numpy())
    return {
        "format_version": FORMAT_VERSION,
        "n_features": N,
        "d_in": sae.d_in,
        "sae": {"path": str(cfg.sae), "cfg": to_dict(sae.cfg)},
        "store": {"path": str(cfg.store), "model": store.model, "hook": store.hook,
                  "n_rows": store.n_rows, "context_length": store.context_length},
        "model": model_name,
        **counts,
        "dead_threshold": 0,
        "dense_threshold": cfg.dense_threshold,
        "n_dead": int((cnt == 0).sum()),
        "n_dense": int((dens > cfg.dense_threshold).sum()),
        "density_histogram": _density_histogram(dens),
        "l0": l0,
        "logits": logit_info,
        "shard_size": S,
        "n_shards": n_shards,
        "state_bytes": acc.nbytes(),
        "options": to_dict(cfg),
    }
