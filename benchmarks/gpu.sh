#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py): every FAN variant and timm peers, bf16, eager and torch.compile,
# inference batch 256 and training batch 128; writes benchmarks/results/gpu/ (gpu.csv, gpu.md, one folder per stage).
#   benchmarks/gpu.sh [--budget SECONDS] [--out DIR] [--resume]
#   benchmarks/gpu.sh --device cpu --quick --out /tmp/gpu-smoke     # smoke test without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python || PYTHON=python3; fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu.py "$@"
