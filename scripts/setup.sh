#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: system packages for headless rendering, a venv in .venv,
# torch pinned to the local CPU build (installed FIRST so nothing pulls the multi-GB CUDA build), then robot_rl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_pkgs=()
for lib in libEGL.so.1 libGL.so.1 libEGL_mesa.so.0; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need_pkgs+=("$lib")
done
if [ ${#need_pkgs[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] installing system packages for headless rendering (EGL/OSMesa)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libegl1 libgl1 libgl1-mesa-dri libegl-mesa0 >/dev/null
fi

stamp=".venv/.robot_rl_setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip setuptools wheel
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test,ros]"
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, mujoco; print("torch", torch.__version__, "mujoco", mujoco.__version__)')"
