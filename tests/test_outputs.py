"""Issue 23: nothing a user made is touched, a killed rewrite leaves no valid-looking mix,
what is read is checked, and a run records what identifies its data.

The kill tests run a stage in a child process that SIGKILLs itself at a named point
(``LLM_SAE_TEST_KILL``, ``llm_sae.common.faults``): while writing into its temp folder,
just before the swap, and between the swap's two renames. Whatever the point, the output
folder then holds the previous output, byte for byte, and a rerun writes the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_sae.cli import main
from llm_sae.common.outdir import check_output
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY
from llm_sae.store.writer import StoreWriter

D, ROWS, CTX, HOOK = 8, 600, 16, "blocks.0.hook_resid_post"

pytestmark = pytest.mark.usefixtures("one_thread")


def write_store(path: Path, *, nan_rows: int = 0, rows: int = ROWS, model: str | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    n_seq = rows // (CTX - 1) + 1
    toks_SL = torch.randint(1, 50, (n_seq, CTX), generator=g)
    seq = torch.arange(n_seq)[:, None].expand(n_seq, CTX)[:, 1:].reshape(-1)[:rows]
    pos = torch.arange(CTX)[None, :].expand(n_seq, CTX)[:, 1:].reshape(-1)[:rows]
    x = torch.randn(rows, D, generator=g)
    tok, pos_N2 = toks_SL[:, 1:].reshape(-1)[:rows], torch.stack([seq, pos], 1)
    meta = {"d_in": D, "dtype": "float32", "hook": HOOK, "context_length": CTX,
            **({"model": model} if model else {})}
    with StoreWriter(path, meta=meta, shard_rows=200) as w:
        for a in range(0, rows, 200):
            w.append(x[a : a + 200], tok[a : a + 200], pos_N2[a : a + 200])
        w.add_sequences(toks_SL)
    if nan_rows:  # the writer refuses NaN rows: put them in afterwards, as a bad disk would
        acts = np.load(path / "shard-00001.acts.npy", mmap_mode="r+")
        acts[torch.randperm(200, generator=g)[:nan_rows].numpy(), 0] = np.nan
        acts.flush()
    return path


def write_sae(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    REGISTRY["topk"](SAEConfig(d_in=D, n_latents=16, k=4)).save(path)
    (path / "train_cfg.json").write_text(json.dumps({"source": {"hook": HOOK}}))
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    f = {"root": root, "store": write_store(root / "store")}
    f["sae1"], f["sae2"] = write_sae(root / "sae1", 1), write_sae(root / "sae2", 2)
    for i in (1, 2):
        assert main(analyze_args(f, f[f"sae{i}"], root / f"analysis{i}")) == 0
    return f


def analyze_args(f: dict[str, Path], sae: Path, out: Path) -> list[str]:
    return ["analyze", "--sae", str(sae), "--store", str(f["store"]), "--out", str(out), "--no-logits",
            "--no-progress", "--device", "cpu", "--n-neighbours", "2"]


def stage_args(stage: str, f: dict[str, Path], version: int, out: Path) -> list[str]:
    """The command of ``stage`` writing version 1 or 2 of its output into ``out``."""
    sae, analysis = f[f"sae{version}"], f["root"] / f"analysis{version}"
    if stage == "analyze":
        return analyze_args(f, sae, out)
    if stage == "dashboard":
        return ["dashboard", "--analysis", str(analysis), "--out", str(out)]
    if stage == "eval":
        return ["eval", "--sae", str(sae), "--store", str(f["store"]), "--out", str(out), "--device", "cpu",
                "--no-downstream", "--no-amortization", "--no-progress"]
    return ["export", "--format", "saelens", "--sae", str(sae), "--out", str(out)]


KIND = {"analyze": "analysis", "dashboard": "site", "eval": "eval", "export": "export"}


def run_killed(argv: list[str], point: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLM_SAE_TEST_KILL=f"{point}:1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "llm_sae.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


# Every stage killed while writing its new output; the swap itself (common to all, in
# llm_sae/common/outdir.py) killed on either side of its first rename, in one stage.
KILLS = [("analyze", ("mid_output",)), ("dashboard", ("mid_output",)), ("eval", ("mid_output",)),
         ("export", ("mid_output", "before_swap", "mid_swap"))]


@pytest.mark.slow
@pytest.mark.parametrize("stage,points", KILLS, ids=[k[0] for k in KILLS])
def test_a_rewrite_killed_anywhere_leaves_the_old_output_whole(fx, tmp_path, stage, points):
    out = tmp_path / "out"
    assert main(stage_args(stage, fx, 1, out)) == 0
    old = snapshot(out)
    assert main(stage_args(stage, fx, 2, tmp_path / "ref")) == 0
    new = snapshot(tmp_path / "ref")
    assert old != new
    for point in points:
        p = run_killed(stage_args(stage, fx, 2, out), point)
        assert p.returncode == -9, (point, p.stderr[-2000:])
        if point == "mid_swap":
            assert not out.exists()  # between the renames: the old output waits beside it...
            check_output(out, KIND[stage])  # ...and the next command's check puts it back
        assert snapshot(out) == old, point
    assert main(stage_args(stage, fx, 2, out)) == 0
    assert snapshot(out) == new or stage in ("analyze", "eval")  # timings differ run to run
    if stage == "analyze":
        assert json.loads((out / "summary.json").read_text())["sae"]["path"].endswith("sae2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no temp folder left


def test_train_never_restarts_silently_nor_deletes_a_damaged_checkpoint(fx, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--store", str(fx["store"]), "--out", str(out), "--n-latents", "16", "--k", "4",
            "--tokens", "256", "--batch-size", "64", "--device", "cpu"]
    assert main(args) == 0
    (out / "checkpoint" / "meta.json").unlink()  # a checkpoint damaged by hand or by a bad disk
    before = snapshot(out)
    assert main([*args, "--tokens", "512"]) == 2  # not a silent restart from step 0
    assert snapshot(out) == before  # and nothing removed
    assert main([*args, "--tokens", "512", "--no-resume"]) == 0  # asked for: starts over
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 8


def test_harvest_and_train_leave_foreign_files_alone(fx, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "shard-00000.acts.npy").write_bytes(b"my own array")
    (mine / "log.jsonl").write_text("my log\n")
    assert main(["train", "--store", str(fx["store"]), "--out", str(mine), "--batch-size", "64",
                 "--tokens", "128", "--n-latents", "16", "--k", "4", "--device", "cpu"]) == 2
    assert main(["harvest", "--model", "nomodel", "--hook", HOOK, "--dataset", str(mine / "log.jsonl"),
                 "--tokens", "8", "--out", str(mine)]) == 2
    assert (mine / "shard-00000.acts.npy").read_bytes() == b"my own array"
    assert sorted(p.name for p in mine.iterdir()) == ["log.jsonl", "shard-00000.acts.npy"]


def test_nan_rows_cost_rows_not_batches_and_are_counted(tmp_path, capsys):
    """0.5% NaN rows: with batch-level skipping about 3 in 4 batches of 256 would go."""
    store = write_store(tmp_path / "s", nan_rows=3)
    out = tmp_path / "o"
    assert main(["train", "--store", str(store), "--out", str(out), "--n-latents", "16", "--k", "4",
                 "--tokens", str(64 * 20), "--batch-size", "64", "--log-every", "5", "--device", "cpu",
                 "--no-verify-store"]) == 0
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["skipped_batches"] == 0 and 1 <= last["skipped_rows"] <= 9
    assert last["step"] == 20
    assert f"left out {last['skipped_rows']} rows with NaN/Inf" in capsys.readouterr().err


def test_train_checks_checksums_by_default(fx, tmp_path):
    store = write_store(tmp_path / "s")
    shard = store / "shard-00001.acts.npy"
    blob = bytearray(shard.read_bytes())
    blob[-7] ^= 0x01  # one flipped bit in a value: same size, same header
    shard.write_bytes(bytes(blob))
    args = ["train", "--store", str(store), "--out", str(tmp_path / "o"), "--n-latents", "16", "--k", "4",
            "--tokens", "128", "--batch-size", "64", "--device", "cpu"]
    assert main(args) == 2
    assert not (tmp_path / "o").exists()
    assert main([*args, "--no-verify-store"]) == 0  # the user may opt out


def test_analyze_refuses_a_shard_cut_short(fx, tmp_path, capsys):
    store = write_store(tmp_path / "s")
    shard = store / "shard-00002.acts.npy"
    shard.write_bytes(shard.read_bytes()[:-4 * D * 50])  # 50 rows gone
    assert main(analyze_args({"store": store}, fx["sae1"], tmp_path / "a")) == 2
    assert "shard-00002.acts.npy" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_run_records_what_identifies_its_data_not_where_it_ran(fx, tmp_path, monkeypatch):
    """train from one folder with a relative --store, export from another: the export
    still names the model and hook (it wrote model_name: null)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_store(work / "store", model="tiny-model")
    assert main(["train", "--store", "store", "--out", "run", "--n-latents", "16", "--k", "4",
                 "--tokens", "128", "--batch-size", "64", "--device", "cpu"]) == 0
    rec = json.loads((work / "run" / "train_cfg.json").read_text())
    assert Path(rec["store"]).is_absolute()
    assert rec["source"]["hook"] == HOOK and rec["source"]["model"] == "tiny-model"
    assert len(rec["source"]["fingerprint"]) == 16
    monkeypatch.chdir(tmp_path)
    import shutil

    shutil.rmtree(work / "store")  # the store is gone from where it was: the record suffices
    assert main(["export", "--format", "saelens", "--sae", str(work / "run"), "--out", "x"]) == 0
    meta = json.loads((tmp_path / "x" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "tiny-model" and meta["hook_name"] == HOOK


def test_store_fingerprint_is_the_data_not_the_folder(fx, tmp_path):
    import shutil

    from llm_sae.store.store import open_store

    shutil.copytree(fx["store"], tmp_path / "moved")
    assert open_store(tmp_path / "moved").fingerprint == open_store(fx["store"]).fingerprint
    other = write_store(tmp_path / "other", rows=400)
    assert open_store(other).fingerprint != open_store(fx["store"]).fingerprint
    assert np.load(fx["store"] / "shard-00000.acts.npy", mmap_mode="r").shape == (200, D)
