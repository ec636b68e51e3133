"""Serve a dashboard site on localhost, with an optional live view that encodes typed text.

The static site works without this (open ``index.html`` from disk); the server adds the
live page's JSON endpoint, which runs the model to the SAE's hook and encodes. Only files
inside the site are served: ``..``, encoded ``..`` and symlinks that leave it are refused.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from llm_sae.config import add_arguments, from_args
from llm_sae.errors import LlmSaeError


class ServeError(LlmSaeError):
    """A site or live-view setting that cannot be served."""


@dataclass
class ServeConfig:
    site: str
    """The site directory written by `llm-sae dashboard`."""
    sae: str | None = None
    """A saved SAE directory (cfg.json + sae.safetensors): enables the live view."""
    model: str | None = None
    """The model the SAE was trained on (hub name or local directory); default: the one the
    SAE's cfg.json records."""
    hook: str | None = None
    """Hook point the SAE reads (e.g. blocks.1.hook_resid_post); default: from the SAE's cfg.json."""
    host: str = "127.0.0.1"
    """Address to listen on. Anything but localhost exposes the site (and the model) to
    your network."""
    port: int = 0
    """Port to listen on; 0 picks a free one."""
    device: str = "cpu"
    """Device for the live view's model and SAE (cpu, cuda, cuda:1, ...)."""
    max_tokens: int = 1024
    """Longest text (in tokens) the live view encodes; longer input is cut."""


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 256 * 1024

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")


# ------------------------------------------------------------------------ live view
def _sae_meta(sae_dir: Path) -> dict[str, Any]:
    """The hook and model an SAE was trained on, from whichever metadata file records them."""
    meta: dict[str, Any] = {}
    for name in ("cfg.json", "train_cfg.json", "train_config.json", "meta.json", "store.json"):
        p = sae_dir / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                for k, v in data.items():
                    meta.setdefault(k, v)
                # "metadata": SAELens v6 cfg.json keeps model_name and hook_name there.
                for nested in ("store", "manifest", "meta", "metadata"):
                    if isinstance(data.get(nested), dict):
                        for k, v in data[nested].items():
                            meta.setdefault(k, v)
    # `llm-sae train` records the store it read (train_cfg.json); its manifest names both.
    store_path = meta.get("store")
    if isinstance(store_path, str) and Path(store_path).is_dir():
        try:
            from llm_sae.store import open_store

            store = open_store(store_path)
            meta.setdefault("hook_name", store.hook)
            meta.setdefault("model_name", store.model)
        except Exception:  # noqa: BLE001 - a moved or partial store: fall back to flags
            pass
    return meta


