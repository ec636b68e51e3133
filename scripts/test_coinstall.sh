#!/usr/bin/env bash
# llm_sae and SAELens in one environment, as `pip install llm_sae sae-lens` gives it: a fresh
# venv where pip's resolver installs both together (SAELens 6 pins transformer-lens<4, so
# this is where transformer-lens 3.9 gets tested; the main suite runs on 4.x), then the tests
# that depend on it: the live SAELens round-trips (SAELens in this venv, no .peers/), the
# saelens:// registry, and what boots transformer-lens's bridge or hooks into it (models,
# harvest, on-the-fly training, eval's spliced loss, steering, transcoders' replacement
# model, `llm-sae demo --small`). sparsify is not installed here.
#   bash scripts/test_coinstall.sh          the venv in .venv-coinstall/ (git ignores it)
#   bash scripts/test_coinstall.sh DIR      the venv in DIR
# A venv that exists is reused, with SAELens upgraded to the newest 6.x as a fresh one would
# get. It is kept, not deleted: removing ~1 GB of small files took 4 minutes on a busy CI
# disk, and a fresh clone starts without it.
# CI runs it after the main suite (.ci/run). torch goes in first and is repeated as a
# constraint beside sae-lens, as in scripts/setup_peers.sh, so pip keeps the CPU wheel.
# Override with TORCH_SPEC and SAELENS_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SAELENS_SPEC=${SAELENS_SPEC:-sae-lens>=6,<7}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv=${1:-.venv-coinstall}
log=$tmp/pip.log

# Without the package index there is nothing to install: say so and stop, as .ci/run does
# for chromium, rather than fail CI on the network. Past this check every failure is red.
if ! "$PY" -m pip download -q --no-deps --retries 1 --timeout 30 -d "$tmp/probe" "$SAELENS_SPEC" >"$log" 2>&1; then
  tail -n 5 "$log"
  echo "co-install: SKIPPED, the package index cannot be reached to fetch $SAELENS_SPEC"
  exit 0
fi

pip_install() {  # quiet unless it fails; one retry (the second pass finds its wheels cached)
  "$venv/bin/pip" install -q "$@" >"$log" 2>&1 || "$venv/bin/pip" install -q "$@" >"$log" 2>&1 || {
    grep -v "^WARNING: Location" "$log" | tail -n 40
    echo "co-install: pip install $* failed"
    return 1
  }
}

[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
# shellcheck disable=SC2086
pip_install $TORCH_SPEC
# shellcheck disable=SC2086
pip_install -U -e . "$SAELENS_SPEC" "pytest>=8" "pytest-timeout>=2.3" $TORCH_SPEC

# The resolved versions, and a failure here if either library does not import: the live
# tests skip where SAELens is missing, so a broken install must not pass as a skip.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md

for name in ("llm_sae", "sae-lens", "transformer-lens", "torch", "transformers", "numpy"):
    print(f"co-install: {name:17s} {md.version(name)}")
import sae_lens.loading.pretrained_saes_directory  # noqa: E402,F401  (saelens://)
import transformer_lens.model_bridge  # noqa: E402,F401  (our one model loader)
PY

# The two slow process-level harvest tests (SIGKILL and resume, torchrun) are left out:
# they add a minute and test our processes, not the transformer-lens version.
PATH="$venv/bin:$PATH" bash scripts/test.sh -q \
  tests/test_interop.py tests/test_interop_transcoders.py tests/test_hub.py \
  tests/test_models.py tests/test_harvest.py tests/test_chat_harvest.py \
  tests/test_model_source.py tests/test_evaluate.py tests/test_steer.py \
  tests/test_transcoder.py tests/test_demo.py \
  --deselect tests/test_harvest.py::test_sigkilled_harvest_resumes_byte_identical \
  --deselect tests/test_harvest.py::test_torchrun_two_ranks_equals_one_process_up_to_row_order
