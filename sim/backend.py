"""The Backend seam: the only simulator- (or robot-) specific part of an environment.

A backend moves joints, steps (or waits), reads joint state and object poses, renders cameras and saves /
restores its state. Tasks, the controller and observation assembly never talk to a simulator directly.
Conventions: SI units, base frame = world frame, quaternions xyzw, images uint8 (H, W, 3) RGB.
"""

from __future__ import annotations

import abc

import numpy as np

from robot_rl.errors import ConfigError
from robot_rl.robot.scene import SceneSpec


class Backend(abc.ABC):
    """Abstract simulator backend built from a :class:`~robot_rl.robot.scene.SceneSpec`."""

    name: str = "abstract"

    def __init__(self, scene: SceneSpec):
        self.scene = scene

    @abc.abstractmethod
    def reset_robot(self, q_arm: np.ndarray, width: float) -> None:
        """Teleport the arm to joint positions q_arm (7,) [rad] and the gripper to ``width`` [m]; zero velocity."""

    @abc.abstractmethod
    def set_targets(self, q_arm: np.ndarray, width: float) -> None:
        """Joint position targets (7,) [rad] for the arm's position servos and the gripper width target [m]."""

    @abc.abstractmethod
    def step(self) -> None:
        """Advance one control period (``scene.control_dt`` seconds)."""

    @abc.abstractmethod
    def joint_state(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Arm joint positions (7,) [rad], velocities (7,) [rad/s] and gripper width [m]."""

    @abc.abstractmethod
    def object_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Position (3,) [m] and orientation quaternion xyzw (4,) of a free object."""

    @abc.abstractmethod
    def set_object_pose(self, name: str, pos: np.ndarray, quat_xyzw: np.ndarray) -> None:
        """Teleport a free object (velocity zeroed)."""

    @abc.abstractmethod
    def set_marker(self, name: str, pos: np.ndarray) -> None:
        """Move a visual-only marker."""

    @abc.abstractmethod
    def render(self, camera: str, height: int, width: int) -> np.ndarray:
        """RGB image uint8 (height, width, 3) from a named camera."""

    @abc.abstractmethod
    def get_state(self) -> np.ndarray:
        """Full simulator state as a flat float64 array (restorable with :meth:`set_state`)."""

    @abc.abstractmethod
    def set_state(self, state: np.ndarray) -> None:
        """Restore a state from :meth:`get_state` (checked first with :meth:`check_state`)."""

    @abc.abstractmethod
    def state_size(self) -> int:
        """Length of the flat :meth:`get_state` vector of this scene."""

    def check_state(self, state) -> np.ndarray:
        """``state`` as the flat float64 vector :meth:`set_state` takes, without changing anything. Raises
        ConfigError (field ``state.backend``) for something that is not a numeric vector of :meth:`state_size`
        values (a state of another task or backend) or that holds NaN/inf (MuJoCo would silently reset such a
        state to its default pose on the next step)."""
        fix = f"pass get_state() of a {self.name} env of the same task"
        try:
            s = np.asarray(state, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError("state.backend", f"{type(state).__name__} is not a numeric state vector", fix) from None
        n = self.state_size()
        if s.shape != (n,):
            raise ConfigError("state.backend", f"shape {s.shape}, this {self.name} scene's state has ({n},)", fix)
        if not np.all(np.isfinite(s)):
            raise ConfigError("state.backend", f"{int(np.sum(~np.isfinite(s)))} NaN/inf values", fix)
        return s

    def close(self) -> None:
        """Release renderers and native resources."""

    # -- domain randomization setters (see robot_rl.envs.randomization; simulators implement them) ------------------
    def set_physics(self, params: dict) -> None:
        """Set physical parameters as factors on the scene's nominal values (absolute, not cumulative; a factor
        of 1 restores the nominal value). Keys, each optional (absent keys keep their current value):
        ``object_mass`` (float, every free object, inertia scaled alike), ``object_friction`` (float, every contact
        pair involving an object), ``joint_damping`` ((7,) passive arm-joint damping), ``actuator_gain`` ((7,)
        arm servo stiffness kp)."""
        raise self._unsupported("physics")

    def get_physics(self) -> dict:
        """Current values in SI units: ``object_mass`` {name: kg}, ``object_friction`` {name: effective
        object-table coefficient}, ``joint_damping`` (7,) [N m s/rad], ``actuator_gain`` (7,) kp [N m/rad]."""
        raise self._unsupported("physics")

    def set_camera_pose(self, camera: str, pos: np.ndarray, R: np.ndarray) -> None:
        """Camera pose in its parent frame (world frame for fixed cameras): position (3,) [m] and rotation (3, 3)
        with columns = camera x (right), y (up), z (backward), as :func:`robot_rl.robot.scene.look_at_matrix`."""
        raise self._unsupported("camera pose")

    def set_colors(self, rgba: dict) -> None:
        """Visual colours ``{name: (r, g, b, a)}`` in [0, 1] for free objects (by name) and ``"table"``."""
        raise self._unsupported("colors")

    def set_lighting(self, intensity: float) -> None:
        """Scene light intensity as a factor on the nominal lighting (1 = nominal)."""
        raise self._unsupported("lighting")

    def _unsupported(self, what: str) -> ConfigError:
        return ConfigError("randomization", f"the {self.name} backend cannot randomize {what}",
                           "use backend='mujoco' or 'pybullet', or drop that randomization group")

