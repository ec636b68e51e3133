"""The activation store: writing, reading, shuffled batches, verify, crash leftovers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_sae.errors import StoreError
from llm_sae.store.reader import StoreReader
from llm_sae.store.store import open_store
from llm_sae.store.verify import store_info, verify_store
from llm_sae.store.writer import StoreWriter


def write_synthetic(path, n=1000, d=8, dtype="float32", shard_rows=128, seed=0, L=10):
    """Rows whose first column is their own row index, so order checks are exact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    tok = torch.arange(n) % 97
    pos = torch.stack([torch.arange(n) // L, torch.arange(n) % L], 1)
    with StoreWriter(path, meta={"d_in": d, "dtype": dtype, "hook": "h", "context_length": L},
                     shard_rows=shard_rows) as w:
        for a in range(0, n, 50):
            w.append(x[a : a + 50], tok[a : a + 50], pos[a : a + 50])
        w.add_sequences(torch.arange(n // L * L).reshape(-1, L))
    return x, tok, pos


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_every_dtype(tmp_path, dtype):
    x, tok, pos = write_synthetic(tmp_path / "s", dtype=dtype)
    st = open_store(tmp_path / "s")
    tdt = getattr(torch, dtype)
    assert st.n_rows == 1000 and st.d_in == 8 and st.dtype == tdt and st.hook == "h"
    assert len(st.shards) == 7  # 150-row shards cut at 50-row append boundaries (last 100)
    got = st.acts(120, 470)  # spans several shards
    assert got.dtype == tdt
    assert torch.equal(got, x[120:470].to(tdt))
    assert torch.equal(st.token_ids(0, 1000), tok)
    assert torch.equal(st.positions(995, 2000), pos[995:])
    assert torch.equal(st.sequence_tokens([3, 0]), torch.stack([torch.arange(30, 40), torch.arange(10)]))
    xs = x.to(tdt).float()
    assert st.mean_norm == pytest.approx(float(xs.norm(dim=1).mean()), rel=1e-6)
    assert torch.allclose(st.mean, xs.mean(0), rtol=1e-5, atol=1e-5)


def test_minimal_writer_and_defaults(tmp_path):
    w = StoreWriter(tmp_path / "m", meta={"d_in": 4, "dtype": torch.float32})
    w.append(np.ones((3, 4), np.float32))
    w.close()
    st = open_store(tmp_path / "m")
    assert st.n_rows == 3 and st.hook is None
    assert st.token_ids(0, 3).tolist() == [-1, -1, -1]
    with pytest.raises(StoreError, match="already holds a store"):
        StoreWriter(tmp_path / "m", meta={"d_in": 4, "dtype": "float32"})


def test_missing_and_incomplete_stores_are_named(tmp_path):
    with pytest.raises(StoreError, match="no activation store.*llm-sae harvest"):
        open_store(tmp_path / "nope")
    w = StoreWriter(tmp_path / "p", meta={"d_in": 2, "dtype": "float32"}, shard_rows=2)
    w.append(torch.zeros(2, 2))
    w.close(complete=False)
    with pytest.raises(StoreError, match="incomplete.*rerun"):
        open_store(tmp_path / "p")
    assert open_store(tmp_path / "p", allow_incomplete=True).n_rows == 2


def test_nonfinite_rows_refused_and_earlier_shards_kept(tmp_path):
    w = StoreWriter(tmp_path / "n", meta={"d_in": 2, "dtype": "float16"}, shard_rows=2, background=False)
    w.append(torch.ones(2, 2))
    with pytest.raises(StoreError, match="NaN/Inf.*bfloat16"):
        w.append(torch.full((2, 2), 1e6))  # overflows float16
    w.close()
    assert open_store(tmp_path / "n").n_rows == 2
    assert verify_store(tmp_path / "n") == []


def _ids(batch):
    return batch[:, 0].long()


def test_reader_epoch_covers_each_row_once_and_is_deterministic(tmp_path):
    write_synthetic(tmp_path / "s", n=1000)
    st = open_store(tmp_path / "s")
    # A small budget forces several groups, so batches straddle group boundaries.
    kw = dict(seed=3, memory_budget_bytes=3 * 8 * 4 * 96)
    r = st.reader(100, **kw)
    assert r.group_chunks * r.chunk_rows < 1000
    batches = list(r)
    assert len(batches) == len(r) == 10
    seen = torch.cat([_ids(b) for b in batches])
    assert sorted(seen.tolist()) == list(range(1000))
    assert seen.tolist() != list(range(1000))  # actually shuffled
    again = torch.cat([_ids(b) for b in st.reader(100, **kw)])
    assert torch.equal(seen, again)
    other = torch.cat([_ids(b) for b in st.reader(100, **{**kw, "seed": 4})])
    assert not torch.equal(seen, other)


def test_reader_with_rows_dtype_and_resume(tmp_path):
    x, _, _ = write_synthetic(tmp_path / "s", n=1000, dtype="bfloat16")
    st = open_store(tmp_path / "s")
    full = list(st.reader(64, seed=1, with_rows=True, dtype=torch.float16, memory_budget_bytes=20000))
    xb, rows = full[0]
    assert xb.dtype == torch.float16 and xb.shape == (64, 8)
    assert torch.equal(xb, x[rows].to(torch.bfloat16).to(torch.float16))
    resumed = list(st.reader(64, seed=1, with_rows=True, start_batch=5, memory_budget_bytes=20000))
    assert len(resumed) == len(full) - 5
    for (a, ra), (b, rb) in zip(full[5:], resumed, strict=True):
        assert torch.equal(ra, rb) and torch.equal(a.float(), b.float())


def test_reader_loop_and_rank_split(tmp_path):
    write_synthetic(tmp_path / "s", n=1000)
    st = open_store(tmp_path / "s")
    kw = dict(seed=0, memory_budget_bytes=3 * 8 * 4 * 64)
    per_rank = [torch.cat([_ids(b) for b in st.reader(50, rank=r, world_size=3, **kw)]) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1  # same number of batches on every rank
    sets = [set(p.tolist()) for p in per_rank]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    it = iter(st.reader(100, loop=True, **kw))
    two_epochs = torch.cat([_ids(next(it)) for _ in range(20)])
    assert sorted(two_epochs[:1000].tolist()) == sorted(two_epochs[1000:].tolist()) == list(range(1000))
    assert not torch.equal(two_epochs[:1000], two_epochs[1000:])  # reshuffled per epoch
    # start_batch across an epoch boundary lands at the same batch.
    it2 = iter(st.reader(100, loop=True, start_batch=13, **kw))
    assert torch.equal(_ids(next(it2)), two_epochs[1300:1400])


def test_reader_unshuffled_is_store_order(tmp_path):
    write_synthetic(tmp_path / "s", n=300)
    st = open_store(tmp_path / "s")
    ids = torch.cat([_ids(b) for b in st.reader(30, shuffle=False)])
    assert ids.tolist() == list(range(300))


def test_verify_names_truncated_and_altered_shards(tmp_path, capsys):
    from llm_sae.cli import main

    write_synthetic(tmp_path / "s")
    assert verify_store(tmp_path / "s") == []
    assert main(["store", "verify", str(tmp_path / "s")]) == 0
    p2 = tmp_path / "s" / "shard-00002.acts.npy"
    data = bytearray(p2.read_bytes())
    data[-5] ^= 0xFF
    p2.write_bytes(bytes(data))
    p4 = tmp_path / "s" / "shard-00004.acts.npy"
    p4.write_bytes(p4.read_bytes()[:-100])
    problems = verify_store(tmp_path / "s")
    assert any(p.startswith("shard-00002.acts.npy: checksum") for p in problems), problems
    assert any(p.startswith("shard-00004.acts.npy") for p in problems), problems
    assert len(problems) == 2
    assert main(["store", "verify", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "shard-00002.acts.npy" in out and "shard-00004.acts.npy" in out
    assert main(["store", "info", str(tmp_path / "s")]) == 0
    assert "rows         1,000" in capsys.readouterr().out
    assert "hook         h" in store_info(tmp_path / "s")


def test_resume_mode_drops_unlisted_leftovers_and_checks_settings(tmp_path):
    meta = {"d_in": 3, "dtype": "float32", "hook": "a"}
    w = StoreWriter(tmp_path / "r", meta=meta, shard_rows=2, background=False)
    w.append(torch.ones(2, 3), progress={"contexts": 1})
    w.close(complete=False)
    # What a kill between shard rename and manifest update leaves behind:
    (tmp_path / "r" / "shard-00001.acts.npy").write_bytes(b"junk")
    (tmp_path / "r" / "shard-00001.rows.npy.tmp").write_bytes(b"junk")
    with pytest.raises(StoreError, match="hook: store has 'a', requested 'b'"):
        StoreWriter(tmp_path / "r", meta={**meta, "hook": "b"}, mode="resume")
    w = StoreWriter(tmp_path / "r", meta=meta, mode="resume", shard_rows=2)
    assert w.progress == {"contexts": 1} and w.n_rows == 2
    assert not (tmp_path / "r" / "shard-00001.acts.npy").exists()
    w.append(2 * torch.ones(2, 3), progress={"contexts": 2})
    w.close()
    st = open_store(tmp_path / "r")
    assert st.acts(0, 4)[:, 0].tolist() == [1, 1, 2, 2]
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["progress"] == {"contexts": 2}
    assert st.mean_norm == pytest.approx((2 * 3**0.5 + 2 * 12**0.5) / 4)


def test_background_iteration_keeps_order_raises_and_stops_early():
    import threading

    from llm_sae.common.threads import iter_in_background

    assert list(iter_in_background(iter(range(50)), 3, name="t")) == list(range(50))

    def failing():
        yield 1
        raise ValueError("producer broke")

    it = iter_in_background(failing(), 2, name="t")
    assert next(it) == 1
    with pytest.raises(ValueError, match="producer broke"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = iter_in_background(endless(), 2, name="t-endless")
    assert [next(it) for _ in range(5)] == list(range(5))
    it.close()  # the consumer stops: the producer must not run on forever
    import time

    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 5 + 2 + 2
    assert not any(t.name == "t-endless" for t in threading.enumerate())


def test_reader_batch_slice_is_the_slice_of_the_full_batch_and_reads_only_it(tmp_path, monkeypatch):
    """Data-parallel ranks read one batch order and each its own share of every batch."""
    write_synthetic(tmp_path / "s", n=1000, shard_rows=128)
    st = open_store(tmp_path / "s")
    kw = dict(seed=5, memory_budget_bytes=3 * 8 * 4 * 96, with_rows=True, loop=True, start_batch=7)
    it = iter(st.reader(120, **kw))
    full = [next(it) for _ in range(12)]  # crosses an epoch (8 batches each)
    parts = []
    for i in range(3):
        it = iter(st.reader(120, batch_slice=(i, 3), **kw))
        parts.append([next(it) for _ in range(12)])
    for t, (x, rows) in enumerate(full):
        torch.testing.assert_close(torch.cat([p[t][0] for p in parts]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([p[t][1] for p in parts]), rows)
    # A slice never loads whole groups: only its own rows are read.
    loads = []
    monkeypatch.setattr(StoreReader, "_load_group", lambda self, ch: loads.append(ch))
    next(iter(st.reader(120, batch_slice=(1, 3), **kw)))
    assert loads == []
    with pytest.raises(StoreError, match="batch_slice"):
        st.reader(100, batch_slice=(0, 3))


def test_closing_a_background_iterator_ends_its_thread():
    """A looping reader's producer is always mid-way through the next batch; closing the
    iterator must wait for it, or the process can exit while it runs torch code without
    the GIL and abort (issue 23's CI flake: a rank's SIGABRT at exit)."""
    import threading
    import time

    from llm_sae.common.threads import iter_in_background

    def endless():
        i = 0
        while True:
            time.sleep(0.02)  # stands for a batch being gathered, outside the GIL
            yield i
            i += 1

    it = iter_in_background(endless(), 2, name="test-prefetch")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "test-prefetch"]


EXIT_WHILE_PREFETCHING = """
import numpy as np
import torch

from llm_sae.common.threads import iter_in_background

torch.set_num_threads(1)


def batches():
    x = np.random.rand(4096, 256).astype(np.float32)
    while True:
        y = torch.from_numpy(x)
        for _ in range(20):
            y = (y * 1.0001).to(torch.float64).to(torch.float32)  # torch work without the GIL
        yield y[:2]


it = iter_in_background(batches(), 2, name="prefetch")
for _ in range(3):
    next(it)
it.close()  # then the interpreter exits at once, as a finished rank does
"""


@pytest.mark.slow
def test_a_process_that_stops_prefetching_exits_cleanly(tmp_path):
    """The CI flake itself, made certain: exiting right after closing a prefetching
    iterator aborted with "terminate called without an active exception" (20 of 20 runs
    before the producer was joined)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "exit.py"
    script.write_text(EXIT_WHILE_PREFETCHING)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr
