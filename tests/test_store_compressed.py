"""int8 stores (quantised rows + scales) and outlier rows left out of a store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_sae.errors import StoreError
from llm_sae.store.norms import NormHistogram
from llm_sae.store.quant import dequantise, quantise
from llm_sae.store.store import open_store
from llm_sae.store.verify import store_info, verify_store
from llm_sae.store.writer import StoreWriter


def write(path, x, dtype, *, shard_rows=128, step=50, **kw):
    tok = torch.arange(len(x)) % 97
    with StoreWriter(path, {"d_in": x.shape[1], "dtype": dtype}, shard_rows=shard_rows, **kw) as w:
        for a in range(0, len(x), step):
            w.append(x[a : a + step], tok[a : a + step])
    return tok


@pytest.mark.parametrize("dtype,block", [("int8", 8), ("int8_b4", 4)])
def test_int8_store_reads_back_within_half_a_step(tmp_path, dtype, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * torch.logspace(-2, 2, 8)  # columns of very different size
    write(tmp_path / "s", x, dtype)
    st = open_store(tmp_path / "s")
    assert st.dtype == torch.float32 and st.n_rows == 1000 and st.quant_block == (0 if dtype == "int8" else 4)
    assert st.row_bytes == 8 + 4 * (8 // block)  # int8 values + float32 scales
    got = st.acts(120, 470)
    ref = x[120:470]
    step = ref.abs().reshape(350, -1, block).amax(2, keepdim=True) / 127
    assert ((got - ref).abs().reshape(350, -1, block) <= step / 2 * (1 + 1e-5)).all()
    # The reader dequantises the same values, and a batch slice reads the same rows.
    batches = list(st.reader(100, seed=3, with_rows=True))
    xs, rows = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert sorted(rows.tolist()) == list(range(1000))
    assert torch.equal(xs, st.acts(0, 1000)[rows])
    half = next(iter(st.reader(100, seed=3, batch_slice=(1, 2))))
    assert torch.equal(half, batches[0][0][50:])
    # Rows at any indices (a paired store's partner rows) dequantise the same way.
    pick = torch.tensor([999, 3, 128, 127, 500, 3])
    assert torch.equal(st.acts_at(pick.numpy()), st.acts(0, 1000)[pick])
    assert verify_store(tmp_path / "s") == []
    assert "bytes/row" in store_info(tmp_path / "s")


def test_per_block_scales_keep_small_channels_that_a_row_scale_loses():
    x = np.ones((4, 64), np.float32) * 0.01
    x[:, 0] = 100.0  # one massive channel
    for block, ok in ((0, False), (32, True)):
        q, s = quantise(x, block)
        err = (dequantise(q, s).numpy()[:, 32:] - x[:, 32:]).__abs__().max()
        assert (err < 1e-4) == ok


def test_int8_scales_are_verified_and_bad_blocks_refused(tmp_path):
    x = torch.randn(300, 8)
    write(tmp_path / "s", x, "int8")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / m["shards"][0]["files"]["scales"]["file"]).unlink()
    assert any("scales" in p and "missing" in p for p in verify_store(tmp_path / "s"))
    with pytest.raises(StoreError, match="do not divide the width 8"):
        StoreWriter(tmp_path / "t", {"d_in": 8, "dtype": "int8_b3"})
    with pytest.raises(StoreError, match="int8_b<N>"):
        StoreWriter(tmp_path / "t", {"d_in": 8, "dtype": "int4"})


def test_int8_store_resumes_with_the_same_bytes(tmp_path):
    x = torch.randn(400, 8)
    write(tmp_path / "a", x, "int8_b4", max_norm_multiple=3.0)
    with StoreWriter(tmp_path / "b", {"d_in": 8, "dtype": "int8_b4"}, shard_rows=128,
                     max_norm_multiple=3.0) as w:
        for a in range(0, 200, 50):
            w.append(x[a : a + 50], torch.arange(a, a + 50) % 97)
    w = StoreWriter(tmp_path / "b", {"d_in": 8, "dtype": "int8_b4"}, mode="resume", shard_rows=128,
                    max_norm_multiple=3.0)
    for a in range(200, 400, 50):
        w.append(x[a : a + 50], torch.arange(a, a + 50) % 97)
    w.close()
    ma, mb = (json.loads((tmp_path / s / "manifest.json").read_text()) for s in "ab")
    assert ma["stats"] == mb["stats"] and ma["outliers"] == mb["outliers"]
    assert torch.equal(open_store(tmp_path / "a").acts(0, 400), open_store(tmp_path / "b").acts(0, 400))


def test_outlier_rows_are_left_out_and_counted_with_their_tokens(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 16, generator=g)
    big = [3, 250, 251, 777]
    x[big] *= 1000  # attention-sink-like rows
    tok = write(tmp_path / "s", x, "float32", max_norm_multiple=50)
    st = open_store(tmp_path / "s")
    keep = torch.ones(1000, dtype=torch.bool)
    keep[big] = False
    assert st.n_rows == 996 and torch.equal(st.acts(0, 996), x[keep])
    assert torch.equal(st.token_ids(0, 996), tok[keep])
    out = st.manifest["outliers"]
    assert out["count"] == 4 and out["max_norm_multiple"] == 50
    assert out["token_ids"] == {str(int(t)): 1 for t in tok[big]}
    assert st.mean_norm == pytest.approx(float(x[keep].norm(dim=1).mean()), rel=1e-5)
    # The histogram saw every row; the info shows the tail and what was left out.
    hist = NormHistogram.from_json(st.manifest["stats"]["norm_hist"])
    assert hist.total == 1000
    assert hist.quantile(0.5) == pytest.approx(float(x.norm(dim=1).median()), rel=0.07)
    info = store_info(tmp_path / "s")
    assert ">100×median 4" in info and "4 rows left out" in info


def test_without_a_limit_every_row_is_kept(tmp_path):
    x = torch.randn(200, 4)
    x[5] *= 1e4
    write(tmp_path / "s", x, "float32")
    st = open_store(tmp_path / "s")
    assert st.n_rows == 200 and "outliers" not in st.manifest
    with pytest.raises(StoreError, match="above 1"):
        StoreWriter(tmp_path / "t", {"d_in": 4, "dtype": "float32"}, max_norm_multiple=0.5)


@pytest.mark.slow
def test_harvest_int8_with_outliers_keeps_hook_stores_aligned(tiny_gpt2_dir, text_dir, tmp_path):
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    cfg = dict(model=str(tiny_gpt2_dir), dataset=str(text_dir / "docs.jsonl"), tokens=300,
               context_length=32, batch_size=4, device="cpu", shard_rows=64, progress=False)
    ref = harvest(HarvestConfig(hook=hooks, out=str(tmp_path / "f"), **cfg))
    got = harvest(HarvestConfig(hook=hooks, out=str(tmp_path / "q"), dtype="int8",
                                max_norm_multiple=1.3, **cfg))
    r = {h: open_store(d) for h, d in ref.items()}
    q = {h: open_store(d) for h, d in got.items()}
    n = q[hooks[0]].n_rows
    dropped = q[hooks[0]].manifest["outliers"]["count"]
    assert 0 < dropped and n + dropped == 300
    assert q[hooks[1]].n_rows == n and q[hooks[1]].manifest["outliers"] == q[hooks[0]].manifest["outliers"]
    assert torch.equal(q[hooks[0]].positions(0, n), q[hooks[1]].positions(0, n))
    for h in hooks:
        # The same positions as the float32 store's, dequantised to within a step.
        pos_r = [tuple(p) for p in r[h].positions(0, 300).tolist()]
        idx = torch.tensor([pos_r.index(tuple(p)) for p in q[h].positions(0, n).tolist()])
        x_ref, x_q = r[h].acts(0, 300)[idx], q[h].acts(0, n)
        assert ((x_q - x_ref).abs().amax(1) <= x_ref.abs().amax(1) / 254 * 1.001).all()
        assert verify_store(got[h]) == []


def test_harvest_refuses_bad_store_settings_before_loading_the_model(tmp_path):
    from llm_sae.errors import DataError
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    base = dict(model="no/such-model", hook=["blocks.0.hook_resid_post"], dataset="stdlib", tokens=10,
                out=str(tmp_path / "s"), device="cpu", progress=False)
    with pytest.raises(StoreError, match="unsupported store dtype 'int4'"):
        harvest(HarvestConfig(**base, dtype="int4"))
    with pytest.raises(StoreError, match="above 1"):
        harvest(HarvestConfig(**base, max_norm_multiple=1.0))
    with pytest.raises(DataError, match="is a store dtype"):
        harvest(HarvestConfig(**base, model_dtype="int8"))
    assert not (tmp_path / "s").exists()
