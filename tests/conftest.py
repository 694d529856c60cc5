"""Test-session checks shared by every test module."""

import os
import sys
from pathlib import Path

import pytest

# bench/parity.py (sim-to-sim parity measurements) is shared by tests/test_pybullet.py and bench/bench_pybullet.py;
# it is a measurement helper, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def pytest_configure(config):
    # The ROS 2 tests skip where rclpy is missing (a plain `pip install -e .[test]`); the README's test command sets
    # ROBOT_RL_REQUIRE_ROS=1 so that CI fails instead of silently skipping the DDS acceptance tests.
    if os.environ.get("ROBOT_RL_REQUIRE_ROS") == "1":
        try:
            import rclpy  # noqa: F401
        except ImportError as e:
            raise pytest.UsageError(f"ROBOT_RL_REQUIRE_ROS=1 but rclpy cannot be imported ({e}); "
                                    "install the ROS 2 wheels: pip install -e '.[ros]'") from None
