#!/usr/bin/env bash
# Installs the system libraries ffcv 1.0.2 compiles against (found through pkg-config), only when missing.
set -euo pipefail
PKGS="pkg-config libopencv-dev libturbojpeg0-dev"
have() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists opencv4 && pkg-config --exists libturbojpeg; }
have && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "error: ffcv needs system packages ($PKGS); install them (e.g. 'sudo apt-get install -y $PKGS') and run 'make setup' again" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get here; install the equivalents of '$PKGS' (OpenCV 4 + libturbojpeg with pkg-config files) and run 'make setup' again" >&2
  exit 1
fi
echo "installing system packages for ffcv: $PKGS"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
have || { echo "error: $PKGS installed but pkg-config still cannot find opencv4/libturbojpeg" >&2; exit 1; }
