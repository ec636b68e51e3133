"""Explanations and steering in a real browser (headless Chromium): the index's score and
explanation columns from disk, the feature page's panel, and the live view's steering panel."""

from __future__ import annotations

import json
import threading

import pytest
from browser_util import CHROMIUM_ARGS, HOOK_SCRIPT, chromium_path, write_analysis

from llm_sae.dashboard import DashboardConfig, build_dashboard
from llm_sae.serve import ServeConfig
from llm_sae.serve.server import make_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium, or set $CHROMIUM)")

N = 12
XSS = '"><img src=x onerror=alert(1)> commas'


def _write_explanations(d, scores):
    """`llm-sae explain` output written by hand in its documented format (docs/explain.md)."""
    (d / "features" / "000").mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"settings": {}}))
    for i, s in scores.items():
        text = XSS if i == 4 else f"feature {i} fires on word{i}"
        res = {"id": i, "explanation": text, "model": "m", "scores": {"detection": {"balanced_accuracy": s},
                                                                       "fuzzing": {"balanced_accuracy": s}}}
        (d / "features" / "000" / f"f_{i:06d}.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-browser")
    analysis = write_analysis(root / "analysis", n_features=N, dead_every=0)
    scores = {0: 0.55, 1: 0.91, 2: 0.72, 4: 0.99, 7: 0.6}
    _write_explanations(root / "analysis" / "explanations", scores)
    build_dashboard(DashboardConfig(analysis=str(analysis), out=str(root / "site")))
    return root / "site", scores


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    ctx.add_init_script(HOOK_SCRIPT)
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("dialog", lambda d: (pg.errors.append("dialog: " + d.message), d.dismiss()))
    yield pg
    ctx.close()


def _open(page, url):
    page.goto(url)
    page.wait_for_function("window.LLM_SAE_READY === true")


def _ids(page):
    return [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.id)")]


def _clean(page):
    assert page.errors == [] and page.evaluate("window.__xss") == []
    assert page.evaluate("document.querySelectorAll('img, iframe').length") == 0


def test_index_sorts_by_score_and_searches_explanations_from_disk(page, site):
    out, scores = site
    _open(page, (out / "index.html").as_uri())
    assert page.locator("th[data-key=score]").is_visible()
    page.click("th[data-key=score]")  # best first, unexplained features last
    assert _ids(page)[:5] == sorted(scores, key=lambda i: -scores[i])
    page.fill("#search", "word1")
    page.wait_for_function("document.querySelectorAll('#rows tr').length === 1")
    assert _ids(page) == [1]
    page.fill("#search", "onerror")
    page.wait_for_function("document.querySelectorAll('#rows tr').length === 1 && document.querySelector('#rows tr').dataset.id === '4'")
    assert page.text_content("#rows td.expl") == XSS
    _clean(page)


def test_feature_page_shows_the_explanation_as_text(page, site):
    out, _ = site
    _open(page, (out / "feature.html").as_uri() + "#4")
    assert page.text_content("#explanation .expl-text") == XSS
    assert "detection 0.99" in page.text_content("#explanation")
    assert page.locator("#steer-link").is_hidden()  # from disk: no live view
    _clean(page)


@pytest.mark.slow
def test_steering_panel_through_the_server(page, site, tmp_path):
    import torch

    from llm_sae.sae import REGISTRY, SAEConfig
    from llm_sae.serve.live import LiveEncoder

    out, _ = site
    torch.manual_seed(0)
    REGISTRY["topk"](SAEConfig(d_in=128, n_latents=N, k=4)).save(tmp_path / "sae")
    enc = LiveEncoder(tmp_path / "sae", "tiny-stdlib", "blocks.1.hook_resid_post")
    srv = make_server(ServeConfig(site=str(out)), live=enc, quiet=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = srv.server_address[:2]
    url = f"http://{host}:{port}/"
    try:
        _open(page, url + "feature.html#4")
        page.wait_for_selector("#steer-link", state="visible")
        page.click("#steer-link")
        page.wait_for_function("document.querySelectorAll('#steer-features tbody tr').length === 1")
        page.fill("#steer-search", "word7")
        page.click("#steer-suggest a[data-id='7']")
        assert page.locator("#steer-features tbody tr").count() == 2
        page.fill("#steer-prompt", "def add(a, b):\n    return")
        page.fill("#steer-n", "4")
        page.evaluate("window.LLM_SAE_READY = false")
        page.click("#steer-run")
        page.wait_for_function("window.LLM_SAE_READY === true && document.querySelectorAll('#steered .tok').length > 4")
        assert page.locator("#unsteered .tok.generated").count() == 4
        assert "#4" in page.text_content("#steer-status")
        page.fill("#steer-n", "999")
        page.evaluate("window.LLM_SAE_READY = false")
        page.click("#steer-run")
        page.wait_for_function("window.LLM_SAE_READY === true")
        assert "max_new_tokens" in page.text_content("#steer-status")
        _clean(page)
    finally:
        srv.shutdown()
        srv.server_close()
