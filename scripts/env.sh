#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv/ at the repo root.
# torch comes first, pinned to the local CPU wheel (2.13.0): a looser request would pull a
# multi-GB CUDA build. The rest is installed from pyproject.toml; a stamp file records the
# pyproject hash so a changed dependency list reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.sst-lab-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
# SmolLM2-135M-Instruct (the real model): fetched once as its GGUF, sha256-checked, converted into
# .cache/models/smollm2-135m-instruct-q4 (a no-op when already there).
fetch_model() {
  [ -f .cache/models/smollm2-135m-instruct-q4/provenance.json ] && return 0
  .venv/bin/python -m sst_lab.smollm2 >/dev/null
}
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  fetch_model
  exit 0
fi
echo "[env] creating .venv (torch==2.13.0 CPU first, then sst-lab and its dependencies)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, peft, trl, mlflow, sst_lab" \
  || { echo "[env] the environment is incomplete (see pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
fetch_model
