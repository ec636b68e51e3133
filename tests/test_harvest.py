"""Harvest: hook kinds against a direct forward pass, errors, resume after SIGKILL, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_sae.errors import DataError, ModelError, StoreError
from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.run import harvest
from llm_sae.lm.hooks import load_model
from llm_sae.store.store import open_store
from llm_sae.store.verify import verify_store


def cfg_for(model_dir, text_dir, out, **kw):
    base = dict(
        model=str(model_dir), hook=["blocks.0.hook_resid_post"], dataset=str(text_dir / "docs.jsonl"),
        tokens=300, out=str(out), context_length=32, batch_size=4, device="cpu", shard_rows=64,
        progress=False,
    )
    base.update(kw)
    return HarvestConfig(**base)


def direct(model, store, hooks):
    """Run the model on the store's own contexts and pick the stored rows."""
    pos = store.positions(0, store.n_rows)
    seqs = torch.unique(pos[:, 0])
    tokens = store.sequence_tokens(seqs)
    _, cache = model.run_with_cache(tokens, names_filter=hooks)
    row_of_seq = {int(s): i for i, s in enumerate(seqs)}
    b = torch.tensor([row_of_seq[int(s)] for s in pos[:, 0]])
    return {h: cache[h][b, pos[:, 1]] for h in hooks}


