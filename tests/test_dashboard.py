"""The site writer: escaping of untrusted token text, the data files' contents, the size
budget, and errors on bad input. The pages themselves are tested in test_browser.py."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from browser_util import VOCAB, XSS_TOKENS, make_record, write_analysis

from llm_sae.cli import main as cli_main
from llm_sae.common.outdir import OutputError
from llm_sae.dashboard.build import build_dashboard
from llm_sae.dashboard.config import DashboardConfig, DashboardError
from llm_sae.dashboard.records import (
    feature_js,
    feature_relpath,
    js_literal,
    pick_interval_examples,
)


def _payload(path: Path) -> object:
    """The JSON inside a data file (``X=...;`` or ``LLM_SAE_FEATURE(id,...);``)."""
    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r"(?:window\.\w+=|LLM_SAE_FEATURE\(\d+,)(.*?)\)?;\n", text, flags=re.S)
    assert m, text[:200]
    return json.loads(m.group(1))


def _tokens(rec: dict, ex: dict) -> list[str]:
    return [rec["vocab"][i] for i in ex["t"]]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    analysis = write_analysis(root / "analysis", n_features=23, shard_size=10)
    out = root / "site"
    stats = build_dashboard(DashboardConfig(analysis=str(analysis), out=str(out)))
    return analysis, out, stats


def test_js_literal_cannot_close_a_script_and_round_trips():
    obj = {
        "toks": XSS_TOKENS + ["a\u2028b\u2029c", "</SCRIPT >", "<!-- x -->", "&lt;"],
        "x": float("nan"),
        "y": [1.5, float("inf")],
    }
    text = js_literal(obj)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    back = json.loads(text)
    assert back["toks"] == obj["toks"]
    assert back["x"] is None and back["y"] == [1.5, None]


def test_site_layout_and_index_columns(site):
    analysis, out, stats = site
    for rel in ("index.html", "feature.html", "live.html", "assets/style.css", "assets/common.js",
                "assets/index.js", "assets/feature.js", "assets/live.js", "data/meta.js", "data/index.js"):
        assert (out / rel).is_file(), rel
    assert stats["n_features"] == 23
    assert len(list((out / "data" / "features").rglob("f_*.js"))) == 23
    index = _payload(out / "data" / "index.js")
    records = [json.loads(line) for line in (analysis / "features.jsonl").read_text().splitlines()]
    assert index["id"] == list(range(23))
    assert index["dead"] == [1 if r["dead"] else 0 for r in records]
    assert index["top"] == [r["top_tokens"] for r in records]
    assert index["max_act"][5] == pytest.approx(records[5]["max_act"], rel=1e-3)
    meta = _payload(out / "data" / "meta.js")
    assert meta["model"] == "tiny-gpt2" and meta["hook"] == "blocks.1.hook_resid_post"
    assert meta["architecture"] == "topk" and meta["k"] == 4 and meta["n_features"] == 23
    assert meta["sae_name"] == "tiny-topk" and meta["metrics"]["l0"] == 4.0


def test_feature_file_holds_the_record_with_links(site):
    analysis, out, _ = site
    shard = (analysis / "features" / "shard_00001.jsonl").read_text().splitlines()
    src = json.loads(shard[2])  # feature 12
    rec = _payload(out / feature_relpath(12))
    assert rec["id"] == 12 and rec["prev"] == 11 and rec["next"] == 13
    assert rec["density"] == pytest.approx(src["density"], rel=1e-3)
    assert len(rec["top"]) == 20 and len(rec["top"][0]["t"]) == len(src["top_examples"][0]["tokens"])
    # Token text comes back exactly, XSS payloads and all.
    assert _tokens(rec, rec["top"][3]) == src["top_examples"][3]["tokens"]
    assert rec["top"][3]["p"] == src["top_examples"][3]["peak"]
    acts = src["top_examples"][3]["acts"]
    assert [None if a is None else pytest.approx(a, rel=5e-3, abs=1e-9) for a in acts] == rec["top"][3]["a"]
    assert [n[0] for n in rec["nbrs"]] == [x["id"] for x in src["neighbours"]["decoder_cosine"]]
    assert rec["logits"]["pos"][0][0] == src["logits"]["promoted"][0]["token"]
    # 10 interval examples spread one per bin, bins kept lowest first.
    assert sum(len(b["ex"]) for b in rec["intervals"]) == 10
    assert [b["lo"] for b in rec["intervals"]] == sorted(b["lo"] for b in rec["intervals"])
    first, last = _payload(out / feature_relpath(0)), _payload(out / feature_relpath(22))
    assert first["prev"] is None and last["next"] is None


def test_no_raw_markup_or_external_resources_in_the_site(site):
    _, out, _ = site
    for path in (out / "data").rglob("*.js"):
        text = path.read_text(encoding="utf-8")
        assert "<" not in text and "\u2028" not in text, path
    for path in list(out.glob("*.html")) + list((out / "assets").iterdir()):
        text = path.read_text(encoding="utf-8")
        # Only the SVG namespace URI is allowed; no CDN, font or remote script.
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text)
        assert all(u.startswith("http://www.w3.org/") for u in urls), (path, urls)
        assert "@import" not in text and "url(" not in text


def test_feature_with_20_and_10_examples_fits_30kb():
    """Realistic windows (33 tokens) with nearly every token distinct: worst case for the
    per-feature token table; and 200-token windows are cut to fit the budget."""
    cfg = DashboardConfig(analysis="-", out="-")
    big_vocab = [f" word{j}" for j in range(5000)] + VOCAB
    for width in (33, 200):
        rec = make_record(1, 10, random.Random(width), dead=False, width=width, vocab=big_vocab)
        text = feature_js(rec, cfg, 0, 2)
        site = json.loads(text[len("LLM_SAE_FEATURE(1,"):-3])
        assert len(site["top"]) == 20 and sum(len(b["ex"]) for b in site["intervals"]) == 10
        assert len(text.encode()) <= 30_000, (width, len(text.encode()))
        if width == 33:
            assert len(site["top"][0]["t"]) == 33  # small enough: nothing cut
        else:
            ex, src = site["top"][0], rec["top_examples"][0]
            assert len(ex["t"]) < 200
            assert site["vocab"][ex["t"][ex["p"]]] == src["tokens"][src["peak"]]


def test_lone_surrogate_token_is_written_as_an_escape(tmp_path):
    rng = random.Random(1)
    odd = make_record(0, 2, rng, dead=False)
    odd["top_examples"][0]["tokens"][0] = "\udcff"
    analysis = write_analysis(tmp_path / "a", n_features=2, records={0: odd})
    build_dashboard(DashboardConfig(analysis=str(analysis), out=str(tmp_path / "s")))
    rec = _payload(tmp_path / "s" / feature_relpath(0))
    assert rec["vocab"][rec["top"][0]["t"][0]] == "\udcff"


def test_interval_budget_round_robin_from_top_bin():
    bins = [{"lo": 0, "examples": [1, 2, 3]}, {"lo": 1, "examples": []}, {"lo": 2, "examples": [1, 2]}]
    assert pick_interval_examples(bins, 3) == [1, 0, 2]
    assert pick_interval_examples(bins, 1) == [0, 0, 1]
    assert pick_interval_examples(bins, 99) == [3, 0, 2]


def test_rebuild_replaces_old_data_and_refuses_foreign_dirs(tmp_path):
    analysis = write_analysis(tmp_path / "a", n_features=12, shard_size=5)
    out = tmp_path / "site"
    build_dashboard(DashboardConfig(analysis=str(analysis), out=str(out)))
    small = write_analysis(tmp_path / "b", n_features=3)
    build_dashboard(DashboardConfig(analysis=str(small), out=str(out)))
    assert len(list((out / "data" / "features").rglob("f_*.js"))) == 3
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not made by llm-sae"):
        build_dashboard(DashboardConfig(analysis=str(small), out=str(foreign)))
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_bad_analysis_dirs_name_the_problem(tmp_path):
    out = str(tmp_path / "site")
    with pytest.raises(DashboardError, match="not a directory"):
        build_dashboard(DashboardConfig(analysis=str(tmp_path / "nope"), out=out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DashboardError, match="summary.json is missing"):
        build_dashboard(DashboardConfig(analysis=str(tmp_path / "empty"), out=out))
    a = write_analysis(tmp_path / "a", n_features=12, shard_size=5)
    summary = json.loads((a / "summary.json").read_text())
    (a / "summary.json").write_text(json.dumps({**summary, "format_version": 99}))
    with pytest.raises(DashboardError, match="format_version 99"):
        build_dashboard(DashboardConfig(analysis=str(a), out=out))
    (a / "summary.json").write_text(json.dumps(summary))
    (a / "features" / "shard_00002.jsonl").unlink()
    with pytest.raises(DashboardError, match="shard_00002.jsonl is missing"):
        build_dashboard(DashboardConfig(analysis=str(a), out=out))


def test_cli_builds_a_site(tmp_path, capsys):
    analysis = write_analysis(tmp_path / "a", n_features=4)
    rc = cli_main(["dashboard", "--analysis", str(analysis), "--out", str(tmp_path / "s"), "--max-examples", "5"])
    assert rc == 0
    assert "wrote 4 features" in capsys.readouterr().out
    assert len(_payload(tmp_path / "s" / feature_relpath(0))["top"]) == 5
    assert cli_main(["dashboard", "--analysis", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2


@pytest.mark.slow
def test_renders_real_analyze_output(tmp_path, tiny_store, tiny_gpt2_dir):
    """The whole hand-off: a real `analyze` run over a tiny store becomes a site whose
    feature files hold the same examples, token strings and neighbours."""
    torch = pytest.importorskip("torch")
    from llm_sae.analyze.config import AnalyzeConfig
    from llm_sae.analyze.run import analyze
    from llm_sae.common.analysis_files import load_feature
    from llm_sae.sae.config import SAEConfig
    from llm_sae.sae.registry import REGISTRY

    torch.manual_seed(0)
    REGISTRY["topk"](SAEConfig(d_in=32, n_latents=48, k=4)).save(tmp_path / "sae")
    analyze(AnalyzeConfig(sae=str(tmp_path / "sae"), store=str(tiny_store), out=str(tmp_path / "an"),
                          model=str(tiny_gpt2_dir), progress=False))
    stats = build_dashboard(DashboardConfig(analysis=str(tmp_path / "an"), out=str(tmp_path / "site")))
    assert stats["n_features"] == 48 and stats["feature_bytes_max"] <= 30_000
    meta = _payload(tmp_path / "site" / "data" / "meta.js")
    assert meta["hook"] == "blocks.0.hook_resid_post" and meta["architecture"] == "topk"
    index = _payload(tmp_path / "site" / "data" / "index.js")
    live = [i for i in range(48) if not index["dead"][i]]
    assert live
    for fid in live[:5]:
        src = load_feature(tmp_path / "an", fid)
        rec = _payload(tmp_path / "site" / feature_relpath(fid))
        assert len(rec["top"]) == len(src["top_examples"])
        assert _tokens(rec, rec["top"][0]) == src["top_examples"][0]["tokens"]
        assert rec["top"][0]["v"] == pytest.approx(src["top_examples"][0]["act"], rel=1e-3)
        assert [n[0] for n in rec["nbrs"]] == [x["id"] for x in src["neighbours"]["decoder_cosine"]]
        assert index["top"][fid] == src["top_tokens"]
