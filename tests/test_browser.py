"""The dashboard in a real browser (headless Chromium through Playwright): opened from disk
and through `llm-sae serve`, sorting, filtering, search, tooltips, navigation, and token
text that tries to inject markup. Screenshots go to a temporary folder (or to
$DASHBOARD_SHOTS) for a person to look at."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from browser_util import (
    CHROMIUM_ARGS,
    HOOK_SCRIPT,
    XSS_TOKENS,
    chromium_path,
    make_record,
    write_analysis,
)

from llm_sae.dashboard.build import build_dashboard
from llm_sae.dashboard.config import DashboardConfig
from llm_sae.dashboard.records import js_literal
from llm_sae.serve.config import ServeConfig
from llm_sae.serve.server import make_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (apt-get install chromium, or set $CHROMIUM)"
)

N = 60
XSS_ID = 5
# Tokens of the first top example of feature XSS_ID, peak on the first payload.
SPECIAL = XSS_TOKENS + [" ", "\n", "\t", "\u202e", "é", "\ufffd", " the"]


def _special_record() -> dict:
    rec = make_record(XSS_ID, N, random.Random(5), dead=False)
    ex = rec["top_examples"][0]
    ex["tokens"] = list(SPECIAL)
    ex["acts"] = [round(rec["max_act"] * (1 - 0.05 * i), 3) for i in range(len(SPECIAL))]
    ex["peak"], ex["act"] = 0, ex["acts"][0]
    rec["top_tokens"] = XSS_TOKENS[:3] + [" ", "\n"]
    rec["logits"]["promoted"][0]["token"] = XSS_TOKENS[1]
    return rec


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    analysis = write_analysis(root / "analysis", n_features=N, shard_size=25, records={XSS_ID: _special_record()})
    out = root / "site"
    build_dashboard(DashboardConfig(analysis=str(analysis), out=str(out)))
    index = json.loads((out / "data" / "index.js").read_text()[len("window.LLM_SAE_INDEX="):-2])
    return out, index


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = os.environ.get("DASHBOARD_SHOTS")
    path = Path(d) if d else tmp_path_factory.mktemp("shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _context(browser, bypass_csp):
    # The pages carry a strict Content-Security-Policy; most tests bypass it (Playwright's
    # wait_for_function needs eval) so they show that escaping alone keeps token text inert.
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=bypass_csp)
    ctx.add_init_script(HOOK_SCRIPT)
    return ctx


@pytest.fixture
def page(browser):
    ctx = _context(browser, bypass_csp=True)
    pg = ctx.new_page()
    pg.set_default_timeout(10_000)
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("dialog", lambda d: (pg.errors.append("dialog: " + d.message), d.dismiss()))
    yield pg
    ctx.close()


@pytest.fixture(scope="module")
def server(site):
    srv = make_server(ServeConfig(site=str(site[0])), quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}/"
    srv.shutdown()
    srv.server_close()


def _open(page, url):
    page.goto(url)
    page.wait_for_function("window.LLM_SAE_READY === true", timeout=10_000)


def _ids(page):
    return [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.id)")]


def _clean(page):
    assert page.errors == []
    assert page.evaluate("window.__xss") == []
    assert page.evaluate("document.querySelectorAll('img, iframe').length") == 0


def test_index_from_disk_sorts_filters_and_searches(page, site, shots):
    out, idx = site
    _open(page, (out / "index.html").as_uri())
    assert _ids(page) == list(range(N))
    page.select_option("#page-size", "50")
    assert _ids(page) == list(range(50))
    page.click("#next-page")
    assert _ids(page) == list(range(50, N))
    page.select_option("#page-size", "100")

    page.click("th[data-key=density]")  # largest first
    want = sorted(range(N), key=lambda i: (-idx["density"][i], i))
    assert _ids(page) == want
    page.click("th[data-key=density]")
    assert _ids(page)[0] == sorted(range(N), key=lambda i: (idx["density"][i], i))[0]
    page.click("th[data-key=max_act]")
    assert _ids(page) == sorted(range(N), key=lambda i: (-idx["max_act"][i], i))
    page.screenshot(path=str(shots / "index-sorted.png"))

    page.check("#hide-dead")
    live = [i for i in range(N) if not idx["dead"][i]]
    assert sorted(_ids(page)) == live and page.locator("tr.dead").count() == 0
    page.fill("#dmin", "0.01")
    assert sorted(_ids(page)) == [i for i in live if idx["density"][i] >= 0.01]
    page.fill("#dmin", "")
    page.uncheck("#hide-dead")

    page.locator("#density-hist g.bin").last.click()  # the densest bin filters to its range
    lo, hi = float(page.input_value("#dmin")), float(page.input_value("#dmax"))
    shown = _ids(page)
    assert shown and all(lo * 0.999 <= idx["density"][i] <= hi * 1.001 for i in shown)
    assert len(shown) == sum(lo <= idx["density"][i] <= hi for i in range(N))
    page.fill("#dmin", "")
    page.fill("#dmax", "")

    page.fill("#search", "FOX")  # case-insensitive substring of any top token
    page.wait_for_function("document.getElementById('count').textContent.indexOf(' of ') > 0")
    assert sorted(_ids(page)) == [i for i in range(N) if any("fox" in t.lower() for t in idx["top"][i])]
    page.fill("#search", "·quick")  # the visible form of a leading space
    n_quick = sum(any(" quick" in t for t in idx["top"][i]) for i in range(N))
    page.wait_for_function(f"document.querySelectorAll('#rows tr').length === {n_quick}")
    page.fill("#search", "<script>")
    page.wait_for_function(f"document.querySelector('#rows tr[data-id=\"{XSS_ID}\"]') !== null")
    page.screenshot(path=str(shots / "index-search-xss.png"))
    _clean(page)

    page.fill("#jump", "17")
    page.press("#jump", "Enter")
    page.wait_for_function("window.LLM_SAE_READY === true && document.querySelector('h1')?.textContent.startsWith('Feature 17')")
    page.go_back()  # the index comes back as it was left: sorted and searched
    page.wait_for_function("window.LLM_SAE_READY === true")
    assert page.input_value("#search") == "<script>"
    assert page.get_attribute("th[data-key=max_act]", "aria-sort") == "descending"
    assert XSS_ID in _ids(page)
    _clean(page)


def test_feature_page_tooltip_and_navigation(page, site, shots):
    out, idx = site
    _open(page, (out / "feature.html").as_uri() + "#12")
    assert page.text_content("h1").startswith("Feature 12")
    assert page.locator("#top-examples .example").count() == 20
    assert page.locator("#interval-examples .example").count() == 10
    assert page.locator("#histogram svg rect.bar").count() == 32
    assert page.locator("#logits table.logits tr").count() == 20

    peak = page.locator("#top-examples .example").first.locator(".tok.peak")
    peak.hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    text = tip.text_content()
    assert text.startswith("token ") and "activation " in text
    assert text == peak.get_attribute("title")
    value = float(text.rsplit("activation ", 1)[1])
    assert value == pytest.approx(idx["max_act"][12], rel=5e-3)
    page.screenshot(path=str(shots / "feature-tooltip.png"), full_page=True)

    nbr = page.locator("#neighbours a").first
    target = int(nbr.get_attribute("data-id"))
    nbr.click()
    page.wait_for_function(f"document.querySelector('h1')?.textContent.startsWith('Feature {target} ')")
    page.click("#next")
    page.wait_for_function(f"document.querySelector('h1')?.textContent.startsWith('Feature {target + 1} ')")
    page.click("#prev")
    page.click("#prev")
    page.wait_for_function(f"document.querySelector('h1')?.textContent.startsWith('Feature {target - 1} ')")
    page.fill("#jump", "3")  # a dead feature
    page.press("#jump", "Enter")
    page.wait_for_function("document.querySelector('h1')?.textContent.startsWith('Feature 3 ')")
    assert page.locator("h1 .badge.dead").count() == 1
    page.click("h1")  # arrow keys page through features unless an input has focus
    page.keyboard.press("ArrowRight")
    page.wait_for_function("document.querySelector('h1')?.textContent.startsWith('Feature 4 ')")
    page.goto((out / "feature.html").as_uri() + f"#{N + 100}")
    page.wait_for_function("window.LLM_SAE_READY === true")
    assert f"Feature {N + 100} is not in this site" in page.text_content(".error")
    _clean(page)


def _check_payloads(page):
    ex = page.locator("#top-examples .example").first
    toks = ex.locator(".tok")
    shown = [toks.nth(i).text_content() for i in range(toks.count())]
    titles = [toks.nth(i).get_attribute("title") for i in range(toks.count())]
    # Shown literally, with whitespace made visible and invisible characters named.
    assert shown[: len(XSS_TOKENS)] == [t.replace(" ", "·") for t in XSS_TOKENS]
    assert shown[len(XSS_TOKENS):] == ["·", "↵", "→", "⟨U+202E⟩", "é", "\ufffd", "·the"]
    assert titles[0].startswith('token "<script>alert(1)</script>"')
    assert titles[len(XSS_TOKENS) + 1].startswith('token "\\n"')
    assert titles[len(XSS_TOKENS) + 3].startswith('token "\\u202E"')
    toks.nth(1).hover()
    assert page.text_content("#tooltip").startswith('token "\\"><img src=x onerror=alert(1)>"')
    assert page.locator("#logits .chip").first.text_content() == XSS_TOKENS[1].replace(" ", "·")
    # Layout: no token stretches the page sideways.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    _clean(page)


def test_xss_payloads_render_literally_from_disk(page, site, shots):
    out, _ = site
    _open(page, (out / "feature.html").as_uri() + f"#{XSS_ID}")
    _check_payloads(page)
    page.locator("#top-examples").screenshot(path=str(shots / "feature-xss-tokens.png"))


def test_served_site_works_over_http(page, server):
    _open(page, server)
    assert len(_ids(page)) == N
    assert page.locator("#live-link").is_hidden()  # no --sae: no live view
    page.click(f"#rows tr[data-id='{XSS_ID}'] a")
    page.wait_for_function(f"window.LLM_SAE_READY === true && document.querySelector('h1')?.textContent.startsWith('Feature {XSS_ID} ')")
    _check_payloads(page)
    _open(page, server + "live.html")
    assert page.locator("#run").is_disabled()
    assert "started without an SAE" in page.text_content("#live-unavailable")


def test_index_of_100k_features_is_paginated(page, site, tmp_path, shots):
    """The index holds only one page of rows in the DOM; sorting 100,000 is quick."""
    out, _ = site
    big = tmp_path / "big"
    shutil.copytree(out, big, ignore=shutil.ignore_patterns("features"))
    rng = random.Random(0)
    n = 100_000
    words = [" the", " fox", "def", "\n", " a", "(", "é"]
    cols = {"id": list(range(n)), "density": [], "max_act": [], "dead": [], "top": []}
    for i in range(n):
        dead = i % 10 == 0
        cols["density"].append(0 if dead else round(rng.random() * 0.01, 6))
        cols["max_act"].append(0 if dead else round(rng.random() * 10, 3))
        cols["dead"].append(int(dead))
        cols["top"].append([] if dead else rng.sample(words, 3))
    (big / "data" / "index.js").write_text(f"window.LLM_SAE_INDEX={js_literal(cols)};\n")
    t0 = time.perf_counter()
    _open(page, (big / "index.html").as_uri())
    load_s = time.perf_counter() - t0
    assert page.locator("#rows tr").count() == 100
    assert "of 100000" in page.text_content("#page-info")
    t0 = time.perf_counter()
    page.click("th[data-key=max_act]")
    page.wait_for_function("document.querySelector('#rows tr').dataset.id !== '0'")
    sort_s = time.perf_counter() - t0
    best = max(range(n), key=lambda i: (cols["max_act"][i], -i))
    assert _ids(page)[0] == best and page.locator("#rows tr").count() == 100
    page.check("#hide-dead")
    assert "of 100000" in page.text_content("#count") and page.locator("tr.dead").count() == 0
    print(f"\n100k-feature index: load {load_s:.2f}s, sort {sort_s:.2f}s")
    page.screenshot(path=str(shots / "index-100k.png"))
    _clean(page)


def test_pages_run_under_their_own_content_security_policy(browser, site):
    out, _ = site
    ctx = _context(browser, bypass_csp=False)
    pg = ctx.new_page()
    messages = []
    pg.on("console", lambda m: messages.append(m.text))
    pg.on("pageerror", lambda e: messages.append(str(e)))
    try:
        for url in ((out / "index.html").as_uri(), (out / "feature.html").as_uri() + f"#{XSS_ID}"):
            pg.goto(url)
            deadline = time.monotonic() + 10
            while not pg.evaluate("window.LLM_SAE_READY === true"):
                assert time.monotonic() < deadline, f"{url} never finished loading: {messages}"
                time.sleep(0.05)
            assert pg.evaluate("window.__xss") == []
        assert pg.locator("#top-examples .example").count() == 20
        assert not [m for m in messages if "Content Security Policy" in m], messages
    finally:
        ctx.close()


@pytest.mark.slow
def test_live_view_in_the_browser(page, site, tiny_gpt2_dir, tmp_path, shots):
    """Type text (an XSS payload among it), see each token's features, pick one to show."""
    import torch

    from llm_sae.sae.config import SAEConfig
    from llm_sae.sae.registry import REGISTRY
    from llm_sae.serve.live import LiveEncoder

    torch.manual_seed(0)
    REGISTRY["topk"](SAEConfig(d_in=32, n_latents=N, k=4)).save(tmp_path / "sae")
    enc = LiveEncoder(tmp_path / "sae", str(tiny_gpt2_dir), "blocks.0.hook_resid_post")
    srv = make_server(ServeConfig(site=str(site[0])), live=enc, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    try:
        _open(page, f"http://{host}:{port}/live.html")
        assert page.locator("#live-link").is_visible()
        text = 'def add(a, b):\n    return a "><img src=x onerror=alert(1)>'
        page.fill("#text", text)
        page.click("#run")
        page.wait_for_function("window.LLM_SAE_READY === true && document.querySelectorAll('#tokens .tok').length > 3")
        toks = page.locator("#tokens .tok")
        want = enc.encode(text, k=5)
        assert toks.count() == len(want["tokens"])
        toks.nth(2).click()
        rows = page.locator("#token-features tbody tr")
        assert rows.count() == len(want["top"][2]) > 0
        first = int(rows.first.locator("a").text_content().lstrip("#"))
        assert first == want["top"][2][0][0]
        rows.first.locator("button").click()
        page.wait_for_function(f"document.getElementById('tokens-title').textContent.indexOf('feature {first} ') >= 0")
        toks.nth(2).hover()
        assert page.text_content("#tooltip").startswith("token ")
        page.screenshot(path=str(shots / "live-view.png"), full_page=True)
        _clean(page)
    finally:
        srv.shutdown()
        srv.server_close()
