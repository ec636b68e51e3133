"""The activation store: writing, reading, shuffled batches, verify, crash leftovers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_sae.errors import StoreError
from llm_sae.store import StoreWriter, open_store, store_info, verify_store


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
