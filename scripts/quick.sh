#!/usr/bin/env bash
# README command 1: set up, then run the quick end-to-end pipeline (demos -> store -> diffusion base -> residual PPO -> report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
.venv/bin/robot-rl pipeline --preset quick --out "${1:-runs/quick}"
