#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: system packages for headless rendering and venv, a venv in .venv,
# torch pinned to the local CPU build (installed FIRST so nothing pulls the multi-GB CUDA build), then robot_rl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# system packages (Debian/Ubuntu): headless EGL rendering for MuJoCo, and venv support for the interpreter
need_pkgs=()
have_pkg() { command -v dpkg >/dev/null && dpkg -s "$1" >/dev/null 2>&1; }
for pkg in libegl1 libgl1 libgl1-mesa-dri libegl-mesa0; do
  have_pkg "$pkg" || need_pkgs+=("$pkg")
done
"$PY" -c "import ensurepip, venv" 2>/dev/null || need_pkgs+=("python3-venv")
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing system packages: ${need_pkgs[*]} (needs root or sudo)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "[setup] warning: no apt-get; install the equivalents of: ${need_pkgs[*]}" >&2
  fi
fi

stamp=".venv/.robot_rl_setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/pip ] || { rm -rf .venv; "$PY" -m venv .venv; }  # a venv made without ensurepip has no pip
.venv/bin/pip install -q --upgrade pip setuptools wheel
# torch first and pinned. On this project's machines pip's configured find-links hold the CPU wheel
# (torch-2.13.0+cpu); elsewhere point TORCH_INDEX_URL at https://download.pytorch.org/whl/cpu to get it.
torch_src=()
[ -n "${TORCH_INDEX_URL:-}" ] && torch_src=(--extra-index-url "$TORCH_INDEX_URL")
.venv/bin/pip install -q "torch==2.13.0" "${torch_src[@]}"
.venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" || echo "[setup] warning: a CUDA \
build of torch was installed (several GB); set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU one" >&2
.venv/bin/pip install -q -e ".[test,ros,remote,ray]"
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, mujoco; print("torch", torch.__version__, "mujoco", mujoco.__version__)')"
