"""The local server: serves the site, refuses every way out of it, and runs the live view."""

from __future__ import annotations

import http.client
import json
import os
import threading

import pytest
from browser_util import write_analysis

from llm_sae.dashboard.build import build_dashboard
from llm_sae.dashboard.config import DashboardConfig
from llm_sae.serve.config import ServeConfig, ServeError
from llm_sae.serve.live import LiveEncoder
from llm_sae.serve.server import host_warning, make_server


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    analysis = write_analysis(root / "analysis", n_features=5)
    out = root / "site"
    build_dashboard(DashboardConfig(analysis=str(analysis), out=str(out)))
    (root / "secret.txt").write_text("TOP SECRET")
    (root / "outside").mkdir()
    (root / "outside" / "key.txt").write_text("TOP SECRET")
    os.symlink(root / "secret.txt", out / "leak.txt")
    os.symlink(root / "outside", out / "leakdir")
    os.symlink(out / "data" / "meta.js", out / "inside.js")  # a link within the site is fine
    return out


def _start(cfg, live=None):
    server = make_server(cfg, live=live, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def server(site):
    server = _start(ServeConfig(site=str(site)))
    yield server
    server.shutdown()
    server.server_close()


def _get(server, path, method="GET", body=None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.getheader("Content-Type"), data


def test_binds_localhost_on_a_free_port(server):
    host, port = server.server_address[:2]
    assert host == "127.0.0.1" and port > 0


def test_serves_the_site(server, site):
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html")
    assert body == (site / "index.html").read_bytes()
    status, ctype, body = _get(server, "/data/meta.js")
    assert status == 200 and ctype.startswith("text/javascript")
    assert _get(server, "/feature.html?x=1#5")[0] == 200
    assert _get(server, "/inside.js")[0] == 200
    assert _get(server, "/nope.html")[0] == 404
    assert _get(server, "/data/")[0] == 404  # no directory listings
    assert _get(server, "/", method="HEAD")[2] == b""


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/data/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/data/%2e%2e/%2e%2e/secret.txt",
        "/..%5csecret.txt",
        "//../secret.txt",
        "/leak.txt",
        "/leakdir/key.txt",
        "/%00/../secret.txt",
        "http://127.0.0.1/../secret.txt",
    ],
)
def test_refuses_paths_outside_the_site(server, path):
    status, _, body = _get(server, path)
    assert status in (400, 403, 404)
    assert b"TOP SECRET" not in body


def test_absolute_paths_stay_inside_the_site(server, site):
    secret = site.parent / "secret.txt"
    for path in (str(secret), "/" + str(secret), "/etc/passwd"):
        status, _, body = _get(server, path)
        assert status == 404 and b"SECRET" not in body and b"root:" not in body


def test_api_without_live_view(server):
    status, _, body = _get(server, "/api/info")
    assert status == 200 and json.loads(body) == {"live": False}
    status, _, body = _get(server, "/api/encode", method="POST", body=b'{"text": "hi"}',
                           headers={"Content-Type": "application/json"})
    assert status == 404 and "--sae" in json.loads(body)["error"]


