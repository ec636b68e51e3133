"""``llm-sae eval`` on transcoder runs: FVU of the output hook and the replacement model.

A transcoder is judged on what it replaces: the MLP output it predicts (FVU against the
target store, not its own input) and the next-token loss of the model with that MLP (and,
with several runs, all of them at once) replaced, with and without the clean error term.
Each run names its own pair of stores in its train_cfg.json, so no ``--store`` is needed.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from llm_sae.config import to_dict
from llm_sae.evaluate.config import EvalConfig, EvalError, from_train_cfg
from llm_sae.evaluate.replacement import Replacement, add_replacement, replacement_from_run
from llm_sae.evaluate.stats import ReconstructionStats


def _stores(run_dir: str) -> tuple[Any, Any]:
    from llm_sae.store.store import open_store

    return from_train_cfg(
        run_dir, lambda cfg: (open_store(cfg["store"]), open_store(cfg["target_store"])),
        "the transcoder's train_cfg.json naming --store and --target-store, and both stores",
        "evaluate a transcoder from the run folder llm-sae train wrote",
    )


@torch.no_grad()
def evaluate_transcoders(saes: dict[str, tuple[str, Any]], cfg: EvalConfig, *, device: Any) -> dict[str, Any]:
    """Evaluate transcoders ``{name: (run_dir, sae)}``: per run the FVU of its prediction of
    the output hook on its stores' last ``cfg.eval_rows`` rows; then (``cfg.downstream``)
    the replacement model per layer and, for several, all at once."""
    from tqdm.auto import tqdm

    stores = {name: _stores(path) for name, (path, _) in saes.items()}
    reps: dict[str, Replacement] = {name: replacement_from_run(path, sae) for name, (path, sae) in saes.items()}
    first_in = next(iter(stores.values()))[0]
    report: dict[str, Any] = {
        "store": ", ".join(str(s[0].path) for s in stores.values()), "model": first_in.model,
        "hook": ", ".join(f"{r.in_hook}→{r.out_hook}" for r in reps.values()),
        "config": to_dict(cfg), "saes": {}, "transcoders": True,
    }
    for name, (_, sae) in saes.items():
        x_store, y_store = stores[name]
        n = x_store.n_rows
        start = max(0, n - cfg.eval_rows)
        report["eval_rows"] = {"start": start, "stop": n, "note": "each pair's last rows; see --eval-rows"}
        st = ReconstructionStats(sae.n_latents, cfg.active_threshold, token_ids=False)
        for s in tqdm(range(start, n, cfg.batch_size), disable=not cfg.progress, desc=name, file=sys.stderr):
            e = min(n, s + cfg.batch_size)
            st.add(sae, x_store.acts(s, e).to(device, torch.float32),
                   target_BE=y_store.acts(s, e).to(device, torch.float32))
        entry = {"arch": sae.cfg.arch, "n_latents": sae.n_latents, "k": sae.cfg.k, "skip": sae.cfg.skip,
                 "in_hook": reps[name].in_hook, "out_hook": reps[name].out_hook}
        entry.update(st.summary(cfg.dense_threshold))
        report["saes"][name] = entry
    if cfg.downstream:
        from llm_sae.lm.hooks import check_hooks, load_model

        model_name = cfg.model or first_in.model
        if not model_name:
            raise EvalError(f"the store at {first_in.path} does not name its model; pass --model, or --no-downstream")
        model = load_model(model_name, device=str(device))
        check_hooks(model, sorted({h for r in reps.values() for h in (r.in_hook, r.out_hook)}), model_name)
        add_replacement(report, model, reps, first_in, cfg)
    report["per_feature"] = {}
    return report
