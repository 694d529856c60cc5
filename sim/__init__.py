"""Simulator backends (installed as ``robot_rl.sim``): :func:`make_backend` (here), the
:class:`~robot_rl.sim.backend.Backend` seam in :mod:`robot_rl.sim.backend`, the MuJoCo backend in
:mod:`robot_rl.sim.mujoco_backend`, the PyBullet twin in :mod:`robot_rl.sim.pybullet_backend`."""

from __future__ import annotations

from robot_rl.errors import ConfigError
from robot_rl.robot.scene import SceneSpec
from robot_rl.sim.backend import Backend

BACKENDS = ("mujoco", "pybullet")


def make_backend(name: str, scene: SceneSpec) -> Backend:
    """Instantiate a backend by name. Raises ConfigError for an unknown or unavailable backend."""
    if name == "mujoco":
        from robot_rl.sim.mujoco_backend import MujocoBackend

        return MujocoBackend(scene)
    if name == "pybullet":
        try:
            from robot_rl.sim.pybullet_backend import PybulletBackend
        except ImportError as e:
            raise ConfigError("backend", f"the pybullet backend cannot be imported ({e})",
                              "pip install pybullet, or use backend='mujoco'") from None
        return PybulletBackend(scene)
    raise ConfigError("backend", f"unknown backend {name!r}", f"choose one of {', '.join(BACKENDS)}")
