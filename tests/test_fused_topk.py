"""The fused encoder + top-k Triton kernel (``llm_sae/kernels/fused_topk.py``) against
torch.topk: ``tests/fused_topk_cases.py`` run under ``TRITON_INTERPRET=1`` in a fresh
interpreter, so the mode is set before triton is first imported."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_topk_matches_torch_topk_under_the_interpreter():
    cases = Path(__file__).with_name("fused_topk_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        env=env, capture_output=True, text=True, timeout=900, cwd=cases.parent.parent,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 6 and "skipped" not in out, out[-3000:]
