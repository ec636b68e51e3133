"""Evaluation metrics against reference formulas; loss recovered at its known endpoints."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from llm_sae.evaluate.amortization import amortization_gap
from llm_sae.evaluate.config import EvalConfig
from llm_sae.evaluate.downstream import downstream_metrics, eval_contexts
from llm_sae.evaluate.plot import write_frontier_png
from llm_sae.evaluate.run import evaluate_saes
from llm_sae.evaluate.stats import ReconstructionStats, selectivity
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


def _topk(d=8, n=24, k=3, seed=0):
    torch.manual_seed(seed)
    sae = REGISTRY["topk"](SAEConfig(d_in=d, n_latents=n, k=k)).eval()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae


class Replace:
    """An 'SAE' whose reconstruction is a fixed function of x (identity, zeros, a mean)."""

    def __init__(self, fn):
        self.fn = fn

    def encode(self, x):
        return x

    def decode(self, z):
        return self.fn(z)


def test_row_metrics_match_reference_formulas():
    sae = _topk()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 8, generator=g) * 2 + 1
    toks = torch.randint(0, 5, (70,), generator=g)
    st = ReconstructionStats(24, None)
    for s in range(0, 70, 32):  # streaming over uneven batches must not change anything
        st.add(sae, x[s : s + 32], toks[s : s + 32])
    rep = st.summary(dense_threshold=0.2)
    r, sp = rep["reconstruction"], rep["sparsity"]
    with torch.no_grad():
        z = sae.encode(x)
        xh = sae.decode(z)
    err = (x - xh).pow(2).sum()
    assert r["mse"] == pytest.approx(float(err / x.numel()), rel=1e-5)
    fvu = float(err / (x - x.mean(0)).pow(2).sum())
    assert r["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert r["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    assert r["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(x, xh).mean()), rel=1e-5)
    gamma = float((xh * x).sum() / xh.pow(2).sum())
    assert r["shrinkage"] == pytest.approx(gamma, rel=1e-5)
    # γ really is the least-squares scale: nudging it either way makes ‖γx̂ − x‖ worse.
    best = (gamma * xh - x).pow(2).sum()
    assert best < (1.05 * gamma * xh - x).pow(2).sum() and best < (0.95 * gamma * xh - x).pow(2).sum()
    on = z > 0
    assert sp["l0"]["mean"] == pytest.approx(float(on.sum(1).float().mean()))
    assert sp["l0"]["max"] == int(on.sum(1).max())
    freq = on.float().mean(0)
    assert sp["dead_frac"] == pytest.approx(float((freq == 0).float().mean()))
    assert sp["dense_frac"] == pytest.approx(float((freq > 0.2).float().mean()))
    assert sp["lifetime_sparsity"]["mean"] == pytest.approx(float(freq.mean()), rel=1e-5)
    torch.testing.assert_close(torch.tensor(st.per_feature()["lifetime_sparsity"], dtype=torch.float64), freq.double())
    assert sp["population_sparsity"]["mean"] == pytest.approx(float(on.float().mean(1).mean()), rel=1e-5)
    # Treves–Rolls population sparseness of one row, by hand.
    a = z[0].double()
    tr = (1 - a.mean() ** 2 / a.pow(2).mean()) / (1 - 1 / 24)
    assert float(torch.cat(st.pop_tr)[0]) == pytest.approx(float(tr), rel=1e-5)


def test_threshold_changes_what_counts_as_active():
    sae = _topk()
    x = torch.randn(40, 8)
    a = ReconstructionStats(24, None)
    b = ReconstructionStats(24, 1e9)
    a.add(sae, x)
    b.add(sae, x)
    assert a.summary(0.1)["sparsity"]["l0"]["mean"] > 0
    assert b.summary(0.1)["sparsity"]["l0"]["mean"] == 0
    assert b.summary(0.1)["sparsity"]["dead_frac"] == 1.0


def _gini(v):
    v = torch.sort(v.double()).values
    n = v.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2 * (i * v).sum() / (n * v.sum()) - (n + 1) / n)


def test_selectivity_matches_dense_reference():
    g = torch.Generator().manual_seed(2)
    R, N, V = 300, 6, 9
    tokens = torch.randint(0, V, (R,), generator=g)
    z = torch.rand(R, N, generator=g) * (torch.rand(R, N, generator=g) < 0.3)
    z[:, 4] = 0  # a dead latent
    z[:, 5] = (tokens == 3).float() * 2.0  # fires on one token only
    rows, feats = z.nonzero(as_tuple=True)
    gini, share, top = selectivity(tokens[rows], feats, z[rows, feats], tokens, N)
    present = torch.unique(tokens)
    for f in range(N):
        m = torch.stack([z[tokens == t, f].mean() for t in present])
        if m.sum() == 0:
            assert torch.isnan(gini[f]) and top[f] == -1
            continue
        assert float(gini[f]) == pytest.approx(_gini(m), abs=1e-5)
        assert float(share[f]) == pytest.approx(float(m.max() / m.sum()), abs=1e-5)
        assert int(top[f]) == int(present[m.argmax()])
    n = present.numel()
    assert float(gini[5]) == pytest.approx((n - 1) / n, abs=1e-6) and float(share[5]) == pytest.approx(1.0)


def test_amortization_gap_on_planted_codes():
    # Data that is exactly sparse in the SAE's own dictionary: FISTA at the encoder's L0
    # must reconstruct at least as well as a random encoder does.
    sae = _topk(d=16, n=48, k=4)
    g = torch.Generator().manual_seed(3)
    codes = torch.zeros(32, 48)
    for i in range(32):
        codes[i, torch.randperm(48, generator=g)[:4]] = torch.rand(4, generator=g) + 0.5
    with torch.no_grad():
        x = codes @ sae.W_dec + sae.b_dec
    out = amortization_gap(sae, x, iters=100)
    assert out["l0_encoder"] == pytest.approx(4.0)
    assert out["l0_fista"] == pytest.approx(4.0, rel=0.15)
    assert out["fvu_fista_refit"] < out["fvu_encoder"]
    assert out["fvu_fista_refit"] <= out["fvu_fista"] + 1e-6  # the refit removes shrinkage
    assert out["gap"] > 0


@pytest.fixture(scope="module")
def bridge(tiny_gpt2_dir):
    from llm_sae.lm.hooks import load_model

    return load_model(str(tiny_gpt2_dir))


def test_loss_recovered_endpoints(bridge, tiny_store):
    from llm_sae.store.store import open_store

    store = open_store(tiny_store)
    cfg = EvalConfig(sae=["x"], store=str(tiny_store), n_contexts=6, context_length=24)
    ctx, info = eval_contexts(store, bridge.tokenizer, cfg)
    assert ctx.shape == (6, 24) and info["source"].startswith("store dataset, after")
    mean = store.mean
    saes = {
        "identity": Replace(lambda x: x),
        "zero": Replace(lambda x: torch.zeros_like(x)),
        "mean": Replace(lambda x: mean.expand_as(x)),
    }
    special = store.manifest["special_token_ids"]
    d = downstream_metrics(bridge, store.hook, saes, ctx, mean_D=mean, special_ids=special, batch_size=4)
    # A random-weight model: ablations change the loss, in either direction.
    assert d["ce_zero_ablation"] != d["ce_clean"] and d["ce_mean_ablation"] != d["ce_clean"]
    s = d["saes"]
    assert s["identity"]["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-5)
    assert s["identity"]["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
    assert s["identity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert s["zero"]["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-5)
    assert s["mean"]["loss_recovered_mean"] == pytest.approx(0.0, abs=1e-5)
    assert s["zero"]["kl"] == pytest.approx(d["kl_zero_ablation"], rel=1e-5)
    # Every context starts with BOS: those positions are left clean and out of the average.
    assert d["tokens"] <= 6 * 23 - 6
    d_all = downstream_metrics(bridge, store.hook, saes, ctx, mean_D=mean, special_ids=special,
                               exclude_special=False, batch_size=6)
    assert d_all["tokens"] == 6 * 23


def _read_png(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert (depth, ctype) == (8, 2) and len(raw) == h * (1 + 3 * w) and b"IEND" in chunks
    return w, h, raw


def test_cli_end_to_end_writes_report_table_and_png(tiny_store, tmp_path, capsys):
    from llm_sae.cli import main

    dirs = []
    for i, k in enumerate((2, 6)):
        sae = _topk(d=32, n=64, k=k, seed=i)
        dirs.append(str(sae.save(tmp_path / f"sae_k{k}")))
    out = tmp_path / "ev"
    rc = main(["eval", "--sae", dirs[0], "--sae", dirs[1], "--store", str(tiny_store), "--out", str(out),
               "--eval-rows", "300", "--n-contexts", "4", "--context-length", "16", "--amortization-rows", "32",
               "--fista-iters", "50", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sae_k2" in printed and "LR(mean)" in printed
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["saes"]) == {"sae_k2", "sae_k6"}
    assert rep["eval_rows"] == {"start": 1700, "stop": 2000, "note": rep["eval_rows"]["note"]}
    for name, k in (("sae_k2", 2), ("sae_k6", 6)):
        e = rep["saes"][name]
        assert e["sparsity"]["l0"]["max"] <= k
        assert e["reconstruction"]["rows"] == 300
        assert e["downstream"]["loss_recovered_mean"] is not None
        assert "fvu_fista" in e["amortization"]
        assert e["selectivity"]["n_token_ids"] > 1
    feats = json.loads((out / "features.json").read_text())
    assert len(feats["sae_k2"]["lifetime_sparsity"]) == 64
    w, h, raw = _read_png((out / "frontier.png").read_bytes())
    assert w == 1000 and len(set(raw)) > 2  # something was drawn


def test_without_store_evaluates_on_the_store_the_saes_record_else_one_line_error(tiny_store, tmp_path, capsys):
    """A sweep trained from a store records it (train_cfg.json): eval needs no --store then.
    SAEs that record none, different ones, or one that is gone are refused, naming why."""
    from llm_sae.cli import main

    def sae_dir(name, store):
        d = _topk(d=32, n=64, k=2, seed=0).save(tmp_path / name)
        if store is not None:
            (d / "train_cfg.json").write_text(json.dumps({"store": str(store), "arch": "topk"}))
        return str(d)

    flags = ["--eval-rows", "100", "--no-amortization", "--no-downstream", "--no-progress"]
    a, b = sae_dir("a", tiny_store), sae_dir("b", tiny_store)
    assert main(["eval", "--sae", a, "--sae", b, "--out", str(tmp_path / "ev"), *flags]) == 0
    assert "using the store the SAEs were trained on" in capsys.readouterr().err
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert Path(rep["store"]) == Path(tiny_store) and set(rep["saes"]) == {"a", "b"}
    for dirs, why in (([a, sae_dir("c", None)], "not every SAE records"),
                      ([a, sae_dir("d", tmp_path / "elsewhere")], "trained on different stores"),
                      ([sae_dir("e", tmp_path / "gone")], "no longer there")):
        assert main(["eval", *[f for d in dirs for f in ("--sae", d)], "--out", str(tmp_path / why[:3]), *flags]) != 0
        err = capsys.readouterr().err
        assert "give --store DIR" in err and why in err and len(err.strip().splitlines()) == 1


def test_frontier_png_without_downstream(tmp_path):
    rep = {"saes": {f"s{i}": {"arch": "topk", "sparsity": {"l0": {"mean": float(i + 1)}},
                                "reconstruction": {"fvu": 1 / (i + 2)}} for i in range(3)}}
    _read_png(write_frontier_png(rep, tmp_path / "f.png").read_bytes())


def test_identity_reconstruction_is_perfect_on_store_tail(tiny_store):
    from llm_sae.store.store import open_store

    store = open_store(tiny_store)
    rep = evaluate_saes({"id": Replace(lambda x: x)}, store,
                        EvalConfig(sae=["x"], store="", eval_rows=100, amortization=False, progress=False))
    assert rep["eval_rows"]["start"] == store.n_rows - 100
    e = rep["saes"]["id"]
    assert e["reconstruction"]["rows"] == 100
    assert e["reconstruction"]["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert e["reconstruction"]["cosine"] == pytest.approx(1.0)
    assert e["reconstruction"]["shrinkage"] == pytest.approx(1.0)
    assert "amortization" not in e and "downstream" not in rep


def test_transcoder_and_clt_runs_without_a_usable_train_cfg_are_one_line_errors(tmp_path):
    """A folder with no train_cfg.json, or one naming no complete pairs / no stores, is an
    EvalError naming the file and the fix, not a traceback."""
    import json

    from llm_sae.evaluate.clt import _pairs
    from llm_sae.evaluate.config import EvalError
    from llm_sae.evaluate.transcoders import _stores

    for read, fix in ((_pairs, "train-clt trained into"), (_stores, "run folder llm-sae train wrote")):
        with pytest.raises(EvalError, match=f"train_cfg.json.*{fix}") as e:
            read(tmp_path)
        assert "\n" not in str(e.value)
    (tmp_path / "train_cfg.json").write_text(json.dumps({"pairs": [{"store": "a"}], "store": str(tmp_path / "none")}))
    with pytest.raises(EvalError, match="no complete pairs"):
        _pairs(tmp_path)
    from llm_sae.errors import LlmSaeError

    with pytest.raises(LlmSaeError, match="store"):  # the store it names is missing: the store's own error
        _stores(tmp_path)
