"""A careless user's and an attacker's inputs, one table across every command.

Each case must end in exit code 2 with one line on stderr that names the problem (the
case's ``expect``) and the fix, no traceback, and no change to any file that existed
before (checksums of the whole fixture tree before and after). The commands run
in-process (``llm_sae.cli.main``), so the ~80 cases take seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import pytest
import torch

from llm_sae.cli import main
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY
from llm_sae.store.writer import StoreWriter

D, ROWS, CTX = 8, 600, 16
HOOK, MODEL = "blocks.0.hook_resid_post", "tiny-model"

pytestmark = pytest.mark.usefixtures("one_thread")


def write_store(path: Path, *, hook: str = HOOK, d: int = D, rows: int = ROWS) -> Path:
    g = torch.Generator().manual_seed(0)
    n_seq = rows // (CTX - 1) + 1
    toks_SL = torch.randint(1, 50, (n_seq, CTX), generator=g)
    seq = torch.arange(n_seq)[:, None].expand(n_seq, CTX)[:, 1:].reshape(-1)[:rows]
    pos = torch.arange(CTX)[None, :].expand(n_seq, CTX)[:, 1:].reshape(-1)[:rows]
    meta = {"d_in": d, "dtype": "float32", "hook": hook, "model": MODEL, "context_length": CTX}
    with StoreWriter(path, meta=meta, shard_rows=200) as w:
        w.append(torch.randn(rows, d, generator=g), toks_SL[:, 1:].reshape(-1)[:rows],
                 torch.stack([seq, pos], 1))
        w.add_sequences(toks_SL)
    return path


def write_sae(path: Path, d: int = D) -> Path:
    torch.manual_seed(0)
    sae = REGISTRY["topk"](SAEConfig(d_in=d, n_latents=16, k=4))
    sae.save(path)
    # What `llm-sae train` records about the data an SAE was trained on.
    (path / "train_cfg.json").write_text(json.dumps({"source": {"model": MODEL, "hook": HOOK, "d_in": d}}))
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """Every input a case may point at, built once: a store, an SAE, an analysis, a site,
    a trained run, damaged stores, config files and a folder of the user's own files."""
    root = tmp_path_factory.mktemp("bad")
    f: dict[str, Path] = {"root": root}
    f["store"] = write_store(root / "store")
    f["sae"] = write_sae(root / "sae")
    f["store_other_hook"] = write_store(root / "store_h1", hook="blocks.1.hook_resid_post")
    f["store_wide"] = write_store(root / "store_wide", d=2 * D)
    assert main(["analyze", "--sae", str(f["sae"]), "--store", str(f["store"]), "--out",
                 str(root / "analysis"), "--no-logits", "--no-progress", "--device", "cpu"]) == 0
    f["analysis"] = root / "analysis"
    assert main(["dashboard", "--analysis", str(f["analysis"]), "--out", str(root / "site")]) == 0
    f["site"] = root / "site"
    f["run"] = root / "run"
    assert main(["train", "--store", str(f["store"]), "--out", str(f["run"]), "--n-latents", "16",
                 "--k", "4", "--tokens", "256", "--batch-size", "64", "--device", "cpu",
                 "--log-every", "1000"]) == 0

    garbage = root / "store_garbage"
    garbage.mkdir()
    (garbage / "manifest.json").write_text("{not json")
    f["store_garbage"] = garbage
    noshards = root / "store_noshards"
    noshards.mkdir()
    m = json.loads((f["store"] / "manifest.json").read_text())
    (noshards / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "shards"}))
    f["store_noshards"] = noshards
    # A shard cut short, and a shard rewritten at another width, each under an intact manifest.
    short = write_store(root / "store_short")
    shard = short / "shard-00001.acts.npy"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    f["store_short"] = short
    wrong = write_store(root / "store_wrongwidth")
    import numpy as np

    np.save(wrong / "shard-00000.acts.npy", np.zeros((200, D + 1), np.float32))
    f["store_wrongwidth"] = wrong

    sl = root / "saelens_no_k"
    sl.mkdir()
    from safetensors.torch import save_file

    save_file({"W_enc": torch.zeros(D, 16), "W_dec": torch.zeros(16, D), "b_enc": torch.zeros(16),
               "b_dec": torch.zeros(D)}, sl / "sae_weights.safetensors")
    (sl / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": 16,
                                             "hook_name": HOOK, "model_name": MODEL}))
    f["saelens_no_k"] = sl

    (root / "bad.yaml").write_text("lr: [0.1\nk: 3\n")
    (root / "bad.json").write_text('{"lr": 0.1,,}')
    (root / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    f["afile"] = root / "afile.txt"
    f["afile"].write_text("the user's notes\n")
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\section{mine}\n")
    (mine / "shard-00000.npy").write_bytes(b"not ours")
    f["mine"] = mine
    (root / "docs.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    return f


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


# A train command that would run (small batches for the tiny store); a case appends the bad flag.
T = ["train", "--store", "{store}", "--out", "{root}/t", "--batch-size", "64", "--tokens", "256",
     "--n-latents", "16", "--k", "4", "--device", "cpu"]

# (id, argv with {name} placeholders for fixture paths, regex the message must match)
CASES: list[tuple[str, list[str], str]] = [
    ("unknown command", ["frobnicate"], "invalid choice"),
    # harvest
    ("harvest out is a file", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                               "--tokens", "10", "--out", "{afile}"], "is a file"),
    ("harvest out holds user files", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset",
                                      "{root}/docs.txt", "--tokens", "10", "--out", "{mine}"], "not made by llm-sae"),
    ("harvest out unwritable", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                                "--tokens", "10", "--out", "/proc/llm_sae_out"], "cannot write"),
    ("harvest tokens 0", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                          "--tokens", "0", "--out", "{root}/h"], "--tokens"),
    ("harvest tokens text", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                             "--tokens", "many", "--out", "{root}/h"], "not a valid int"),
    ("harvest batch 0", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                         "--tokens", "10", "--batch-size", "0", "--out", "{root}/h"], "--batch-size"),
    ("harvest context 1", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                           "--tokens", "10", "--context-length", "1", "--out", "{root}/h"], "--context-length"),
    ("harvest dtype", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                       "--tokens", "10", "--dtype", "int7", "--out", "{root}/h"], "int7"),
    ("harvest shard rows 0", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                              "--tokens", "10", "--shard-rows", "0", "--out", "{root}/h"], "--shard-rows"),
    ("harvest cuda:7", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                        "--tokens", "10", "--device", "cuda:7", "--out", "{root}/h"], "cuda"),
    ("harvest device garbage", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/docs.txt",
                                "--tokens", "10", "--device", "banana", "--out", "{root}/h"], "not a device"),
    ("harvest missing dataset", ["harvest", "--model", "{root}/m", "--hook", HOOK, "--dataset", "{root}/no.txt",
                                 "--tokens", "10", "--out", "{root}/h"], "no.txt"),
    ("harvest missing model", ["harvest", "--model", "{root}/nomodel", "--hook", HOOK, "--dataset",
                               "{root}/docs.txt", "--tokens", "10", "--out", "{root}/h"], "nomodel"),
    ("harvest config yaml syntax", ["harvest", "--config", "{root}/bad.yaml"], "bad.yaml"),
    ("harvest config json syntax", ["harvest", "--config", "{root}/bad.json"], "bad.json"),
    ("harvest config missing", ["harvest", "--config", "{root}/none.yaml"], "does not exist"),
    # store
    ("store info missing", ["store", "info", "{root}/nostore"], "no activation store"),
    ("store info garbage", ["store", "info", "{store_garbage}"], "not valid JSON"),
    ("store info no shards", ["store", "info", "{store_noshards}"], "shards"),
    ("store verify garbage", ["store", "verify", "{store_garbage}"], "not valid JSON"),
    # train
    ("train store missing", ["train", "--store", "{root}/nostore", "--out", "{root}/t"], "no activation store"),
    ("train store garbage", ["train", "--store", "{store_garbage}", "--out", "{root}/t"], "not valid JSON"),
    ("train store no shards", ["train", "--store", "{store_noshards}", "--out", "{root}/t"], "shards"),
    ("train short shard", [*T, "--store", "{store_short}"],
     "shard"),
    ("train wrong-width shard", [*T, "--store", "{store_wrongwidth}"], "shard"),
    ("train lr -1", [*T, "--lr", "-1"], "--lr"),
    ("train lr nan", [*T, "--lr", "nan"], "--lr"),
    ("train lr inf", [*T, "--lr", "inf"], "--lr"),
    ("train lr text", [*T, "--lr", "fast"], "not a valid float"),
    ("train batch 0", [*T, "--batch-size", "0"], "--batch-size"),
    ("train batch -4", [*T, "--batch-size", "-4"], "--batch-size"),
    ("train betas one", [*T, "--adam-betas", "0.9"],
     "--adam-betas"),
    ("train betas text", [*T, "--adam-betas", "0.9,x"],
     "not a valid float"),
    ("train betas range", [*T, "--adam-betas", "1.5,0.999"],
     "--adam-betas"),
    ("train adam eps", [*T, "--adam-eps", "-1"], "--adam-eps"),
    ("train k 0", [*T, "--k", "0"], "k"),
    ("train arch", [*T, "--arch", "nosuch"], "nosuch"),
    ("train tokens 0", [*T, "--tokens", "0"], "--tokens"),
    ("train expansion 0", [*T, "--expansion", "0"],
     "--expansion"),
    ("train n-latents -1", [*T, "--n-latents", "-1"],
     "n_latents|--n-latents"),
    ("train grad clip", [*T, "--grad-clip", "-1"], "--grad-clip"),
    ("train warmup", [*T, "--lr-warmup", "2"], "--lr-warmup"),
    ("train schedule", [*T, "--lr-schedule", "step"],
     "--lr-schedule"),
    ("train nonfinite", [*T, "--on-nonfinite", "ignore"],
     "--on-nonfinite"),
    ("train dead latents", [*T, "--dead-latents", "revive"],
     "revive"),
    ("train precision", [*T, "--precision", "fp8"], "fp8"),
    ("train cuda:7", [*T, "--device", "cuda:7"], "cuda"),
    ("train log every 0", [*T, "--log-every", "0"],
     "--log-every"),
    ("train checkpoint every", [*T, "--checkpoint-every", "-1"],
     "--checkpoint-every"),
    ("train out is a file", [*T, "--out", "{afile}"], "is a file"),
    ("train out holds user files", [*T, "--out", "{mine}"], "not made by llm-sae"),
    ("train out unwritable", [*T, "--out", "/proc/llm_sae_out"], "cannot write"),
    ("train rerun with another k", ["train", "--store", "{store}", "--out", "{run}", "--n-latents", "16",
                                    "--k", "2", "--tokens", "256", "--batch-size", "64", "--device", "cpu"],
     "k=4.*k=2|k=2.*k=4"),
    ("train config yaml syntax", ["train", "--config", "{root}/bad.yaml"], "bad.yaml"),
    ("train config json syntax", ["train", "--config", "{root}/bad.json"], "bad.json"),
    ("train config unknown field", ["train", "--config", "{root}/unknown.yaml"], "learning_rate"),
    ("train config a list", ["train", "--config", "{root}/list.yaml"], "mapping"),
    # analyze
    ("analyze sae missing", ["analyze", "--sae", "{root}/nosae", "--store", "{store}", "--out", "{root}/a"],
     "no SAE"),
    ("analyze store missing", ["analyze", "--sae", "{sae}", "--store", "{root}/nostore", "--out", "{root}/a"],
     "no activation store"),
    ("analyze out is a file", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{afile}",
                               "--device", "cpu"], "is a file"),
    ("analyze out holds user files", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{mine}",
                                      "--device", "cpu"], "not made by llm-sae"),
    ("analyze width mismatch", ["analyze", "--sae", "{sae}", "--store", "{store_wide}", "--out", "{root}/a",
                                "--device", "cpu"], "d_in"),
    ("analyze hook mismatch", ["analyze", "--sae", "{sae}", "--store", "{store_other_hook}", "--out",
                               "{root}/a", "--device", "cpu"], "blocks.0.hook_resid_post.*blocks.1"),
    ("analyze short shard", ["analyze", "--sae", "{sae}", "--store", "{store_short}", "--out", "{root}/a",
                             "--device", "cpu", "--no-logits"], "shard"),
    ("analyze wrong-width shard", ["analyze", "--sae", "{sae}", "--store", "{store_wrongwidth}", "--out",
                                   "{root}/a", "--device", "cpu", "--no-logits"], "shard"),
    ("analyze batch 0", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/a",
                         "--batch-size", "0"], "--batch-size"),
    ("analyze tokens 0", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/a",
                          "--tokens", "0"], "--tokens"),
    ("analyze n-bins 0", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/a",
                          "--n-bins", "0"], "--n-bins"),
    ("analyze top-k -1", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/a",
                          "--top-k", "-1"], "--top-k"),
    ("analyze cuda:7", ["analyze", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/a",
                        "--device", "cuda:7"], "cuda"),
    ("analyze saelens without k", ["analyze", "--sae", "{saelens_no_k}", "--store", "{store}", "--out",
                                   "{root}/a", "--device", "cpu"], "\\bk\\b"),
    # dashboard
    ("dashboard analysis missing", ["dashboard", "--analysis", "{root}/noanalysis", "--out", "{root}/s"],
     "noanalysis"),
    ("dashboard analysis is a store", ["dashboard", "--analysis", "{store}", "--out", "{root}/s"],
     "analy"),
    ("dashboard out is a file", ["dashboard", "--analysis", "{analysis}", "--out", "{afile}"], "is a file"),
    ("dashboard out holds user files", ["dashboard", "--analysis", "{analysis}", "--out", "{mine}"],
     "not made by llm-sae"),
    ("dashboard out is the analysis", ["dashboard", "--analysis", "{analysis}", "--out", "{analysis}"],
     "analysis"),
    ("dashboard max examples", ["dashboard", "--analysis", "{analysis}", "--out", "{root}/s",
                                "--max-examples", "-1"], "--max-examples"),
    ("dashboard digits 0", ["dashboard", "--analysis", "{analysis}", "--out", "{root}/s", "--digits", "0"],
     "--digits"),
    # serve
    ("serve site missing", ["serve", "{root}/nosite"], "not a dashboard site"),
    ("serve port too big", ["serve", "{site}", "--port", "70000"], "--port"),
    ("serve port negative", ["serve", "{site}", "--port", "-1"], "--port"),
    ("serve port text", ["serve", "{site}", "--port", "http"], "not a valid int"),
    ("serve port in use", ["serve", "{site}", "--port", "{busy_port}"], "in use"),
    ("serve sae missing", ["serve", "{site}", "--sae", "{root}/nosae"], "nosae"),
    ("serve cuda:7", ["serve", "{site}", "--sae", "{sae}", "--device", "cuda:7"], "cuda"),
    # eval
    ("eval sae missing", ["eval", "--sae", "{root}/nosae", "--store", "{store}", "--out", "{root}/e"], "nosae"),
    ("eval store missing", ["eval", "--sae", "{sae}", "--store", "{root}/nostore", "--out", "{root}/e"],
     "no activation store"),
    ("eval hook mismatch", ["eval", "--sae", "{sae}", "--store", "{store_other_hook}", "--out", "{root}/e",
                            "--device", "cpu", "--no-downstream", "--no-amortization"],
     "blocks.0.hook_resid_post.*blocks.1"),
    ("eval rows 0", ["eval", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/e", "--eval-rows", "0"],
     "--eval-rows"),
    ("eval batch 0", ["eval", "--sae", "{sae}", "--store", "{store}", "--out", "{root}/e", "--batch-size", "0"],
     "--batch-size"),
    ("eval out is a file", ["eval", "--sae", "{sae}", "--store", "{store}", "--out", "{afile}", "--device",
                            "cpu", "--no-downstream", "--no-amortization"], "is a file"),
    # explain, steer
    ("explain analysis missing", ["explain", "--analysis", "{root}/noanalysis", "--out", "{root}/ex"],
     "no analysis"),
    ("explain config json syntax", ["explain", "--config", "{root}/bad.json"], "bad.json"),
    ("steer nothing to steer", ["steer", "--sae", "{sae}", "--prompt", "x"], "nothing to steer"),
    ("steer add garbage", ["steer", "--sae", "{sae}", "--prompt", "x", "--add", "abc"], "FEATURE=STRENGTH"),
    # train-clt
    ("train-clt pair malformed", ["train-clt", "--pair", "a", "--out", "{root}/c"], "IN_STORE:OUT_STORE"),
    ("train-clt store missing", ["train-clt", "--pair", "{root}/nostore:{root}/nostore", "--out", "{root}/c"],
     "no activation store"),
    ("train-clt lr 0", ["train-clt", "--pair", "{root}/nostore:{root}/nostore", "--lr", "0", "--out", "{root}/c"],
     "--lr"),
    ("train-clt precision fp16", ["train-clt", "--pair", "{root}/nostore:{root}/nostore", "--precision", "fp16",
                                  "--out", "{root}/c"], "precision must be one of"),
    ("train-clt shards without torchrun", ["train-clt", "--pair", "{root}/nostore:{root}/nostore",
                                           "--shard-latents", "2", "--out", "{root}/c"], "torchrun"),
    # demo, bench
    ("demo out is a file", ["demo", "--out", "{afile}", "--small"], "Not a directory|is a file"),
    ("bench unknown", ["bench", "nosuch"], "invalid choice"),
    ("bench recovery arch", ["bench", "recovery", "--archs", "nosuch", "--out", "{root}/b"], "nosuch"),
    ("bench recovery d 0", ["bench", "recovery", "--d", "0", "--out", "{root}/b"], "--d\\b|\\bd\\b"),
    ("bench recovery config", ["bench", "recovery", "--config", "{root}/bad.yaml"], "bad.yaml"),
    # export
    ("export format", ["export", "--format", "onnx", "--out", "{root}/x"], "onnx"),
    ("export saelens no sae", ["export", "--format", "saelens", "--out", "{root}/x"], "--sae"),
    ("export sae missing", ["export", "--format", "saelens", "--sae", "{root}/nosae", "--out", "{root}/x"],
     "nosae"),
    ("export out is a file", ["export", "--format", "saelens", "--sae", "{sae}", "--out", "{afile}"],
     "is a file"),
    ("export out holds user files", ["export", "--format", "saelens", "--sae", "{sae}", "--out", "{mine}"],
     "not made by llm-sae"),
    ("export neuronpedia no analysis", ["export", "--format", "neuronpedia", "--analysis", "{root}/noanalysis",
                                        "--out", "{root}/x"], "noanalysis"),
]

FIX_WORDS = re.compile(r"\b(use|pass|choose|give|run|rerun|remove|delete|rebuild|harvest|train|free|"
                       r"pick|set|fix|build|analy[sz]e|start over|check|usage)\b|--", re.I)


def test_the_table_is_large_and_covers_every_command():
    commands = {argv[0] for _, argv, _ in CASES}
    assert len(CASES) >= 60
    from llm_sae.cli import COMMANDS

    assert set(COMMANDS) <= commands  # every command, those added later too


@pytest.mark.parametrize("name,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(fx, capsys, name, argv, expect):
    held = None
    subs = {k: str(v) for k, v in fx.items()}
    if any("{busy_port}" in a for a in argv):
        held, port = busy_port()
        subs["busy_port"] = str(port)
    argv = [a.format(**subs) for a in argv]
    before = snapshot(fx["root"])
    try:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    finally:
        if held is not None:
            held.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith("  ")]
    assert len(lines) == 1, err
    assert re.search(expect, lines[0]), lines[0]
    assert FIX_WORDS.search(lines[0]), f"the message names no fix: {lines[0]}"
    assert snapshot(fx["root"]) == before, "a refused command changed files"
