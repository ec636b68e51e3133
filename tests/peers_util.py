"""Shared by the live interop tests: which interpreter runs SAELens (and sparsify, where it
is there) for them.

SAELens installed beside llm_sae, in this interpreter (`pip install llm_sae sae-lens`, CI's
co-install stage, scripts/test_coinstall.sh), is preferred: that is the environment users
get. Otherwise the peers' own venv, `.peers/` (scripts/setup_peers.sh). With neither, the
live tests skip. The peers run in a subprocess either way: importing SAELens is slow, and
one run of it serves a whole module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV_PY = ROOT / ".peers" / "bin" / "python"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def peer_python() -> Path | None:
    """This interpreter where SAELens is importable in it, else .peers/'s, else None."""
    if _importable("sae_lens"):
        return Path(sys.executable)
    return PEERS_VENV_PY if PEERS_VENV_PY.exists() else None


PEERS_PY = peer_python()
needs_peers = pytest.mark.skipif(
    PEERS_PY is None,
    reason="SAELens is not installed here and there is no peer environment at "
    f"{PEERS_VENV_PY}; `pip install sae-lens` or `bash scripts/setup_peers.sh`",
)


def skip_unless_written(path: Path) -> None:
    """Skip a regenerated-fixture check whose peer was not installed beside SAELens (sparsify
    is optional in the co-install venv; the fixture scripts leave its folders out)."""
    if not path.exists():
        pytest.skip(f"{path.parent.name}/{path.name}: its peer library is not installed beside SAELens in {PEERS_PY}")