def test_refuses_foreign_host_names_and_form_posts(server):
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host.
    assert _get(server, "/", headers={"Host": "evil.example:8000"})[0] == 403
    assert _get(server, "/", headers={"Host": "localhost:1234"})[0] == 200
    status, _, body = _get(server, "/api/encode", "POST", b'{"text": "x"}', {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(body)["error"]


def test_site_must_exist(tmp_path):
    with pytest.raises(ServeError, match="not a dashboard site"):
        make_server(ServeConfig(site=str(tmp_path)))


def test_warns_only_off_localhost(tmp_path):
    assert host_warning(ServeConfig(site="s")) is None
    assert host_warning(ServeConfig(site="s", host="localhost")) is None
    assert "0.0.0.0" in host_warning(ServeConfig(site="s", host="0.0.0.0"))


# ------------------------------------------------------------------------ live view
@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_gpt2_dir):
    torch = pytest.importorskip("torch")
    from llm_sae.sae.config import SAEConfig
    from llm_sae.sae.registry import REGISTRY

    root = tmp_path_factory.mktemp("live")
    torch.manual_seed(0)
    REGISTRY["topk"](SAEConfig(d_in=32, n_latents=64, k=4)).save(root / "sae")
    return root, tiny_gpt2_dir


@pytest.mark.slow
def test_live_view_encodes_text(live, site):
    root, model_dir = live
    enc = LiveEncoder(root / "sae", str(model_dir), "blocks.0.hook_resid_post")
    out = enc.encode("def add(a, b):\n    return a", feature=7, k=3)
    n = len(out["tokens"])
    assert n > 3 and out["tokens"][0] == "<|endoftext|>"
    assert "".join(out["tokens"][1:]) == "def add(a, b):\n    return a"
    assert len(out["top"]) == n and all(len(t) <= 3 for t in out["top"])
    assert all(a >= b for t in out["top"] for (_, a), (_, b) in zip(t, t[1:], strict=False))
    assert len(out["acts"]) == n and out["feature"] == 7
    # The SAE's own encoding of the same activations gives the same top features.
    import torch

    from llm_sae.serve.live import run_to_hook

    ids = enc._token_ids("def add(a, b):\n    return a")
    x = run_to_hook(enc.bridge, torch.tensor([ids]), "blocks.0.hook_resid_post")[0]
    z = enc.sae.encode(x)
    assert out["acts"] == pytest.approx(z[:, 7].tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        enc.encode("x", feature=64)

    server = _start(ServeConfig(site=str(site)), live=enc)
    try:
        status, _, body = _get(server, "/api/info")
        assert json.loads(body)["live"] is True
        req = json.dumps({"text": "<script>alert(1)</script>", "feature": 3}).encode()
        status, _, body = _get(server, "/api/encode", "POST", req, {"Content-Type": "application/json"})
        got = json.loads(body)
        assert status == 200 and "".join(got["tokens"][1:]) == "<script>alert(1)</script>"
        status, _, body = _get(server, "/api/encode?text=hello&feature=99")
        assert status == 400 and "out of range" in json.loads(body)["error"]
        status, _, body = _get(server, "/api/encode", "POST", b"[1, 2]", {"Content-Type": "application/json"})
        assert status == 400
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_live_view_rejects_a_wrong_hook(live):
    root, model_dir = live
    with pytest.raises(ServeError, match="hook"):
        LiveEncoder(root / "sae", str(model_dir), "blocks.0.hook_nonexistent")
    with pytest.raises(ServeError, match="--model"):
        LiveEncoder(root / "sae", None, "blocks.0.hook_resid_post")


@pytest.mark.slow
def test_live_view_finds_hook_and_model_through_the_training_store(live, tiny_store):
    """`llm-sae train` writes train_cfg.json naming its store, whose manifest names both."""
    root, model_dir = live
    sae_dir = root / "trained"
    sae_dir.mkdir()
    for name in ("cfg.json", "sae.safetensors"):
        (sae_dir / name).write_bytes((root / "sae" / name).read_bytes())
    (sae_dir / "train_cfg.json").write_text(json.dumps({"store": str(tiny_store), "k": 4}))
    enc = LiveEncoder(sae_dir)
    assert enc.hook == "blocks.0.hook_resid_post"
    assert os.path.samefile(enc.model_name, model_dir)
    assert len(enc.encode("hello world")["tokens"]) >= 2


def test_reads_model_and_hook_from_a_saelens_folder():
    """SAELens v6 keeps model_name and hook_name under cfg.json's "metadata"."""
    from pathlib import Path

    from llm_sae.sae.formats.meta import sae_meta

    meta = sae_meta(Path(__file__).parent / "data" / "peers" / "saelens" / "topk")
    assert meta["model_name"] == "tiny-peer-model"
    assert meta["hook_name"] == "blocks.0.hook_resid_post"


class _StubLive:
    """A live view without a model: the request checks run before it is reached."""

    def info(self):
        return {"live": True}

    def encode(self, text, feature=None, k=5):
        return {"tokens": [text], "k": k}


def _post(server, body: bytes):
    return _get(server, "/api/encode", "POST", body, {"Content-Type": "application/json"})


def test_hostile_json_is_a_400_not_a_traceback(site):
    server = _start(ServeConfig(site=str(site)), live=_StubLive())
    try:
        status, _, body = _post(server, b'{"text": "a", "k": 1e999}')
        assert status == 400 and "error" in json.loads(body)
        status, _, body = _post(server, b'{"text": "a", "k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert status == 400
        status, _, body = _post(server, b'{"text": "a", "k": 3}')  # and it still answers
        assert status == 200 and json.loads(body)["k"] == 3
    finally:
        server.shutdown()
        server.server_close()


def test_security_headers_on_every_response(server):
    host, port = server.server_address[:2]
    for path in ("/", "/api/info", "/nope"):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        conn.close()
        assert "default-src 'self'" in r.getheader("Content-Security-Policy")
        assert "frame-ancestors 'none'" in r.getheader("Content-Security-Policy")
        assert r.getheader("X-Frame-Options") == "DENY"
        assert r.getheader("X-Content-Type-Options") == "nosniff"


def test_many_idle_connections_do_not_starve_a_real_request(site):
    """400 loopback connections that never send a byte (ThreadingHTTPServer gave each a
    thread and answered the next real request only after they timed out), then one
    normal request: answered within a second. Bounded: 400 sockets, a 10 s cap."""
    import socket
    import time

    from llm_sae.serve.pool import BoundedHTTPServer

    server = _start(ServeConfig(site=str(site)))
    host, port = server.server_address[:2]
    idle = []
    try:
        for _ in range(400):
            idle.append(socket.create_connection((host, port), timeout=5))
        idle[0].sendall(b"GET / HTTP/1.1\r\n")  # a slow client that stalls mid-request too
        t0 = time.perf_counter()
        status, _, body = _get(server, "/")
        elapsed = time.perf_counter() - t0
        assert status == 200 and b"<html" in body.lower()
        assert elapsed < 1.0, f"a request behind 400 idle connections took {elapsed:.2f}s"
        assert threading.active_count() < 100  # workers are bounded, not one per connection
        assert BoundedHTTPServer.workers <= 32
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_port_out_of_range_or_in_use_is_an_error_before_any_model_loads(site):
    import socket

    with pytest.raises(ServeError, match="out of range"):
        make_server(ServeConfig(site=str(site), port=70000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        # --sae names a folder that is no SAE: the port is refused first, without loading.
        with pytest.raises(ServeError, match="in use"):
            make_server(ServeConfig(site=str(site), port=s.getsockname()[1], sae=str(site)))
