"""``llm-sae eval`` on a cross-layer transcoder: each layer's FVU and the replacement model.

The folder ``llm-sae train-clt`` wrote names every layer's (MLP input, MLP output) stores
in its train_cfg.json, so, as for per-layer transcoders, no ``--store`` is needed. Each
layer t is reported as ``NAME/Lt``: the FVU of MLP output t, which sums the decoders of
layers 0..t, with the sparsity of the latents read at layer t; then the replacement model
with each layer's MLP output replaced alone and all at once (key ``all``: the CLT's
replacement model), with and without the clean run's error term.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from llm_sae.config import to_dict
from llm_sae.evaluate.config import EvalConfig, EvalError, from_train_cfg
from llm_sae.evaluate.replacement import CLTLayer, Splice, add_replacement
from llm_sae.evaluate.stats import ReconstructionStats

CLT_FILE = "clt.safetensors"


def is_clt_dir(path: str | Path) -> bool:
    """A folder ``llm-sae train-clt`` wrote (its weights file is not an SAE's)."""
    return (Path(path) / CLT_FILE).is_file()


def _pairs(run_dir: str | Path) -> list[dict[str, str]]:
    def read(cfg: dict[str, Any]) -> list[dict[str, str]]:
        pairs = cfg["pairs"]
        if not pairs or not all({"store", "target_store", "in_hook", "out_hook"} <= set(p) for p in pairs):
            raise ValueError("no complete pairs")
        return pairs

    return from_train_cfg(
        run_dir, read, "the cross-layer transcoder's train_cfg.json llm-sae train-clt wrote, naming "
        "each layer's stores and hooks", "evaluate the folder train-clt trained into",
    )


@torch.no_grad()
def evaluate_clt(run_dir: str, cfg: EvalConfig, *, device: Any) -> dict[str, Any]:
    """Evaluate the CLT in ``run_dir`` on its stores' last ``cfg.eval_rows`` rows and (with
    ``cfg.downstream``) in the model it reads; the report has one entry per layer."""
    from tqdm.auto import tqdm

    from llm_sae.sae.clt import load_clt
    from llm_sae.store.store import open_store

    pairs = _pairs(run_dir)
    clt = load_clt(run_dir).to(device)
    L = clt.cfg.n_layers
    if len(pairs) != L:
        raise EvalError(f"{run_dir} holds a {L}-layer CLT but its train_cfg.json names {len(pairs)} pairs; "
                        "evaluate the folder train-clt trained into")
    xs = [open_store(p["store"]) for p in pairs]
    ys = [open_store(p["target_store"]) for p in pairs]
    name = Path(run_dir).resolve().name
    names = [f"{name}/L{t}" for t in range(L)]
    n = min(s.n_rows for s in xs)
    start = max(0, n - cfg.eval_rows)
    stats = [ReconstructionStats(clt.cfg.n_latents, cfg.active_threshold, token_ids=False) for _ in range(L)]
    for s in tqdm(range(start, n, cfg.batch_size), disable=not cfg.progress, desc=name, file=sys.stderr):
        e = min(n, s + cfg.batch_size)
        zs = [clt.encode_layer(l, xs[l].acts(s, e).to(device, torch.float32)) for l in range(L)]
        for t in range(L):
            stats[t].add_coded(zs[t], clt.decode_layer(t, zs), ys[t].acts(s, e).to(device, torch.float32))
    report: dict[str, Any] = {
        "store": ", ".join(str(x.path) for x in xs), "model": xs[0].model,
        "hook": ", ".join(f"{p['in_hook']}→{p['out_hook']}" for p in pairs),
        "eval_rows": {"start": start, "stop": n, "note": "the stores' last rows; see --eval-rows"},
        "config": to_dict(cfg), "saes": {}, "transcoders": True, "clt": str(run_dir),
    }
    for t in range(L):
        report["saes"][names[t]] = {
            "arch": "clt", "n_latents": clt.cfg.n_latents, "k": clt.cfg.k, "layer": t,
            "in_hook": pairs[t]["in_hook"], "out_hook": pairs[t]["out_hook"],
            **stats[t].summary(cfg.dense_threshold)}
    if cfg.downstream:
        from llm_sae.lm.hooks import check_hooks, load_model

        model_name = cfg.model or xs[0].model
        if not model_name:
            raise EvalError(f"the store at {xs[0].path} does not name its model; pass --model, or --no-downstream")
        model = load_model(model_name, device=str(device))
        in_hooks = tuple(p["in_hook"] for p in pairs)
        check_hooks(model, sorted({*in_hooks, *(p["out_hook"] for p in pairs)}), model_name)
        reps: dict[str, Splice] = {
            names[t]: CLTLayer(clt, t, in_hooks, pairs[t]["out_hook"]) for t in range(L)}
        add_replacement(report, model, reps, xs[0], cfg)
    report["per_feature"] = {}
    return report
