"""What a server is asked to serve."""

from __future__ import annotations

from dataclasses import dataclass

from llm_sae.errors import LlmSaeError


class ServeError(LlmSaeError):
    """A site or live-view setting that cannot be served."""


@dataclass
class ServeConfig:
    site: str
    """The site directory written by `llm-sae dashboard`."""
    sae: str | None = None
    """A saved SAE folder, hf://ORG/REPO[/SUBFOLDER] or saelens://RELEASE/SAE_ID: enables the live view."""
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
