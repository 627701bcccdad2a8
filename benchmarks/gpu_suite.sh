#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py): on a machine with one CUDA GPU it measures every
# method and writes docs/performance.md's GPU section; --dry-run runs every step at tiny size
# on the CPU. Needs only this repository and its virtual environment (make install-test).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [[ " $* " == *" --dry-run "* ]]; then
  exec "$PY" benchmarks/gpu_suite.py "$@" --csv "${TMPDIR:-/tmp}/gpu_suite_dry_run.csv"
fi
exec "$PY" benchmarks/gpu_suite.py --write-docs "$@"
