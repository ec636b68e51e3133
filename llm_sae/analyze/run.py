"""``analyze``: one pass per SAE, on one process or under torchrun."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from llm_sae.analyze.accumulate import FINE_BINS, FeatureAccumulator, merge_ranks
from llm_sae.analyze.config import AnalyzeConfig
from llm_sae.analyze.effects import (
    decoder_neighbours,
    load_tokenizer,
    logit_effects,
    token_strings,
    unembedding,
)
from llm_sae.analyze.encode_pass import run_pass
from llm_sae.analyze.output import write_json, write_output
from llm_sae.common.device import resolve_device
from llm_sae.common.outdir import check_output, staged
from llm_sae.common.threads import num_threads
from llm_sae.config import ConfigError
from llm_sae.errors import AnalyzeError, StoreError
from llm_sae.sae.formats.meta import check_same_source, recorded_target_hook

# What an analysis folder holds (marks one written before output folders carried a marker).
ANALYSIS_FILES = ("summary.json", "features.jsonl", "features")


def analyze(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Run the analysis and write ``cfg.out``; returns the summary dict.

    Under ``torchrun`` the ranks split the rows into consecutive ranges, and rank 0
    merges their per-feature state exactly and writes the output (others return {}).
    """
    from llm_sae.distributed.env import init_from_env, report_rank_failure

    rank, world = init_from_env()
    if world == 1:
        return _analyze(cfg, 0, 1)
    with report_rank_failure("analysis"):
        return _analyze(cfg, rank, world)


def _analyze(cfg: AnalyzeConfig, rank: int, world: int) -> dict[str, Any]:
    from llm_sae.sae.formats.native import load_sae
    from llm_sae.store.store import open_store

    t0, c0 = time.perf_counter(), time.process_time()
    _check_config(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        check_output(cfg.out, "analysis", legacy=ANALYSIS_FILES)  # before the pass, not after it
    store = open_store(cfg.store)
    store.check_files()  # a shard cut short would otherwise be counted as rows it lacks
    check_same_source(cfg.sae, cfg.store, store.hook, store.model)
    sae = load_sae(cfg.sae, device=device)
    if sae.d_in != store.d_in:
        raise AnalyzeError(
            f"the SAE at {cfg.sae} takes d_in={sae.d_in} but the store at {cfg.store} holds "
            f"d_in={store.d_in} rows (hook {store.hook!r}); analyse the SAE with a store of the "
            "hook it was trained on"
        )
    if store.n_rows == 0:
        raise StoreError(f"the store at {cfg.store} has no rows; harvest some activations into it first")
    N = sae.n_latents
    n_rows = store.n_rows if cfg.tokens is None else min(cfg.tokens, store.n_rows)
    batch_size = max(cfg.batch_size, 2 * (cfg.context_before + cfg.context_after + 1))

    model_name = cfg.model or store.model
    tok = load_tokenizer(cfg.model or store.manifest.get("tokenizer") or store.model)
    strings = token_strings(tok) if tok is not None else None
    exclude_ids = []
    if cfg.exclude_bos:
        if tok is None:
            raise AnalyzeError("--exclude-bos needs the tokenizer to know the special tokens; pass --model")
        exclude_ids = [int(i) for i in tok.all_special_ids]

    acc = FeatureAccumulator(
        N, top_k=cfg.top_k, n_bins=cfg.n_bins, per_bin=cfg.per_bin,
        window=(cfg.context_before, cfg.context_after), seed=cfg.seed, device=device,
    )
    counts = run_pass(
        sae, store, acc, n_rows=(rank + 1) * n_rows // world, batch_size=batch_size,
        exclude_ids=exclude_ids, exclude_positions=cfg.exclude_positions, device=device,
        progress=cfg.progress and rank == 0, row_start=rank * n_rows // world,
    )
    if world > 1:
        merged = merge_ranks(acc, counts)
        if merged is None:
            return {}
        counts = merged
    t_pass, c_pass = time.perf_counter() - t0, time.process_time() - c0

    W_dec_ND = sae.W_dec.detach()
    logits, logit_info = None, {"available": False, "reason": "disabled (--no-logits)", "norm": None}
    if cfg.logits and model_name:
        # The decoder's width: a transcoder writes into its output hook (the MLP output,
        # added to the residual stream), not into the space its encoder reads.
        W_U_DV, kind, reason = unembedding(model_name, W_dec_ND.shape[1])
        if W_U_DV is not None:
            logits = [t.cpu() for t in logit_effects(W_dec_ND, W_U_DV.to(W_dec_ND.device), cfg.n_logits)]
            logit_info = {"available": True, "reason": None, "norm": kind}
        else:
            logit_info = {"available": False, "reason": reason, "norm": None}
    elif cfg.logits:
        logit_info["reason"] = "the store names no model; pass --model"
    nb_vals, nb_idx = (t.cpu() for t in decoder_neighbours(W_dec_ND, cfg.n_neighbours))

    # Written whole into a temp folder and swapped in: a killed re-analysis never leaves
    # the old summary.json beside shards of the new SAE.
    with staged(cfg.out, "analysis", legacy=ANALYSIS_FILES) as tmp, num_threads(torch.get_num_threads()):
        if device.type == "cpu":
            torch.set_num_threads(1)  # small ops and Python: threads only add waiting
        summary = write_output(
            dataclasses.replace(cfg, out=str(tmp)), store, sae, acc, counts, strings, tok, logits,
            logit_info, (nb_vals, nb_idx), model_name,
        )
        if getattr(sae, "is_transcoder", False):  # contexts are the input's, logits the output's
            summary["transcoder"] = {"d_out": int(W_dec_ND.shape[1]), "out_hook": recorded_target_hook(cfg.sae)}
        summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
        summary["pass_s"] = round(t_pass, 3)
        summary["pass_cpu_s"] = round(c_pass, 3)
        write_json(tmp / "summary.json", summary)
    return summary


def _check_config(cfg: AnalyzeConfig) -> None:
    if cfg.tokens is not None and cfg.tokens <= 0:
        raise ConfigError(f"--tokens must be positive, got {cfg.tokens}")
    for name in ("top_k", "context_before", "context_after", "per_bin", "n_logits", "n_neighbours"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    if not 1 <= cfg.n_bins <= FINE_BINS // 2 or not 1 <= cfg.hist_bins <= FINE_BINS // 2:
        raise ConfigError(f"--n-bins and --hist-bins must be between 1 and {FINE_BINS // 2}")
    if cfg.batch_size <= 0 or cfg.shard_size <= 0:
        raise ConfigError("--batch-size and --shard-size must be positive")
    from llm_sae.sae.formats.hub import is_hub_spec

    if not is_hub_spec(cfg.sae) and not Path(cfg.sae).exists():
        from llm_sae.errors import CheckpointError

        raise CheckpointError(f"no SAE at {cfg.sae}; train one with `llm-sae train` or fix --sae")
