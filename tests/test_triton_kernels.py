"""The Triton kernels agree with the torch reference: ``tests/triton_cases.py`` run under
``TRITON_INTERPRET=1`` in a fresh interpreter, so the mode is set before triton is first
imported and nothing leaks into the other tests of this session."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_the_torch_reference_under_the_interpreter():
    cases = Path(__file__).with_name("triton_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLM_SAE_TRITON": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cases.parent.parent,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 15 and "skipped" not in out, out[-3000:]
