"""Scripted experts: closed-loop state machines over the observation dict, with configurable noise.

They read only the observation (never the simulator), so they run unchanged on every backend.
Noise model (per episode, seeded): Gaussian action noise of std ``noise`` on the translation/yaw
components, plus a constant per-episode placement bias of std ``bias`` metres (a human-like systematic
error), which is what makes demonstrations imperfect in the millimetre range.
"""

from __future__ import annotations

import numpy as np

from robot_rl.robot.controller import yaw_of
from robot_rl.errors import ConfigError
from scipy.spatial.transform import Rotation

HOVER = 0.08  # m above the grasp height while approaching
CARRY_Z = 0.09  # m cube-centre height while transporting


def _yaw_from_quat(q) -> float:
    return yaw_of(Rotation.from_quat(q).as_matrix())


def _wrap_quarter(a: float) -> float:
    """Wrap an angle to [-pi/4, pi/4) (the cube is 90-degree symmetric)."""
    return (a + np.pi / 4) % (np.pi / 2) - np.pi / 4


class ScriptedExpert:
    """Pick (and, for ``place``, place) expert.

    Args:
        task: ``lift`` or ``place``.
        noise: std of Gaussian noise added to action components 0-3 (in action units, [-1, 1] scale).
        bias: std [m] of a per-episode constant offset added to the placement target (place only).
        pos_scale, yaw_scale: the controller's action scales (to convert errors into actions).
        seed: RNG seed; call :meth:`reset` with a seed per episode for reproducibility.
    """

    def __init__(self, task: str, noise: float = 0.0, bias: float = 0.0, pos_scale: float = 0.02,
                 yaw_scale: float = 0.15, seed: int | None = None):
        if task not in ("lift", "place"):
            raise ConfigError("task", f"no scripted expert for {task!r}", "use lift or place")
        if noise < 0 or bias < 0:
            raise ConfigError("noise", "noise and bias must be >= 0", "use e.g. noise=0.1")
        self.task, self.noise, self.bias = task, noise, bias
        self.pos_scale, self.yaw_scale = pos_scale, yaw_scale
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.phase = "approach"
        self.timer = 0
        self.offset = self.rng.normal(0.0, self.bias, size=2) if self.bias > 0 else np.zeros(2)

    def _move(self, ee, goal, yaw_err=0.0, grip=-1.0, gain=1.0):
        a = np.zeros(5)
        a[:3] = np.clip(gain * (goal - ee) / self.pos_scale, -1, 1)
        a[3] = np.clip(yaw_err / self.yaw_scale, -1, 1)
        a[4] = grip
        return a

    def act(self, obs: dict) -> np.ndarray:
        """Action (5,) float32 in [-1, 1] for the current observation."""
        ee, cube = obs["ee_pos"].astype(np.float64), obs["cube_pos"].astype(np.float64)
        ee_yaw = _yaw_from_quat(obs["ee_quat"])
        yaw_err = _wrap_quarter(_yaw_from_quat(obs["cube_quat"]) - ee_yaw)
        width = float(obs["gripper_width"][0])
        self.timer += 1
        p = self.phase
        if p == "approach":
            goal = cube + [0, 0, HOVER]
            a = self._move(ee, goal, yaw_err)
            if np.linalg.norm((goal - ee)[:2]) < 0.006 and abs(goal[2] - ee[2]) < 0.02 and abs(yaw_err) < 0.05:
                self.phase = "descend"
        elif p == "descend":
            goal = cube.copy()
            a = self._move(ee, goal, yaw_err)
            if abs(ee[2] - cube[2]) < 0.006:
                self.phase, self.timer = "grasp", 0
        elif p == "grasp":
            a = self._move(ee, cube, 0.0, grip=1.0)
            if self.timer >= 4:
                self.phase = "lift"
        elif p == "lift":
            a = self._move(ee, np.array([ee[0], ee[1], CARRY_Z + 0.02]), 0.0, grip=1.0)
            if self.task == "place" and ee[2] > CARRY_Z:
                self.phase = "transport"
        elif p == "transport":
            tgt = obs["target_pos"].astype(np.float64)
            goal_cube = np.array([tgt[0] + self.offset[0], tgt[1] + self.offset[1], CARRY_Z])
            a = self._move(ee, ee + (goal_cube - cube), 0.0, grip=1.0)
            if np.linalg.norm((goal_cube - cube)[:2]) < 0.003:
                self.phase = "lower"
        elif p == "lower":
            tgt = obs["target_pos"].astype(np.float64)
            goal_cube = np.array([tgt[0] + self.offset[0], tgt[1] + self.offset[1], tgt[2] + 0.002])
            a = self._move(ee, ee + (goal_cube - cube), 0.0, grip=1.0, gain=0.7)
            if cube[2] - goal_cube[2] < 0.003:
                self.phase, self.timer = "release", 0
        elif p == "release":
            a = self._move(ee, ee, 0.0, grip=-1.0)
            if self.timer >= 3 and width > 0.06:
                self.phase = "retreat"
        else:  # retreat
            a = self._move(ee, np.array([ee[0], ee[1], cube[2] + HOVER]), 0.0, grip=-1.0)
        if self.noise > 0:
            a[:4] += self.rng.normal(0.0, self.noise, size=4)
        return np.clip(a, -1.0, 1.0).astype(np.float32)


