"""scripts/bench_gpu.py runs end to end in its CPU smoke-test mode and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"


def test_bench_gpu_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--small",
            "--impls",
            "llm_sae,sparsify",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"] == {"d_in": 64, "n_latents": [256, 1024], "k": 8, "batch": 256}
    ours = report["results"]["llm_sae"]["by_n"]
    for n in ("256", "1024"):
        assert ours[n]["tokens_per_s"] > 0 and ours[n]["encoder_flops_per_s"] > 0
        assert 0 < ours[n]["frac_of_encoder_matmul"] < 10
    peer = report["results"]["sparsify"]
    assert "by_n" in peer or peer.get("skipped") == "not installed", peer
    assert "TopK SAE training step" in proc.stdout and "llm_sae" in proc.stdout
