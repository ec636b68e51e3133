#!/usr/bin/env bash
# Create .peers/, a virtualenv holding the peer SAE libraries that scripts/bench_train.py
# times against: EleutherAI's sparsify (`eai-sparsify`) and SAELens (`sae-lens`).
#   bash scripts/setup_peers.sh
#
# A separate environment, without llm_sae: the benchmarks time each peer in its own
# install, and sparsify lives nowhere else (SAELens beside llm_sae, on transformer-lens 3.9,
# is scripts/test_coinstall.sh). torch is installed first and then repeated as a
# constraint in the same command as the peers, so neither can swap in another torch build
# (a plain `torch` from PyPI is the multi-GB CUDA build). Override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .peers/bin/python ] || "$PY" -m venv .peers
# shellcheck disable=SC2086
.peers/bin/pip install -q $TORCH_SPEC
# shellcheck disable=SC2086
.peers/bin/pip install -q eai-sparsify sae-lens $TORCH_SPEC
.peers/bin/python - <<'PY'
import importlib.metadata as md
for name in ("torch", "eai-sparsify", "sae-lens", "transformer-lens"):
    try:
        print(f"{name:18s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18s} MISSING")
PY
