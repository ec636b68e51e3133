"""``evaluate``: one SAE or several on one store."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sae.common.device import resolve_device
from llm_sae.common.outdir import check_output, staged
from llm_sae.config import ConfigError, to_dict
from llm_sae.errors import StoreError
from llm_sae.evaluate.amortization import amortization_gap
from llm_sae.evaluate.clt import evaluate_clt, is_clt_dir
from llm_sae.evaluate.config import EvalConfig, EvalError
from llm_sae.evaluate.downstream import downstream_metrics, eval_contexts
from llm_sae.evaluate.report import write_report
from llm_sae.evaluate.stats import ReconstructionStats, quantiles
from llm_sae.evaluate.transcoders import evaluate_transcoders
from llm_sae.sae.formats.meta import check_same_source


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
            entry["selectivity"] = {"gini": quantiles(g), "top_token_share": quantiles(sh),
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


def _training_store(paths: list[str]) -> str:
    """The one store every SAE in ``paths`` was trained on (train_cfg.json), for an eval
    without --store; ConfigError naming what is missing otherwise."""
    from llm_sae.sae.formats.meta import recorded_store

    stores = {recorded_store(p) for p in paths}
    if None in stores or len(stores) != 1:
        named = sorted(s for s in stores if s)
        why = (f"the SAEs were trained on different stores ({', '.join(named)})" if len(named) > 1
               else "not every SAE records the store it was trained on (train_cfg.json)")
        raise ConfigError(f"give --store DIR, a store at the SAEs' hook: {why}")
    (store,) = stores
    if not Path(store, "manifest.json").is_file():
        raise ConfigError(f"the SAEs were trained on the store {store}, which is no longer there; "
                          "give --store DIR, a store at the SAEs' hook")
    print(f"eval: no --store given; using the store the SAEs were trained on, {store} (its last "
          "--eval-rows rows, which training also sampled: harvest another store for held-out rows)",
          file=sys.stderr)
    return store


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Load the SAEs (and the model), evaluate, write eval.json/eval.txt/frontier.png."""
    from llm_sae.sae.formats.native import load_sae
    from llm_sae.store.store import open_store

    if not cfg.sae:
        raise ConfigError("give at least one --sae DIR")
    from llm_sae.sae.formats.hub import is_hub_spec

    if not cfg.out and is_hub_spec(cfg.sae[0]):
        raise ConfigError(f"--sae {cfg.sae[0]} is not a folder to write eval/ into; pass --out DIR")
    default_out = Path(cfg.sae[0]) / "eval"  # a sweep's eval/ goes in the sweep folder
    paths = expand_sweeps(cfg.sae)  # cfg is left as given: the CLI names the folder from it
    for flag, v in (("eval-rows", cfg.eval_rows), ("batch-size", cfg.batch_size), ("n-contexts", cfg.n_contexts),
                    ("model-batch-size", cfg.model_batch_size), ("amortization-rows", cfg.amortization_rows),
                    ("fista-iters", cfg.fista_iters)):
        if v <= 0:
            raise ConfigError(f"--{flag} {v} must be positive; give a count of 1 or more")
    out = Path(cfg.out) if cfg.out else default_out
    clts = [p for p in paths if is_clt_dir(p)]
    if clts and len(paths) > 1:
        raise EvalError(f"{', '.join(clts)} is a cross-layer transcoder: evaluate it alone (one --sae per run "
                        "of llm-sae eval), each of its layers is a row of the report")
    check_output(out, "eval", legacy=("eval.json",))
    device = resolve_device(cfg.device)
    if clts:
        report = evaluate_clt(clts[0], cfg, device=device)
        with staged(out, "eval", legacy=("eval.json",)) as tmp:
            write_report(report, tmp)
        return report
    loaded = {name: (path, load_sae(path, device=device)) for name, path in zip(_names(paths), paths, strict=True)}
    if any(getattr(s, "is_transcoder", False) for _, s in loaded.values()):
        report = evaluate_transcoders(_only_transcoders(loaded), cfg, device=device)
        with staged(out, "eval", legacy=("eval.json",)) as tmp:
            write_report(report, tmp)
        return report
    if not cfg.store:
        cfg = dataclasses.replace(cfg, store=_training_store([p for p, _ in loaded.values()]))
    store = open_store(cfg.store)
    store.check_files()
    saes = {}
    for name, (path, sae) in loaded.items():
        if sae.d_in != store.d_in:
            raise EvalError(
                f"SAE {path} takes d_in={sae.d_in} but the store {cfg.store} holds d_in={store.d_in} "
                f"(hook {store.hook}); evaluate it on a store of the hook it was trained on"
            )
        check_same_source(path, cfg.store, store.hook, store.model)
        saes[name] = sae
    model = None
    if cfg.downstream:
        from llm_sae.lm.hooks import check_hooks, load_model

        model_name = cfg.model or store.model
        if not model_name or not store.hook:
            raise EvalError(
                f"the store at {cfg.store} does not name its model/hook; pass --model, or --no-downstream"
            )
        model = load_model(model_name, device=str(device))
        check_hooks(model, [store.hook], model_name)
    report = evaluate_saes(saes, store, cfg, model=model)
    with staged(out, "eval", legacy=("eval.json",)) as tmp:  # never eval.json of one run beside another's
        write_report(report, tmp)
    return report


def expand_sweeps(paths: list[str]) -> list[str]:
    """Each sweep folder (one with the sweep.json that ``llm-sae train`` writes) replaced by
    its SAEs, grouped by architecture and width and in order of k, so the table and the
    plot show each one's L0 frontier; other paths as given."""
    out: list[str] = []
    for p in paths:
        manifest = Path(p) / "sweep.json"
        if not manifest.exists():
            out.append(p)
            continue
        try:
            saes = json.loads(manifest.read_text())["saes"]
        except (OSError, ValueError, KeyError) as e:
            raise EvalError(f"{manifest} is unreadable ({e}); rerun the sweep's train command") from None
        found = []
        for s in saes:
            d = Path(p) / s["dir"]
            if not (d / "sae.safetensors").exists():
                raise EvalError(
                    f"the sweep {p} is not finished ({d} has no sae.safetensors); rerun its "
                    "`llm-sae train` command to resume it, or pass the finished SAEs with --sae"
                )
            found.append((s.get("arch") or "", _n_latents_saved(d), s.get("k") or 0, str(d)))
        out += [d for *_, d in sorted(found)]  # each (arch, width)'s frontier in order of k
    return out


def _n_latents_saved(sae_dir: Path) -> int:
    """The width in a saved SAE's cfg.json (0 if it does not say)."""
    try:
        return int(json.loads((sae_dir / "cfg.json").read_text()).get("n_latents") or 0)
    except (OSError, ValueError):
        return 0


def _only_transcoders(loaded: dict[str, tuple[str, Any]]) -> dict[str, tuple[str, Any]]:
    plain = [path for path, s in loaded.values() if not getattr(s, "is_transcoder", False)]
    if plain:
        raise EvalError(f"{', '.join(plain)} reconstruct their input but the others are transcoders; "
                        "evaluate SAEs and transcoders in separate runs of llm-sae eval")
    return loaded
