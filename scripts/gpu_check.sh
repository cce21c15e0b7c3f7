#!/usr/bin/env bash
# The GPU check: every speed figure in one time-boxed command (fastmveb/bench/gpu_check.py).
#
#   bash scripts/gpu_check.sh --out DIR [--wheelhouse WH] [--python PY] [--device cpu|cuda] [--short]
#                             [--budget-s S] [--only stage,stage] [--work SCRATCH] [--force]
#
# Interpreter: --python, else $PYTHON, else .venv/bin/python (make setup), else python3 (a host's own torch env).
# When ffcv or kornia is missing there and --wheelhouse names an offline install folder built for that Python
# (make wheelhouse; docs/offline_install.md), it is installed first with the folder's install.sh (--no-deps: the
# host's torch stays). The install runs before the check's budget starts; the default budget (480 s, less when the
# install took over 60 s) keeps the whole command within 540 s. DIR must be empty unless --force.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=""; WH=""; PY="${PYTHON:-}"; PASS=()
need() { [ $# -ge 2 ] || { echo "error: $1 needs a value (see bash scripts/gpu_check.sh --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) need "$@"; OUT=$2; shift 2 ;;
    --wheelhouse) need "$@"; WH=$2; shift 2 ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --device|--only|--work|--budget-s) need "$@"; PASS+=("$1" "$2"); shift 2 ;;
    --short|--force) PASS+=("$1"); shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see bash scripts/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "error: --out DIR is required (where the results go: make gpu-check OUT=DIR)" >&2; exit 2; }
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python || true); fi
fi
[ -n "$PY" ] && "$PY" -c pass 2>/dev/null || { echo "error: no usable python (pass --python PY)" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The arguments and OUT are checked (one line, exit 2) before anything is installed. install_s: from here to the
# check's start (the import checks, and the wheelhouse install when one runs): not part of the check's budget.
"$PY" -m fastmveb.bench.gpu_check --out "$OUT" "${PASS[@]}" --preflight

t0=$(date +%s.%N)
if ! "$PY" -c "import ffcv, kornia" 2>/dev/null; then
  if [ -n "$WH" ]; then
    bash "$WH/install.sh" --python "$PY" || { echo "error: the wheelhouse install into $PY failed (see above)" >&2; exit 2; }
  else
    echo "error: ffcv or kornia is not importable by $PY; run 'make setup' (connected machine) or pass" \
         "--wheelhouse DIR (WHEELHOUSE=DIR for make; built by 'make wheelhouse', docs/offline_install.md)" >&2
    exit 2
  fi
fi
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'torchvision', 'accelerate', 'yaml', 'tqdm', 'safetensors', 'tensorboard', 'cv2', 'pytest') if u.find_spec(m) is None))")
[ -z "$missing" ] || { echo "error: $PY lacks: $missing (install them into that environment)" >&2; exit 2; }
install_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

exec "$PY" -m fastmveb.bench.gpu_check --out "$OUT" --install-s "$install_s" "${PASS[@]}"