def test_every_hook_kind_matches_a_direct_forward(tiny_gpt2_dir, text_dir, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out",
             "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    dirs = harvest(cfg_for(tiny_gpt2_dir, text_dir, tmp_path / "o", hook=hooks, tokens=250))
    assert set(dirs) == set(hooks) and all(d == tmp_path / "o" / h for h, d in dirs.items())
    stores = {h: open_store(d) for h, d in dirs.items()}
    model = load_model(str(tiny_gpt2_dir))
    ref = direct(model, stores[hooks[0]], hooks)
    for h, st in stores.items():
        assert st.n_rows == 250 and st.d_in == 32 and st.hook == h
        assert torch.allclose(st.acts(0, 250), ref[h], atol=1e-5), h
    from llm_sae.cli import main

    assert main(["store", "verify", str(tmp_path / "o")]) == 0  # the parent: every hook's store
    # The residual stream adds up: post = pre + attn_out + mlp_out.
    a = {h: stores[h].acts(0, 250) for h in hooks}
    assert torch.equal(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"])
    assert torch.allclose(a["blocks.1.hook_resid_pre"] + a["blocks.1.hook_attn_out"] + a["blocks.1.hook_mlp_out"],
                          a["blocks.1.hook_resid_post"], atol=1e-5)
    # Every row knows its token and context, and BOS/EOS rows were left out.
    st = stores[hooks[0]]
    pos, tok = st.positions(0, 250), st.token_ids(0, 250)
    ctx = st.sequence_tokens(pos[:, 0])
    assert torch.equal(ctx[torch.arange(250), pos[:, 1]], tok)
    special = set(st.manifest["special_token_ids"])
    assert special and not special & set(tok.tolist())
    assert (ctx[:, 0] == model.tokenizer.bos_token_id).all()


def test_llama_resid_and_keeping_special_tokens(tiny_llama_dir, text_dir, tmp_path):
    d = harvest(cfg_for(tiny_llama_dir, text_dir, tmp_path / "l", hook=["blocks.1.hook_mlp_out"],
                        skip_special=False, tokens=200, dtype="bfloat16"))["blocks.1.hook_mlp_out"]
    st = open_store(d)
    assert d == tmp_path / "l" and st.dtype == torch.bfloat16 and st.n_rows == 200
    assert st.positions(0, 1).tolist() == [[0, 0]]  # BOS kept this time
    ref = direct(load_model(str(tiny_llama_dir)), st, ["blocks.1.hook_mlp_out"])["blocks.1.hook_mlp_out"]
    assert torch.equal(st.acts(0, 200), ref.to(torch.bfloat16))


def test_misspelled_hook_lists_close_matches(tiny_gpt2_dir, text_dir, tmp_path):
    with pytest.raises(ModelError, match=r"no hook 'blocks\.0\.hook_resid_pst'; did you mean blocks\.0\.hook_resid_post") as e:
        harvest(cfg_for(tiny_gpt2_dir, text_dir, tmp_path / "x", hook=["blocks.0.hook_resid_pst"]))
    assert "L in 0..1" in str(e.value) and "hook_mlp_out" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_bad_text_is_refused_before_any_store_is_made(tiny_gpt2_dir, text_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty or too short"):
        harvest(cfg_for(tiny_gpt2_dir, text_dir, tmp_path / "e", dataset=str(empty)))
    with pytest.raises(DataError, match=r"no column 'body'.*\['text'\].*--text-column"):
        harvest(cfg_for(tiny_gpt2_dir, text_dir, tmp_path / "e", text_column="body"))
    assert not (tmp_path / "e").exists()


def test_rerun_finished_does_nothing_and_other_settings_are_refused(tiny_store, tiny_gpt2_dir, text_dir, capsys):
    before = {p.name: p.read_bytes() for p in tiny_store.iterdir()}
    cfg = cfg_for(tiny_gpt2_dir, text_dir, tiny_store, tokens=2000, batch_size=16, shard_rows=512)
    harvest(cfg)
    assert "already complete" in capsys.readouterr().err
    with pytest.raises(StoreError, match="context_length: store has 32, requested 16") as e:
        harvest(cfg_for(tiny_gpt2_dir, text_dir, tiny_store, tokens=2000, context_length=16))
    assert "another --out" in str(e.value)
    with pytest.raises(StoreError, match="harvest.tokens: store has 2000, requested 5"):
        harvest(cfg_for(tiny_gpt2_dir, text_dir, tiny_store, tokens=5))
    assert {p.name: p.read_bytes() for p in tiny_store.iterdir()} == before


def test_python_iterable_dataset_and_cli(tiny_gpt2_dir, tmp_path, capsys):
    from llm_sae.cli import main
    from llm_sae.lm.testing import make_text

    d = harvest(cfg_for(tiny_gpt2_dir, tmp_path, tmp_path / "py", dataset=make_text(40), tokens=100))
    st = open_store(d["blocks.0.hook_resid_post"])
    assert st.n_rows == 100 and st.manifest["dataset"]["name"] == "<python list>"
    (tmp_path / "t.txt").write_text("\n".join(make_text(40)))
    rc = main(["harvest", "--model", str(tiny_gpt2_dir), "--hook", "blocks.1.hook_resid_pre",
               "--dataset", str(tmp_path / "t.txt"), "--tokens", "90", "--out", str(tmp_path / "cli"),
               "--context-length", "16", "--batch-size", "3", "--device", "cpu", "--no-progress"])
    assert rc == 0 and open_store(tmp_path / "cli").n_rows == 90
    assert main(["harvest", "--model", str(tiny_gpt2_dir), "--hook", "blocks.9.hook_resid_pre",
                 "--dataset", str(tmp_path / "t.txt"), "--tokens", "9", "--out", str(tmp_path / "c2")]) == 2
    assert "has no hook 'blocks.9.hook_resid_pre'" in capsys.readouterr().err


def test_nan_activations_stop_with_earlier_shards_kept(tiny_gpt2_dir, text_dir, tmp_path):
    """A token whose embedding is NaN first appears after some batches were written."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from llm_sae.lm.text import iter_documents, pack_contexts

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    ctxs = [c for c, _ in pack_contexts(iter_documents(str(text_dir / "docs.jsonl")), tok, 32)][:40]
    early = {t for c in ctxs[:12] for t in c.tolist()}
    later = [t for c in ctxs[12:] for t in c.tolist() if t not in early]
    assert later, "test text has no token that first appears late"
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        model.transformer.wte.weight[later[0]] = float("nan")
    bad = tmp_path / "nan_model"
    model.save_pretrained(bad)
    tok.save_pretrained(bad)
    out = tmp_path / "n"
    with pytest.raises(ModelError, match="NaN/Inf.*shards already written are kept.*float32"):
        harvest(cfg_for(bad, text_dir, out, tokens=1200, shard_rows=32))
    st = open_store(out, allow_incomplete=True)
    assert not st.manifest["complete"] and st.n_rows >= 12 * 31 - 31
    assert verify_store(out)[0].endswith("incomplete (harvest not finished)")
    assert len(verify_store(out)) == 1


# --- crash safety: a real SIGKILL, then the same command again -------------------------

def _cli_args(model_dir, text_dir, out):
    return ["harvest", "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post,blocks.1.hook_mlp_out",
            "--dataset", str(text_dir / "docs.jsonl"), "--tokens", "700", "--out", str(out),
            "--context-length", "32", "--batch-size", "4", "--device", "cpu", "--shard-rows", "100",
            "--dtype", "float16", "--no-progress"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkilled_harvest_resumes_byte_identical(tiny_gpt2_dir, text_dir, tmp_path):
    """Killed at one write point after another, each rerun resuming the last; then finished."""
    from llm_sae.cli import main

    ref = tmp_path / "ref"
    assert main(_cli_args(tiny_gpt2_dir, text_dir, ref)) == 0
    out = tmp_path / "killed"
    seen = []
    # mid-file: a shard's temp file half written; before_manifest: shard renamed but not
    # listed; after_manifest: a clean shard boundary.
    for point in ["mid_file:3", "before_manifest:4", "after_manifest:3"]:
        env = {**os.environ, "LLM_SAE_TEST_KILL": point, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "llm_sae.cli", *_cli_args(tiny_gpt2_dir, text_dir, out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        for h in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
            if (out / h / "manifest.json").exists():  # what a reader sees of a killed store
                problems = verify_store(out / h)
                assert problems == ["manifest.json: store is incomplete (harvest not finished)"], problems
        m = out / "blocks.0.hook_resid_post" / "manifest.json"
        seen.append(json.loads(m.read_text())["n_rows"] if m.exists() else 0)
    assert seen[0] < seen[1] < seen[2] < 700  # each rerun made progress
    # And killed from outside at an arbitrary moment, once the store has grown a little.
    import time

    proc = subprocess.Popen([sys.executable, "-m", "llm_sae.cli", *_cli_args(tiny_gpt2_dir, text_dir, out)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    m = out / "blocks.1.hook_mlp_out" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if json.loads(m.read_text())["n_rows"] > seen[2]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(_cli_args(tiny_gpt2_dir, text_dir, out)) == 0  # the same command again
    assert _snapshot(out) == _snapshot(ref)
    for h in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
        assert open_store(out / h).n_rows == 700


# --- distributed ---------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process_up_to_row_order(tiny_gpt2_dir, text_dir, tmp_path):
    args = _cli_args(tiny_gpt2_dir, text_dir, tmp_path / "dist")
    one = harvest(cfg_for(tiny_gpt2_dir, text_dir, tmp_path / "one", tokens=700, batch_size=4,
                          hook=["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], dtype="float16",
                          shard_rows=100))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "llm_sae.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for h, d in one.items():
        a, b = open_store(d), open_store(tmp_path / "dist" / h)
        assert b.n_rows == a.n_rows == 700
        assert {s["name"].split("-")[1] for s in b.shards} == {"r0", "r1"}
        key = lambda st: {tuple(p): i for i, p in enumerate(st.positions(0, st.n_rows).tolist())}
        ka, kb = key(a), key(b)
        assert ka.keys() == kb.keys()
        order = torch.tensor([kb[p] for p in ka])
        assert torch.equal(a.acts(0, 700), b.acts(0, 700)[order])
        assert b.mean_norm == pytest.approx(a.mean_norm, rel=1e-9)
        assert verify_store(tmp_path / "dist" / h) == []
        json.loads((tmp_path / "dist" / h / "manifest.rank1.json").read_text())


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tiny_gpt2_dir, text_dir, tmp_path, capsys,
                                                         monkeypatch):
    """ENOSPC while a shard is written: exit 2 with one line naming the fix (it was a
    traceback), every shard before it kept, and the same command then finishes the store."""
    import errno

    from llm_sae.cli import main
    from llm_sae.store import writer

    real, calls = writer.atomic_save_npy, []

    def fill_up(path, pieces):
        calls.append(path)
        if len(calls) > 4:  # the third shard's files
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, pieces)

    monkeypatch.setattr(writer, "atomic_save_npy", fill_up)
    args = ["harvest", "--model", str(tiny_gpt2_dir), "--hook", "blocks.0.hook_resid_post",
            "--dataset", str(text_dir / "docs.jsonl"), "--tokens", "400", "--out", str(tmp_path / "s"),
            "--context-length", "16", "--batch-size", "4", "--shard-rows", "60", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "full" in err[0] and "rerun the same command" in err[0]
    assert "Traceback" not in err[0]
    monkeypatch.setattr(writer, "atomic_save_npy", real)
    assert main(args) == 0
    assert open_store(tmp_path / "s").n_rows == 400 and verify_store(tmp_path / "s") == []
