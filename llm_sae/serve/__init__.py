"""Serve: a dashboard site on loopback, with a live view that encodes typed text."""

from llm_sae.serve.config import ServeConfig, ServeError
from llm_sae.serve.server import serve

__all__ = ["ServeConfig", "ServeError", "serve"]
