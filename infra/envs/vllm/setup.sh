#!/usr/bin/env bash
# Build the vLLM environment used by sampling.engine=vllm, then check it with the worker's --probe.
#
#   infra/envs/vllm/setup.sh            # creates infra/envs/vllm/.venv
#   VLLM_VENV=/opt/vllm-env infra/envs/vllm/setup.sh
#
# Then set, in your config:   sampling: {engine: vllm, vllm_python: infra/envs/vllm/.venv/bin/python}
# The probe exits 11 when the environment is fine but no CUDA device is visible (e.g. on a build node).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="${VLLM_VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "setup.sh: $PYTHON is older than Python 3.10, which vLLM needs; set PYTHON=python3.12 (or similar)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install -r "$HERE/requirements.txt"

echo "probing $VENV/bin/python ..."
set +e
"$VENV/bin/python" "$ROOT/spark_core/engines/vllm_worker.py" --probe
rc=$?
set -e
case "$rc" in
  0)  echo "vLLM environment ready: sampling.vllm_python=$VENV/bin/python" ;;
  11) echo "vLLM is installed, but no CUDA device is visible here; the engine needs one at run time" >&2 ;;
  *)  echo "the probe failed (exit $rc); see the message above" >&2; exit "$rc" ;;
esac
