"""Transcoders on the embedded model: per-layer, skip and cross-layer, at matched L0.

    python scripts/bench_transcoders.py --out /tmp/bench_tc [--tokens 300000]

One paired harvest of tiny-stdlib (4 layers, d_model 128) writes every layer's MLP input
(``blocks.L.ln2.hook_normalized``) and output (``blocks.L.hook_mlp_out``). Then, with the
same width (expansion 8: 1,024 latents per layer), batch and token budget: a TopK
transcoder at each layer (k = 16), a TopK skip transcoder at layer 1, one cross-layer
transcoder (BatchTopK, k = 16 per layer), and an SAE on layer 1's MLP input for the
throughput baseline. Reports the FVU of each MLP output, L0, the replacement model's loss
recovered per layer and all at once (``llm-sae eval`` on the runs; on the CLT folder, its
replacement model: each MLP output the sum of the decoders of layers ≤ t), and training tokens/s
(the trainer's own windows in log.jsonl, averaged; the CLT's loop time in train_summary.json).
A run already finished under --out is kept (a killed benchmark continues where it stopped). Prints a markdown table; writes
results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llm_sae.common.atomic import write_json_atomic
from llm_sae.evaluate.config import EvalConfig
from llm_sae.evaluate.run import evaluate
from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.run import harvest
from llm_sae.train.clt import CLTTrainConfig, train_clt
from llm_sae.train.config import TrainConfig
from llm_sae.train.run import train

LAYERS = 4
IN, OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"


def interleaved_throughput(out: Path, stores: list, common: dict, rounds: int, steps: int) -> dict:
    """Training tokens/s of a transcoder, a skip transcoder, an SAE (all at layer 1, the same
    width) and the CLT, in short runs taken in turn, ``rounds`` times: on a shared machine
    whose load changes by minutes, only runs taken side by side compare. Medians."""
    import statistics

    cfg = {**common, "tokens": steps * common["batch_size"], "log_every": 10}
    got: dict[str, list[float]] = {"tc1": [], "skip1": [], "sae1": [], "clt": []}
    (a, b) = stores[1]
    for r in range(rounds):
        for name in got:
            d = out / "throughput" / f"{name}_{r}"
            if name == "clt":
                clt_cfg = {k: v for k, v in cfg.items() if k != "log_every"}
                train_clt(CLTTrainConfig(pair=[f"{x}:{y}" for x, y in stores], out=str(d), checkpoint_every=0,
                                         progress=False, **clt_cfg))
                got[name].append(json.loads((d / "train_summary.json").read_text())["tokens_per_s"])
                continue
            extra = {"store": str(a), "out": str(d), "arch": "topk"}
            if name != "sae1":
                extra.update(target_store=str(b), skip=name == "skip1")
            train(TrainConfig(**extra, **cfg))
            lines = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines() if x.strip()]
            got[name].append(statistics.median(x["tokens_per_s"] for x in lines if "tokens_per_s" in x))
    return {name: {"median_tokens_per_s": statistics.median(v), "all": v} for name, v in got.items()}


def eval_once(sae: list[str], out: Path, rows: int, n_contexts: int) -> dict:
    """``llm-sae eval`` on ``sae`` into ``out``, or the eval.json an earlier call left there."""
    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    return evaluate(EvalConfig(sae=sae, out=str(out), eval_rows=rows, amortization=False,
                               n_contexts=n_contexts, progress=False, device="cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=300_000, help="harvested and trained tokens")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--n-contexts", type=int, default=64, help="contexts for the replacement model")
    ap.add_argument("--throughput-only", action="store_true", help="only the interleaved throughput runs")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    dirs = {h: out / "stores" / h for i in range(LAYERS) for h in (IN.format(i), OUT.format(i))}
    if not all((d / "manifest.json").exists() for d in dirs.values()):  # reuse a finished harvest
        dirs = harvest(HarvestConfig(
            model="tiny-stdlib", dataset="stdlib", tokens=args.tokens, out=str(out / "stores"),
            hook=[OUT.format(i) for i in range(LAYERS)],
            pair=[f"{IN.format(i)}:{OUT.format(i)}" for i in range(LAYERS)],
        device="cpu", progress=False))
    t_harvest = time.perf_counter() - t0
    stores = [(dirs[IN.format(i)], dirs[OUT.format(i)]) for i in range(LAYERS)]
    common = dict(k=args.k, expansion=args.expansion, batch_size=args.batch_size, tokens=args.tokens, device="cpu")
    res: dict = {"tokens": args.tokens, "harvest_s": t_harvest, "runs": {}}
    if args.throughput_only:
        res = {"throughput": interleaved_throughput(out, stores, common, args.rounds, 40)}
        (out / "throughput.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))
        return
    for kind, i in [("tc", i) for i in range(LAYERS)] + [("skip", 1)]:
            a, b = stores[i]
            if (out / f"{kind}{i}" / "sae.safetensors").exists():  # finished in an earlier call
                continue
            train(TrainConfig(store=str(a), target_store=str(b), out=str(out / f"{kind}{i}"),
                              arch="topk", skip=kind == "skip", **common))
    if not (out / "sae1" / "sae.safetensors").exists():
        train(TrainConfig(store=str(stores[1][0]), out=str(out / "sae1"), arch="topk", **common))
    if not (out / "clt" / "clt.safetensors").exists():
        train_clt(CLTTrainConfig(pair=[f"{a}:{b}" for a, b in stores], out=str(out / "clt"),
                                 checkpoint_every=0, progress=False, **common))
    for name in ["tc0", "tc1", "tc2", "tc3", "skip1", "sae1"]:
        lines = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines() if x.strip()]
        tps = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x]
        res["runs"][name] = {"tokens_per_s": sum(tps) / len(tps), "fvu_train_last": lines[-1].get("fvu")}
    res["runs"]["clt"] = json.loads((out / "clt" / "train_summary.json").read_text())
    rows = 16384
    for kind, names in (("tc", ["tc0", "tc1", "tc2", "tc3"]), ("skip", ["tc0", "skip1", "tc2", "tc3"]), ("clt", ["clt"])):
        rep = eval_once([str(out / n) for n in names], out / f"eval_{kind}", rows, args.n_contexts)
        res[f"eval_{kind}"] = {
            name: {"fvu": e["reconstruction"]["fvu"], "l0": e["sparsity"]["l0"]["mean"],
                   "lr": e["replacement"]["loss_recovered"], "kl": e["replacement"]["kl"], "lr_err": e["replacement"]["loss_recovered_with_error"]}
            for name, e in rep["saes"].items()}
        res[f"eval_{kind}"]["all"] = {k: rep["replacement"]["replaced"]["all"][k]
                                      for k in ("loss_recovered", "loss_recovered_with_error", "kl", "ce")}
        res[f"eval_{kind}"]["ce_clean"] = rep["replacement"]["ce_clean"]
    write_json_atomic(out / "results.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
