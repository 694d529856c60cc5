#!/usr/bin/env bash
# README command 1: set up, then
#   1. the quick end-to-end pipeline (demos -> store -> diffusion base -> residual PPO -> report): the plumbing, too
#      small to learn the precision task;
#   2. residual learning that shows: residual PPO (40 k env steps) on the shipped BC base tests/fixtures/place_bc_mujoco
#      at a tighter tolerance (2 mm, where that base succeeds ~40 % of the time), both evaluated on the same 200
#      held-out seeds with an exact McNemar test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
OUT=${1:-runs/quick}
.venv/bin/robot-rl pipeline --preset quick --out "$OUT"
.venv/bin/robot-rl train-residual --algo ppo --base tests/fixtures/place_bc_mujoco --task place --out "$OUT/learning" \
    --overwrite --train-seeds 1 --set task.tolerance=0.002 --set ppo.total_env_steps=40000 --set ppo.n_envs=8 \
    --set ppo.n_steps=100 --set ppo.align_chunks=false --set ppo.val_every=0 --set eval.episodes=200
