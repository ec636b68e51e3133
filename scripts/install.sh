#!/usr/bin/env bash
# Install llm_sae into the current Python environment.
#   bash scripts/install.sh          the package and its CLI, `llm-sae`
#   bash scripts/install.sh --dev    also the test tools (pytest, ruff, playwright)
#
# torch goes in first and only when it is missing: a torch that is already there
# (a CUDA build, a nightly) is kept, and nothing below can pull a second copy with
# several GB of CUDA packages. On PyPI `torch==2.13.0` for Linux is the CUDA build, so
# a GPU user gets GPU torch; on a machine whose pip finds a local CPU wheel first,
# that one is taken. Override with TORCH_SPEC="torch==X --index-url URL".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$PY" -m pip install ${TORCH_SPEC:-torch==2.13.0}
fi

extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
"$PY" -m pip install -e ".${extra}"
