#!/usr/bin/env bash
# README command 2: set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
export ROBOT_RL_REQUIRE_ROS=${ROBOT_RL_REQUIRE_ROS:-1}  # the ROS 2 tests must run, not skip
.venv/bin/python -m pytest -q "$@"
