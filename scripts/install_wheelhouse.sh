#!/usr/bin/env bash
# Install the offline wheelhouse into an EXISTING torch environment: no network, no apt.
# (scripts/install_wheelhouse.sh; copied into the wheelhouse folder as install.sh)
#
#   bash /path/to/wheelhouse/install.sh [--python /path/to/env/bin/python] [--no-verify] [--verify-only]
#
# Default interpreter: $PYTHON, else `python` of the active environment, else python3.
# Steps: sha256 check of the folder -> host preflight -> install plan (verify.py --plan: the
# targets, plus each requirement the host does not already satisfy) -> pip install --no-index
# --no-deps of exactly those wheel files (pip never re-resolves the host's own packages, whose
# pins need not all hold) -> verify.py (imports + a real 4-image beton write/decode + which
# libraries got mapped). The ffcv wheel carries its OpenCV/turbojpeg libraries in
# site-packages/ffcv.libs, found through $ORIGIN RUNPATHs: no LD_LIBRARY_PATH, nothing
# outside the environment.
set -uo pipefail

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-}
VERIFY=1
INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    --no-verify) VERIFY=0; shift ;;
    --verify-only) INSTALL=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ -z "$PY" ]; then PY=$(command -v python || command -v python3 || true); fi

fail() { echo "WHEELHOUSE INSTALL FAILED: $*"; exit 1; }
[ -n "$PY" ] && "$PY" -c "pass" 2>/dev/null || fail "no usable python (use --python)"
[ -f "$DIR/manifest.json" ] || fail "$DIR/manifest.json missing: not a wheelhouse folder"

echo "== wheelhouse $DIR -> $("$PY" -c 'import sys; print(sys.prefix, sys.version.split()[0])')"
target=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['target_python'])" "$DIR/manifest.json")
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$target" = "$have" ] || fail "wheelhouse was built for Python $target, this interpreter is $have (rebuild with PYVER=$have)"
"$PY" -c "import torch" 2>/dev/null || fail "torch is not importable by $PY: install into an existing torch environment"
if [ "$INSTALL" = 1 ]; then
  "$PY" -m pip --version >/dev/null 2>&1 || fail "pip is not available in this environment (python -m pip); for uv envs run: uv pip install --no-index --find-links $DIR <manifest 'install' list>"
fi

if [ -f "$DIR/SHA256SUMS" ]; then
  if command -v sha256sum >/dev/null; then
    (cd "$DIR" && sha256sum --quiet -c SHA256SUMS) || fail "checksum mismatch (incomplete copy?)"
  else
    "$PY" - "$DIR" <<'EOF' || fail "checksum mismatch (incomplete copy?)"
import hashlib, sys, pathlib
d = pathlib.Path(sys.argv[1])
bad = [n for h, n in (l.split("  ", 1) for l in (d / "SHA256SUMS").read_text().splitlines())
       if hashlib.sha256((d / n).read_bytes()).hexdigest() != h]
sys.exit(1 if bad else 0)
EOF
  fi
  echo "checksums ok"
fi

"$PY" "$DIR/verify.py" --manifest "$DIR/manifest.json" --preflight-only || \
  echo "warning: preflight found host runtime problems (see above); trying anyway"

if [ "$INSTALL" = 1 ]; then
  plan_out=$("$PY" "$DIR/verify.py" --manifest "$DIR/manifest.json" --plan) || \
    fail "nothing installed: a requirement is neither on the host nor in the folder (see the lines above)"
  mapfile -t files < <(printf '%s\n' "$plan_out" | sed '/^$/d')
  [ "${#files[@]}" -gt 0 ] || fail "empty install plan"
  echo "pip install --no-index --no-deps ${files[*]}"
  # Only this folder: no config files (local indexes), no env-provided indexes/find-links.
  env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_REQUIRE_VIRTUALENV \
    PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PY" -m pip install --no-index --no-deps --no-cache-dir "${files[@]/#/$DIR/}" \
    || fail "pip could not install from $DIR (see its error above)"
fi

if [ "$VERIFY" = 1 ]; then
  "$PY" "$DIR/verify.py" --manifest "$DIR/manifest.json" || fail "verification failed (see above)"
fi
echo "WHEELHOUSE INSTALL OK: $("$PY" -c 'import sys; print(sys.prefix)')"
