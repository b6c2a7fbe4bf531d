#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: Qt/Xvfb system packages, a venv,
# the CPU build of torch 2.13.0 first (a plain `torch` would pull a CUDA build),
# then the project with its GUI and test extras. SETUP_TEST=1 (make test) also
# installs Chromium, which only the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

need_debs=()
for pkg in xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 \
           libxcb-keysyms1 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 \
           libxcb-image0 libxcb-xfixes0 libxcb-xkb1 libdbus-1-3 libfontconfig1 \
           ${SETUP_TEST:+chromium} ${EXTRA_DEBS:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if [ ${#need_debs[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${need_debs[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_debs[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch (CPU build; see README for GPU)"
  "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp="$VENV/.pcl-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing pcl-viewer and its dependencies"
  "$VENV/bin/pip" install -q -e ".[gui,pyside6,test,umap]"
  touch "$stamp"
fi
