"""``llm-sae serve``: a loopback HTTP server for a dashboard site, bounded in every request."""

from __future__ import annotations

import argparse
import errno
import json
import mimetypes
import os
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from llm_sae.config import add_arguments, from_args
from llm_sae.errors import LlmSaeError
from llm_sae.serve.config import ServeConfig, ServeError
from llm_sae.serve.live import LiveEncoder
from llm_sae.serve.pool import BoundedHTTPServer

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


MAX_BODY = 256 * 1024

# The policy the pages also carry as <meta>; sent as a header on every response.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'")


# Set here, not in the process-wide mimetypes table: some systems map .js to text/plain.
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".json": "application/json"}


class SiteHandler(BaseHTTPRequestHandler):
    """Static files from the site root (never outside it) plus the live view's API."""

    server_version = "llm-sae"
    site_root: Path  # set on the subclass made by make_server
    live: LiveEncoder | None = None
    quiet = False
    timeout = 10  # seconds a connection may take to send its request (socket timeout)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        if not self.quiet:
            super().log_message(format, *args)

    # -- helpers
    def _send(self, status: int, body: bytes, ctype: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        # As headers too, not only the pages' <meta> tags: they then cover every response
        # (JSON, data files), and framing can only be refused by a header.
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: HTTPStatus, head_only: bool = False) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self._send(status.value, body, "text/plain; charset=utf-8", head_only)

    def resolve(self, url_path: str) -> Path | None:
        """The file ``url_path`` names inside the site, or None when it would leave it."""
        path = unquote(url_path)
        if "\x00" in path or "\\" in path:
            return None
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            return None
        root = os.path.realpath(self.site_root)
        full = os.path.realpath(os.path.join(root, *parts))
        if full != root and not full.startswith(root + os.sep):
            return None  # a symlink out of the site
        return Path(full)

    def _host_ok(self) -> bool:
        """On a localhost server, refuse requests for other host names: a web page cannot
        then reach the site or the model through DNS rebinding."""
        if str(self.server.server_address[0]) not in ("127.0.0.1", "::1"):
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return name in ("127.0.0.1", "localhost", "[::1]", "")

    # -- verbs
    def do_HEAD(self) -> None:
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, head_only=True)
            return
        self._static(head_only=True)

    def do_GET(self) -> None:
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN)
            return
        url = urlsplit(self.path)
        if url.path == "/api/info":
            self._json(200, self.live.info() if self.live else {"live": False})
        elif url.path == "/api/encode":
            q = parse_qs(url.query)
            self._encode({k: v[0] for k, v in q.items()})
        else:
            self._static()

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN)
            return
        if url.path not in ("/api/encode", "/api/steer"):
            self._error(HTTPStatus.NOT_FOUND)
            return
        # JSON only: a cross-site form cannot send it without a CORS preflight we never allow.
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self._json(415, {"error": "send the request as Content-Type: application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._json(413, {"error": f"request body must be at most {MAX_BODY} bytes"})
            return
        try:
            req = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(req, dict):
                raise ValueError
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            self._json(400, {"error": "body must be a JSON object like {\"text\": \"...\"}"})
            return
        if url.path == "/api/steer":
            self._steer(req)
            return
        self._encode(req)

    def _steer(self, req: dict[str, Any]) -> None:
        if self.live is None:
            self._json(404, {"error": "no live view: start `llm-sae serve SITE --sae DIR --model MODEL`"})
            return
        from llm_sae.serve.steer_api import steer_request

        try:
            self._json(200, steer_request(self.live, req))
        except (TypeError, ValueError, OverflowError, LlmSaeError) as e:  # out of bounds, or 1e999
            self._json(400, {"error": str(e)})

    def _encode(self, req: dict[str, Any]) -> None:
        if self.live is None:
            self._json(
                404,
                {"error": "no live view: start `llm-sae serve SITE --sae DIR --model MODEL`"},
            )
            return
        text = req.get("text", "")
        if not isinstance(text, str):
            self._json(400, {"error": "text must be a string"})
            return
        try:
            feature = req.get("feature")
            feature = None if feature in (None, "") else int(feature)
            k = int(req.get("k", 5))
            out = self.live.encode(text, feature=feature, k=k)
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: {"k": 1e999}
            self._json(400, {"error": str(e)})
            return
        except LlmSaeError as e:
            self._json(500, {"error": str(e)})
            return
        self._json(200, out)

    def _static(self, head_only: bool = False) -> None:
        url = urlsplit(self.path)
        target = self.resolve(url.path)
        if target is None:
            self._error(HTTPStatus.FORBIDDEN, head_only)
            return
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            self._error(HTTPStatus.NOT_FOUND, head_only)
            return
        ctype = CONTENT_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/json", "text/javascript"):
            ctype += "; charset=utf-8"
        try:
            body = target.read_bytes()
        except OSError:
            self._error(HTTPStatus.NOT_FOUND, head_only)
            return
        self._send(200, body, ctype, head_only)


def make_server(
    cfg: ServeConfig, live: LiveEncoder | None = None, quiet: bool = False
) -> BoundedHTTPServer:
    """A bound (not yet running) server for ``cfg``; call ``serve_forever`` on it.

    The port is bound before the live view loads its model, so a port in use is an error
    in a second, not after the model load.
    """
    site = Path(cfg.site)
    if not (site / "index.html").is_file():
        raise ServeError(
            f"{site} is not a dashboard site (no index.html); build one with "
            "`llm-sae dashboard --analysis DIR --out SITE`"
        )
    if not 0 <= int(cfg.port) <= 65535:
        raise ServeError(f"--port {cfg.port} is out of range; use 1-65535, or 0 for a free one")
    if cfg.sae and not Path(cfg.sae).is_dir():
        raise ServeError(f"--sae {cfg.sae} is not a folder; give a saved SAE (cfg.json + sae.safetensors)")
    handler = type(
        "BoundSiteHandler",
        (SiteHandler,),
        {"site_root": site.resolve(), "live": live, "quiet": quiet},
    )
    try:
        server = BoundedHTTPServer((cfg.host, int(cfg.port)), handler)
    except OSError as e:
        what = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror or e})"
        raise ServeError(f"{cfg.host} port {cfg.port} {what}; pick another --port, or 0 for a free one") from None
    if live is None and cfg.sae:
        try:
            handler.live = LiveEncoder(cfg.sae, cfg.model, cfg.hook, cfg.device, cfg.max_tokens)
        except BaseException:
            server.server_close()
            raise
    return server


def url_of(server: HTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in str(host):
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def host_warning(cfg: ServeConfig) -> str | None:
    """What to tell the user when the server is reachable from beyond this machine."""
    if cfg.host in LOCAL_HOSTS:
        return None
    return (
        f"warning: serving on {cfg.host}: anyone who can reach this address can read the site"
        + (" and run the model through the live view" if cfg.sae else "")
        + "; use the default --host 127.0.0.1 to keep it on this machine"
    )


def serve(cfg: ServeConfig) -> None:
    """Serve the site until interrupted."""
    warning = host_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)
    if cfg.model and not cfg.sae:
        print("warning: --model without --sae does nothing; the live view needs both", file=sys.stderr)
    server = make_server(cfg)
    print(f"serving {cfg.site} at {url_of(server)}" + (" (live view: live.html)" if cfg.sae else ""), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ServeConfig, positional=("site",))


def run_cli(args: argparse.Namespace) -> int:
    serve(from_args(ServeConfig, args))
    return 0
