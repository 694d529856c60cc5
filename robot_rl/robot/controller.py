"""Backend-independent differential-IK controller: end-effector delta actions -> joint position targets.

Shared by the MuJoCo and PyBullet backends and by the real-arm bridge. It only needs the URDF kinematic
chain (:mod:`robot_rl.robot.kinematics`) and the measured joint positions.

Action convention (float32, shape (5,), each in [-1, 1]), base frame:
    a[0:3]  end-effector translation delta, scaled by ``pos_scale`` metres per control step;
    a[3]    yaw delta about the base z axis, scaled by ``yaw_scale`` radians per control step;
    a[4]    gripper: -1 fully open (``max_width``), +1 fully closed (0 m), linear in between.
The tool keeps pointing straight down (roll/pitch fixed at ``R_down``); yaw is free.

The IK is damped least squares (Nakamura & Hanafusa 1986; Buss 2004 "Introduction to inverse kinematics with
Jacobian transpose, pseudoinverse and damped least squares methods") with a null-space pull toward the home
posture, a few iterations per control step, then clipped to joint limits and a per-step joint delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from robot_rl.robot.kinematics import KinematicChain

R_DOWN = np.diag([1.0, -1.0, -1.0])  # tool z axis pointing down, tool x along base x: yaw 0


def yaw_of(R: np.ndarray) -> float:
    """Yaw [rad] of a tool rotation matrix relative to ``R_DOWN`` (rotation about base z)."""
    # (R @ R_DOWN.T)[1, 0] and [0, 0]; R_DOWN = diag(1, -1, -1)
    return math.atan2(float(R[1, 0]), float(R[0, 0]))


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class ControllerConfig:
    """Units: metres, radians. ``workspace_low/high`` bound the commanded tool position (base frame)."""

    pos_scale: float = 0.02
    yaw_scale: float = 0.15
    max_width: float = 0.08
    workspace_low: tuple = (0.25, -0.35, 0.005)
    workspace_high: tuple = (0.75, 0.35, 0.45)
    yaw_limit: float = np.pi / 2
    ik_iters: int = 4
    damping: float = 0.02
    nullspace_gain: float = 0.2
    max_joint_delta: float = 0.25  # rad per control step


class DiffIKController:
    """Turns delta actions into joint position targets.

    Args:
        chain: kinematic chain of the arm (active joints = arm joints, tip = tool centre point).
        q_home: (n,) home posture [rad] used as the null-space target.
        config: :class:`ControllerConfig`.
    """

    def __init__(self, chain: KinematicChain, q_home: np.ndarray, config: ControllerConfig | None = None):
        self.chain = chain
        self.q_home = np.asarray(q_home, dtype=np.float64)
        self.cfg = config or ControllerConfig()
        self._lo = np.asarray(self.cfg.workspace_low)
        self._hi = np.asarray(self.cfg.workspace_high)
        self._damp = self.cfg.damping**2 * np.eye(6)

    def ee_pose(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tool position (3,) [m] and quaternion xyzw (4,) in the base frame."""
        return self.chain.pose(q)

    def target_from_action(self, q: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Target tool position (3,), target yaw [rad] and gripper width [m] for a delta action at posture q."""
        cfg = self.cfg
        a = np.minimum(np.maximum(np.asarray(action, dtype=np.float64), -1.0), 1.0)
        T = self.chain.fk(q)
        pos = np.minimum(np.maximum(T[:3, 3] + a[:3] * cfg.pos_scale, self._lo), self._hi)
        yaw = min(max(yaw_of(T[:3, :3]) + float(a[3]) * cfg.yaw_scale, -cfg.yaw_limit), cfg.yaw_limit)
        width = (1.0 - float(a[4])) * 0.5 * cfg.max_width
        return pos, yaw, width

    def solve_ik(self, q: np.ndarray, pos: np.ndarray, yaw: float, iters: int | None = None) -> np.ndarray:
        """Joint positions (n,) that place the tool at ``pos`` with ``yaw`` (pointing down), starting from q."""
        cfg = self.cfg
        q = np.array(q, dtype=np.float64)
        R_t = rot_z(yaw) @ R_DOWN
        for _ in range(iters or cfg.ik_iters):
            T, J = self.chain.jacobian(q)
            # orientation error: 0.5 * sum_i r_i x r_t_i over the columns of R and R_t (Siciliano et al.,
            # "Robotics", eq. 3.85), exact direction and monotone in the angle for errors below 90 degrees;
            # sum_i a_i x b_i is the axial vector of B A^T - A B^T
            R = T[:3, :3]
            M = R_t @ R.T - R @ R_t.T
            err = np.array([*(pos - T[:3, 3]), 0.5 * M[2, 1], 0.5 * M[0, 2], 0.5 * M[1, 0]])
            # damped least squares + null-space posture term: dq = J^+ e + (I - J^+ J) v with
            # J^+ = J^T (J J^T + lambda^2 I)^-1 and v = k (q_home - q), evaluated as J^+ (e - J v) + v
            v = cfg.nullspace_gain * (self.q_home - q)
            dq = J.T @ np.linalg.solve(J @ J.T + self._damp, err - J @ v) + v
            q = np.minimum(np.maximum(q + dq, self.chain.lower), self.chain.upper)
        return q

    def compute(self, q: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, float]:
        """Joint position targets (n,) [rad] and gripper width target [m] for one control step.

        Args:
            q: (n,) measured arm joint positions [rad].
            action: (5,) delta action in [-1, 1] (see module docstring); values outside are clipped.
        """
        pos, yaw, width = self.target_from_action(q, action)
        q_t = self.solve_ik(q, pos, yaw)
        d = self.cfg.max_joint_delta
        q_t = q + np.minimum(np.maximum(q_t - q, -d), d)
        return q_t, width
