#!/usr/bin/env bash
# README command 2: set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
export ROBOT_RL_REQUIRE_ROS=${ROBOT_RL_REQUIRE_ROS:-1}  # the ROS 2 tests must run, not skip
# two test processes share the cores: torch runs on one thread in each (also inside all_cores(), which the
# training loops use to update on every core while their env workers wait)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# test files spread over PYTEST_WORKERS processes (pytest-xdist; a file stays on one worker: its module fixtures
# are built once). The ROS 2 tests each run on a random ROS domain, so they may run beside other tests.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