def _first(meta: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = meta.get(k)
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if isinstance(v, str) and v:
            return v
    return None


class LiveEncoder:
    """Tokenize text, run the model to the SAE's hook, and encode with the SAE."""

    def __init__(
        self,
        sae_dir: str | Path,
        model: str | None = None,
        hook: str | None = None,
        device: str = "cpu",
        max_tokens: int = 1024,
    ):
        from llm_sae.sae import load_sae

        sae_dir = Path(sae_dir)
        meta = _sae_meta(sae_dir)
        self.model_name = model or _first(meta, "model", "model_name", "model_path")
        self.hook = hook or _first(meta, "hook_name", "hook", "hook_point", "hooks")
        if not self.model_name:
            raise ServeError(
                f"the SAE in {sae_dir} does not record its model; pass --model NAME_OR_DIR"
            )
        if not self.hook:
            raise ServeError(
                f"the SAE in {sae_dir} does not record its hook point; pass --hook "
                "(e.g. blocks.1.hook_resid_post)"
            )
        self.device = device
        self.max_tokens = max_tokens
        self.sae = load_sae(sae_dir, device=device)
        self.bridge = _load_model(self.model_name, device)
        self.tokenizer = self.bridge.tokenizer
        self.lock = threading.Lock()
        self.encode("")  # fail at start-up, not on the first request, if hook or width is wrong

    def info(self) -> dict[str, Any]:
        return {
            "live": True,
            "model": str(self.model_name),
            "hook": self.hook,
            "n_latents": int(self.sae.n_latents),
        }

    def encode(self, text: str, feature: int | None = None, k: int = 5) -> dict[str, Any]:
        import torch

        n = int(self.sae.n_latents)
        if feature is not None and not 0 <= feature < n:
            raise ValueError(f"feature {feature} is out of range: this SAE has {n} features")
        k = max(1, min(int(k), 50, n))
        ids = self._token_ids(text)
        with self.lock, torch.no_grad():
            tokens_1T = torch.tensor([ids], dtype=torch.long, device=self.device)
            x_TD = _run_to_hook(self.bridge, tokens_1T, self.hook)[0].float()
            if x_TD.shape[-1] != self.sae.d_in:
                raise ServeError(
                    f"hook {self.hook!r} of {self.model_name!r} is {x_TD.shape[-1]} wide but the "
                    f"SAE reads d_in={self.sae.d_in}; pass the --model and --hook it was trained on"
                )
            z_TN = self.sae.encode(x_TD.to(next(self.sae.parameters()).dtype)).float()
            vals_TK, idx_TK = z_TN.topk(k, dim=-1)
            acts_T = z_TN[:, feature] if feature is not None else None
        pieces = [self.tokenizer.decode([i]) for i in ids]
        top = [
            [[int(j), round(float(v), 5)] for v, j in zip(vr, ir, strict=True) if v > 0]
            for vr, ir in zip(vals_TK.tolist(), idx_TK.tolist(), strict=True)
        ]
        return {
            "tokens": pieces,
            "top": top,
            "feature": feature,
            "acts": None if acts_T is None else [round(float(a), 5) for a in acts_T.tolist()],
        }

    def _token_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        # Harvest contexts start with BOS, so the SAE saw activations that followed one.
        if bos is not None:
            ids = [bos] + ids
        limit = self.max_tokens
        n_ctx = getattr(getattr(self.bridge, "cfg", None), "n_ctx", None)
        if isinstance(n_ctx, int) and n_ctx > 0:
            limit = min(limit, n_ctx)
        return ids[:limit]


def _load_model(model: str, device: str) -> Any:
    try:
        from llm_sae.models import load_bridge
    except ImportError:  # models.py is optional; harvest loads models the same way
        from llm_sae.harvest import load_model

        return load_model(model, device=device)
    try:
        return load_bridge(model, device=device)
    except LlmSaeError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's model path
        raise ServeError(f"cannot load model {model!r} for the live view: {e}") from e


def _run_to_hook(bridge: Any, tokens_1T: Any, hook: str) -> Any:
    """Activations [1, T, D] at ``hook``, stopping the forward pass after its block."""
    import re

    got: dict[str, Any] = {}

    def grab(act: Any, hook: Any = None) -> Any:
        got["x"] = act.detach()
        return act

    m = re.match(r"blocks\.(\d+)\.", hook)
    n_layers = getattr(getattr(bridge, "cfg", None), "n_layers", None)
    stop = int(m.group(1)) + 1 if m else None
    if stop is not None and isinstance(n_layers, int) and stop >= n_layers:
        stop = None
    try:
        bridge.run_with_hooks(tokens_1T, fwd_hooks=[(hook, grab)], stop_at_layer=stop, return_type=None)
    except (KeyError, ValueError, AttributeError) as e:
        raise ServeError(f"the model has no hook point {hook!r} ({e}); pass --hook with a valid one") from e
    if "x" not in got:
        raise ServeError(f"hook {hook!r} never fired on this model; pass --hook with a valid one")
    return got["x"]


# ------------------------------------------------------------------------ HTTP
class SiteHandler(BaseHTTPRequestHandler):
    """Static files from the site root (never outside it) plus the live view's API."""

    server_version = "llm-sae"
    site_root: Path  # set on the subclass made by make_server
    live: LiveEncoder | None = None
    quiet = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        if not self.quiet:
            super().log_message(format, *args)

    # -- helpers
    def _send(self, status: int, body: bytes, ctype: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
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
        if url.path != "/api/encode":
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
        except ValueError:
            self._json(400, {"error": "body must be a JSON object like {\"text\": \"...\"}"})
            return
        self._encode(req)

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
        except (TypeError, ValueError) as e:
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
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
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
) -> ThreadingHTTPServer:
    """A bound (not yet running) server for ``cfg``; call ``serve_forever`` on it."""
    site = Path(cfg.site)
    if not (site / "index.html").is_file():
        raise ServeError(
            f"{site} is not a dashboard site (no index.html); build one with "
            "`llm-sae dashboard --analysis DIR --out SITE`"
        )
    if live is None and cfg.sae:
        live = LiveEncoder(cfg.sae, cfg.model, cfg.hook, cfg.device, cfg.max_tokens)
    handler = type(
        "BoundSiteHandler",
        (SiteHandler,),
        {"site_root": site.resolve(), "live": live, "quiet": quiet},
    )
    server = ThreadingHTTPServer((cfg.host, int(cfg.port)), handler)
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
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
