#!/usr/bin/env bash
# GPU smoke check: hf-engine sampling and training MFU of a random ~0.5B Qwen2 (no downloads).
# Usage: infra/gpu-check.sh [--peak-tflops X] [--json] ...   (see python -m spark_core.gpu_check --help)
# Exit code 3 means no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu-check: $PY not found; run 'make install' (or set PYTHON to the project's interpreter)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m spark_core.gpu_check "$@"
