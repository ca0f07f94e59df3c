#!/usr/bin/env bash
# The one command to run when a GPU is present (see profiling/gpu_check.py and profiling/README.md):
#   profiling/gpu_check.sh [--out DIR] [--export DIR] [--budget SECONDS]     # the real run
#   profiling/gpu_check.sh --dry-run                                          # any machine
# Nothing needs installing: the repository goes on PYTHONPATH. PYTHON picks the interpreter.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_ENTRY="profiling/gpu_check.sh"
exec "${PYTHON:-python3}" "$ROOT/profiling/gpu_check.py" "$@"
