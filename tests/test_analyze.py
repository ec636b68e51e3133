"""Analysis: planted features on synthetic stores, exact streaming state, output format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llm_sae.analyze.accumulate import BottomSlots, act_key
from llm_sae.analyze.config import AnalyzeConfig
from llm_sae.analyze.effects import token_strings
from llm_sae.analyze.run import analyze
from llm_sae.common.analysis_files import load_feature, load_index, load_summary
from llm_sae.errors import AnalyzeError, CheckpointError, StoreError
from llm_sae.sae.config import SAEConfig
from llm_sae.sae.registry import REGISTRY
from llm_sae.store.writer import StoreWriter

V, L, S, D = 20, 12, 40, 4
PLANT = 7  # the token feature 0 fires on
BEFORE, AFTER = 3, 2


def make_data(seed=0):
    """Sequences of L tokens (position 0 is BOS = 0, which the store leaves out).

    Feature 0 reads x[0], which is nonzero only on PLANT tokens (value 1..4, with ties);
    feature 1 reads x[1] > 0 on every row (dense); feature 2 never fires; feature 3
    reads x[2], an integer 1..64 (for the interval bins).
    """
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(8, V, (S, L), generator=g)
    toks[:, 0] = 0
    for s in range(0, S, 3):
        toks[s, 5] = PLANT
    toks[1, 1], toks[2, L - 1], toks[4, 6] = PLANT, PLANT, PLANT  # at both sequence edges, and twice in seq 4
    seq = torch.arange(S)[:, None].expand(S, L)
    pos = torch.arange(L)[None, :].expand(S, L)
    keep = pos >= 1
    t, s_, p_ = toks[keep], seq[keep], pos[keep]
    n = t.numel()
    x = torch.zeros(n, D)
    x[:, 0] = torch.where(t == PLANT, (1 + s_ % 4).float(), torch.zeros(()))
    x[:, 1] = (1 + torch.arange(n) % 3).float()
    x[:, 2] = torch.randint(1, 65, (n,), generator=g).float()
    x[x[:, 2].argmax(), 2] = 64.0
    return toks, x, t, torch.stack([s_, p_], 1)


def write_store(path, x, t, pos_N2, toks, meta=None):
    m = {"d_in": D, "dtype": "float32", "hook": "blocks.0.hook_resid_post", "context_length": L}
    m.update(meta or {})
    with StoreWriter(path, meta=m, shard_rows=100) as w:
        for a in range(0, len(x), 37):
            w.append(x[a : a + 37], t[a : a + 37], pos_N2[a : a + 37])
        w.add_sequences(toks)
    return path


def make_sae(path, d=D):
    sae = REGISTRY["topk"](SAEConfig(d_in=d, n_latents=4, k=3))
    with torch.no_grad():
        W = torch.zeros(4, d)
        W[0, 0], W[1, 1], W[3, 2] = 1.0, 1.0, 1.0
        W[2] = -1.0
        sae.W_enc.copy_(W)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(4, d) if d >= 4 else torch.randn(4, d))
    sae.save(path)
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    toks, x, t, pos = make_data()
    write_store(root / "store", x, t, pos, toks)
    make_sae(root / "sae")
    return root, toks, x, t, pos


def cfg_for(root, out, **kw):
    base = dict(sae=str(root / "sae"), store=str(root / "store"), out=str(out), top_k=8,
                context_before=BEFORE, context_after=AFTER, n_bins=8, per_bin=3, progress=False,
                device="cpu", batch_size=13, n_neighbours=2)
    base.update(kw)
    return AnalyzeConfig(**base)


@pytest.fixture(scope="module")
def result(synth, tmp_path_factory):
    root = synth[0]
    out = tmp_path_factory.mktemp("out") / "a"
    analyze(cfg_for(root, out))
    return out


def test_planted_feature_top_examples_have_its_token_contexts_and_acts(synth, result):
    _, toks, x, t, pos = synth
    rec = load_feature(result, 0)
    planted = (t == PLANT).nonzero().squeeze(1)
    assert rec["count"] == len(planted) and not rec["dead"]
    vals = x[planted, 0]
    assert rec["max_act"] == float(vals.max())
    assert rec["mean_act"] == pytest.approx(float(vals.mean()), rel=1e-3)
    ex = rec["top_examples"]
    assert len(ex) == 8
    # Descending activation, equal activations by store row: the exact expected list.
    order = sorted(planted.tolist(), key=lambda r: (-float(x[r, 0]), r))[:8]
    assert [e["row"] for e in ex] == order
    for e in ex:
        s, p = int(pos[e["row"], 0]), int(pos[e["row"], 1])
        assert (e["seq"], e["pos"]) == (s, p) and e["act"] == float(x[e["row"], 0])
        lo = max(0, p - BEFORE)
        window = toks[s, lo : p + AFTER + 1].tolist()
        assert e["tokens"] == [f"<id {i}>" for i in window]
        assert e["peak"] == p - lo and e["tokens"][e["peak"]] == f"<id {PLANT}>"
        for i, (tok_id, a) in enumerate(zip(window, e["acts"], strict=True)):
            if lo + i == 0:
                assert a is None  # BOS: the store has no row there
            elif tok_id == PLANT:
                assert a == float(1 + s % 4)
            else:
                assert a == 0
    assert rec["top_tokens"] == [f"<id {PLANT}>"]
    # The example at the right edge of its sequence is cut there, not padded.
    edge = [e for e in load_feature(result, 0)["interval_examples"] for e in e["examples"]] + ex
    for e in edge:
        assert len(e["tokens"]) == len(e["acts"]) <= BEFORE + AFTER + 1


def test_interval_examples_fall_in_their_bins_and_counts_are_exact(synth, result):
    _, _, x, _, _ = synth
    rec = load_feature(result, 3)
    v = x[:, 2]
    assert rec["count"] == len(v) and rec["max_act"] == 64.0
    bins = rec["interval_examples"]
    assert len(bins) == 8 and bins[0]["lo"] == 0 and bins[-1]["hi"] >= 64
    for j, b in enumerate(bins):
        last = j == len(bins) - 1
        inside = (v >= b["lo"]) & ((v <= b["hi"]) if last else (v < b["hi"]))
        assert b["count"] == int(inside.sum())
        assert b["share"] == pytest.approx(b["count"] / len(v), rel=1e-3)
        assert len(b["examples"]) == min(3, b["count"])
        for e in b["examples"]:
            assert b["lo"] <= e["act"] < b["hi"] or (last and e["act"] == b["hi"])
            assert e["act"] == float(x[e["row"], 2])
    assert sum(b["count"] for b in bins) == rec["count"]
    h = rec["histogram"]
    assert sum(h["counts"]) == rec["count"] and len(h["counts"]) == 32
    edges = np.array(h["edges"])
    assert np.all(np.diff(edges) > 0) and edges[0] == 0 and edges[-1] >= 64
    assert np.histogram(v.numpy(), bins=edges)[0].tolist() == h["counts"]


def test_dead_and_dense_features_and_summary(synth, result):
    _, _, x, _, _ = synth
    dead = load_feature(result, 2)
    assert dead["dead"] and dead["count"] == 0 and dead["log10_density"] is None
    assert dead["top_examples"] == [] and dead["interval_examples"] == []
    dense = load_feature(result, 1)
    assert dense["dense"] and dense["density"] == 1.0 and dense["log10_density"] == 0
    s = load_summary(result)
    assert s["n_features"] == 4 and s["tokens_analysed"] == len(x)
    assert s["n_dead"] == 1 and s["n_dense"] == 2
    assert s["density_histogram"]["n_dead"] == 1 and sum(s["density_histogram"]["counts"]) == 3
    n_planted = int((x[:, 0] > 0).sum())
    assert s["l0"]["mean"] == pytest.approx((2 * len(x) + n_planted) / len(x), rel=1e-3)
    assert s["l0"]["max"] == 3
    assert s["logits"]["available"] is False and "model" in s["logits"]["reason"]
    idx = load_index(result)
    assert [r["id"] for r in idx] == [0, 1, 2, 3]
    assert idx[0]["count"] == load_feature(result, 0)["count"]
    # Neighbours by decoder cosine: atoms are orthonormal, so all cosines are 0.
    nb = load_feature(result, 0)["neighbours"]["decoder_cosine"]
    assert len(nb) == 2 and 0 not in [n["id"] for n in nb]


def test_one_batch_or_many_gives_identical_output(synth, result, tmp_path):
    root = synth[0]
    analyze(cfg_for(root, tmp_path / "one", batch_size=100_000))
    for name in ["features.jsonl", "features/shard_00000.jsonl"]:
        assert (tmp_path / "one" / name).read_bytes() == (result / name).read_bytes()


def test_excluded_positions_are_not_counted_or_chosen(synth, tmp_path):
    root, _, x, t, pos = synth
    analyze(cfg_for(root, tmp_path / "ex", exclude_positions=[1, 6]))
    rec = load_feature(tmp_path / "ex", 0)
    keep = (t == PLANT) & ~torch.isin(pos[:, 1], torch.tensor([1, 6]))
    assert rec["count"] == int(keep.sum())
    assert all(e["pos"] not in (1, 6) for e in rec["top_examples"])
    s = load_summary(tmp_path / "ex")
    assert s["tokens_analysed"] == int((~torch.isin(pos[:, 1], torch.tensor([1, 6]))).sum())
    assert s["rows_excluded"] == len(x) - s["tokens_analysed"]


def test_tokens_limit(synth, tmp_path):
    root, _, x, t, _ = synth
    analyze(cfg_for(root, tmp_path / "lim", tokens=100))
    assert load_summary(tmp_path / "lim")["tokens_analysed"] == 100
    rec = load_feature(tmp_path / "lim", 0)
    assert rec["count"] == int((t[:100] == PLANT).sum())
    assert all(e["row"] < 100 for e in rec["top_examples"])


def test_bottom_slots_ties_are_ordered_by_row_in_any_batching():
    """Top-k of many equal values keeps the smallest rows, however the items arrive."""
    g = torch.Generator().manual_seed(1)
    n_items = 500
    bucket = torch.randint(0, 5, (n_items,), generator=g)
    val = torch.randint(1, 5, (n_items,), generator=g).float() / 8  # many ties
    row = torch.arange(n_items) * 3  # the pass offers rows in increasing order
    outs = []
    for chunk in (n_items, 7, 64):
        s = BottomSlots(5, 6, 1, "cpu")
        for a in range(0, n_items, chunk):
            sl = slice(a, a + chunk)
            s.merge(bucket[sl], act_key(val[sl]), row[sl], val[sl], row[sl], lambda i: torch.zeros(len(i), 1))
        outs.append((s.row.clone(), s.val.clone()))
    for b in range(5):
        m = bucket == b
        exp = sorted(zip((-val[m]).tolist(), row[m].tolist(), strict=True))[:6]
        assert outs[0][0][b].tolist() == [r for _, r in exp]
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])


def test_clear_errors(synth, tmp_path):
    root, toks, x, t, pos = synth
    with pytest.raises(CheckpointError, match="no SAE"):
        analyze(cfg_for(root, tmp_path / "o", sae=str(tmp_path / "nope")))
    make_sae(tmp_path / "wide", d=8)
    with pytest.raises(AnalyzeError, match="d_in=8.*d_in=4"):
        analyze(cfg_for(root, tmp_path / "o", sae=str(tmp_path / "wide")))
    StoreWriter(tmp_path / "empty", meta={"d_in": D, "dtype": "float32"}).close()
    with pytest.raises(StoreError, match="no rows"):
        analyze(cfg_for(root, tmp_path / "o", store=str(tmp_path / "empty")))


def test_load_feature_rejects_bad_ids_and_missing_output(result, tmp_path):
    with pytest.raises(AnalyzeError, match="out of range"):
        load_feature(result, 4)
    with pytest.raises(AnalyzeError, match="run `llm-sae analyze`"):
        load_feature(tmp_path, 0)


def test_shard_offsets_address_single_records(synth, tmp_path):
    root = synth[0]
    out = tmp_path / "sh"
    analyze(cfg_for(root, out, shard_size=3))
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "shard_00000.idx.json", "shard_00000.jsonl", "shard_00001.idx.json", "shard_00001.jsonl"]
    offs = json.loads((out / "features" / "shard_00000.idx.json").read_text())
    assert len(offs) == 4 and offs[-1] == (out / "features" / "shard_00000.jsonl").stat().st_size
    assert [load_feature(out, i)["id"] for i in range(4)] == [0, 1, 2, 3]


def test_token_strings_keep_whitespace(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    strings = token_strings(tok)
    assert len(strings) == len(tok)
    raw = tok.convert_ids_to_tokens(list(range(len(tok))))
    nl = raw.index("Ċ")
    assert strings[nl] == "\n"
    sp = next(i for i, r in enumerate(raw) if r.startswith("Ġ") and len(r) > 2)
    assert strings[sp] == " " + raw[sp][1:]
    assert strings[tok.bos_token_id] == "<|endoftext|>"


@pytest.mark.slow
def test_logit_effects_fold_the_final_norm(tiny_gpt2_dir, tmp_path):
    """Against the formula written out by hand on the real model's weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    d = model.config.n_embd
    with torch.no_grad():  # a non-trivial final LayerNorm scale, so folding it matters
        model.transformer.ln_f.weight.copy_(torch.linspace(0.2, 3.0, d))
    model.save_pretrained(tiny_gpt2_dir.parent / "g2")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(tiny_gpt2_dir.parent / "g2")
    g = torch.Generator().manual_seed(0)
    n, rows = 6, 200
    x = torch.randn(rows, d, generator=g)
    toks = torch.randint(1, 100, (rows // 10, 10), generator=g)
    pos = torch.stack([torch.arange(rows) // 10, torch.arange(rows) % 10], 1)
    with StoreWriter(tmp_path / "st", meta={"d_in": d, "dtype": "float32", "context_length": 10,
                                            "model": str(tiny_gpt2_dir.parent / "g2")}) as w:
        w.append(x, toks.reshape(-1), pos)
        w.add_sequences(toks)
    sae = REGISTRY["topk"](SAEConfig(d_in=d, n_latents=n, k=2))
    sae.save(tmp_path / "sae")
    analyze(AnalyzeConfig(sae=str(tmp_path / "sae"), store=str(tmp_path / "st"), out=str(tmp_path / "o"),
                          progress=False, device="cpu", n_logits=5))
    s = load_summary(tmp_path / "o")
    assert s["logits"] == {"available": True, "reason": None, "norm": "layernorm"}
    W_U = model.lm_head.weight.detach()
    gam = model.transformer.ln_f.weight.detach()
    strings = token_strings(AutoTokenizer.from_pretrained(tiny_gpt2_dir))
    for f in range(n):
        a = sae.W_dec[f].detach()
        eff = W_U @ (gam * (a - a.mean()))
        eff -= eff.mean()
        rec = load_feature(tmp_path / "o", f)
        top = eff.topk(5)
        assert [p["id"] for p in rec["logits"]["promoted"]] == top.indices.tolist()
        assert [p["value"] for p in rec["logits"]["promoted"]] == pytest.approx(top.values.tolist(), rel=1e-3)
        assert [p["token"] for p in rec["logits"]["promoted"]] == [strings[i] for i in top.indices.tolist()]
        bot = (-eff).topk(5)
        assert [p["id"] for p in rec["logits"]["suppressed"]] == bot.indices.tolist()
    # Token strings come from the model's tokenizer; the vocabulary is written once.
    vocab = json.loads((tmp_path / "o" / "vocab.json").read_text())
    assert vocab["tokens"] == strings
    ex = load_feature(tmp_path / "o", 0)["top_examples"][0]
    assert ex["tokens"][ex["peak"]] == strings[int(toks.reshape(-1)[ex["row"]])]


@pytest.mark.slow
def test_end_to_end_on_a_harvested_store(request, tmp_path):
    pytest.importorskip("llm_sae.harvest")
    from llm_sae.store.store import open_store

    tiny_store, tiny_gpt2_dir = request.getfixturevalue("tiny_store"), request.getfixturevalue("tiny_gpt2_dir")

    st = open_store(tiny_store)
    sae = REGISTRY["topk"](SAEConfig(d_in=st.d_in, n_latents=64, k=4))
    sae.save(tmp_path / "sae")
    s = analyze(AnalyzeConfig(sae=str(tmp_path / "sae"), store=str(tiny_store), out=str(tmp_path / "o"),
                              progress=False, device="cpu", exclude_bos=True, batch_size=256))
    assert s["tokens_analysed"] + s["rows_excluded"] == st.n_rows
    assert s["l0"]["max"] <= 4 and s["logits"]["available"]
    idx = load_index(tmp_path / "o")
    live = [r for r in idx if not r["dead"]]
    assert live and len(idx) == 64
    rec = load_feature(tmp_path / "o", live[0]["id"])
    e = rec["top_examples"][0]
    toks = st.sequence_tokens([e["seq"]])[0]
    assert e["tokens"][e["peak"]] == token_strings(
        __import__("transformers").AutoTokenizer.from_pretrained(tiny_gpt2_dir))[int(toks[e["pos"]])]
    assert len(json.dumps(rec)) < 30_000
    assert not any(math.isnan(a) for ex in rec["top_examples"] for a in ex["acts"] if a is not None)


def test_cli_runs_and_reports_errors_without_traceback(synth, tmp_path, capsys):
    from llm_sae.cli import main

    root = synth[0]
    args = ["analyze", "--sae", str(root / "sae"), "--store", str(root / "store"), "--out", str(tmp_path / "c"),
            "--top-k", "4", "--context-before", "2", "--context-after", "1", "--exclude-positions", "1,6",
            "--device", "cpu", "--no-progress", "--batch-size", "64"]
    assert main(args) == 0
    assert "4 features" in capsys.readouterr().out
    rec = load_feature(tmp_path / "c", 0)
    assert len(rec["top_examples"]) == 4 and all(len(e["tokens"]) <= 4 for e in rec["top_examples"])
    assert load_summary(tmp_path / "c")["options"]["exclude_positions"] == [1, 6]
    bad = ["analyze", "--sae", str(tmp_path / "nope"), "--store", str(root / "store"), "--out", str(tmp_path / "d")]
    assert main(bad) == 2
    assert "no SAE" in capsys.readouterr().err


def test_short_model_names_give_real_token_strings():
    """`--model tiny-stdlib` (a short name, not a path) must still find the tokenizer."""
    from llm_sae.analyze.effects import load_tokenizer, token_strings, unembedding

    tok = load_tokenizer("tiny-stdlib")
    assert tok is not None
    strings = token_strings(tok)
    assert "self" in strings and not any(s.startswith("<id ") for s in strings[:100])
    W_U, _, why = unembedding("tiny-stdlib", 128)
    assert W_U is not None, why