class ScriptedIntervention:
    """The scripted operator's intervention rule for ``place``: a stand-in for the person who takes over when the
    robot is about to fail (HIL-SERL, Luo et al. 2024), for learning on the robot in simulation.

    Rule: the expert takes over when the policy holds the cube low over the wrong spot, i.e. about to set it down
    off target: all of gripper width < ``max_width`` (closed on the 40 mm cube), cube centre ``lift[0]``-``lift[1]``
    above its resting height (``target_pos`` z), and horizontal cube-to-target error between ``min_error`` and
    ``near``. From then to the end of the episode a :class:`ScriptedExpert` drives from its ``transport`` phase:
    lift to carry height, align within 3 mm, lower, release. A policy that places well, or fails earlier (no grasp, dropped cube, far from
    the target), is not helped; so the intervention rate falls as the policy improves.

    Call :meth:`reset` at each episode start and the instance once per control step with the env's observation
    (``ee_pos``, ``ee_quat``, ``cube_pos``, ``cube_quat``, ``target_pos``, ``gripper_width``; m, xyzw, base frame).

    Args:
        near, lift, min_error, max_width: the trigger's bounds [m]. pos_scale, yaw_scale: the controller's action
            scales. Raises ConfigError for empty bounds.
    Attributes: ``active`` (the expert drives), ``steps`` (steps it drove this episode).
    """

    def __init__(self, near: float = 0.03, lift: tuple = (0.008, 0.03), min_error: float = 0.003,
                 max_width: float = 0.045, pos_scale: float = 0.02, yaw_scale: float = 0.15):
        if not (0.0 <= min_error < near and lift[0] < lift[1] and max_width > 0):
            raise ConfigError("intervention", f"near {near}, lift {list(lift)}, min_error {min_error}, max_width "
                              f"{max_width}", "use 0 <= min_error < near, lift [lo, hi] with lo < hi, max_width > 0")
        self.near, self.lift, self.min_error, self.max_width = near, tuple(lift), min_error, max_width
        self.expert = ScriptedExpert("place", pos_scale=pos_scale, yaw_scale=yaw_scale)
        self.reset()

    def reset(self) -> None:
        self.active, self.steps = False, 0

    def triggers(self, obs: dict) -> bool:
        """The rule (class doc) on one observation."""
        cube, tgt = np.asarray(obs["cube_pos"], np.float64), np.asarray(obs["target_pos"], np.float64)
        err = float(np.linalg.norm(cube[:2] - tgt[:2]))
        lift = float(cube[2] - tgt[2])
        return bool(obs["gripper_width"][0] < self.max_width and self.lift[0] < lift < self.lift[1]
                    and self.min_error < err < self.near)

    def __call__(self, obs: dict) -> np.ndarray | None:
        """The expert's action (5,) float32 for this step once the rule has fired this episode, else None."""
        if not self.active and self.triggers(obs):
            self.active = True
            self.expert.reset()
            self.expert.phase = "transport"
        if not self.active:
            return None
        self.steps += 1
        return self.expert.act(obs)
