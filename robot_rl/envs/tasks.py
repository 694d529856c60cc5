"""Tasks: reset distribution, observation of task objects, success predicate and sparse reward.

A task is backend-independent: it only uses the :class:`~robot_rl.sim.backend.Backend` interface, so the same
task object code runs on MuJoCo, PyBullet and (through ROS 2) a real arm. Frames: robot base frame; SI units.

Tasks
- ``lift``  pick the cube and raise its centre ``lift_height`` above the table (Chi et al. style "lift").
- ``place`` precision pick-and-place: put the cube down with its centre within ``tolerance`` (default 1 cm)
  of a target marker on the table, resting flat and released by the gripper.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
from scipy.spatial.transform import Rotation

from robot_rl.errors import ConfigError
from robot_rl.robot.scene import MarkerSpec, ObjectSpec

CUBE = ObjectSpec("cube", half_size=(0.02, 0.02, 0.02), mass=0.05, friction=1.0)


def canonical_quat(q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Flip the sign of quaternion q (xyzw) so that it lies in the same hemisphere as ``ref`` (no double cover jumps)."""
    return q if float(np.dot(q, ref)) >= 0.0 else -q


@dataclass
class Task:
    """Base class. Subclasses define objects/markers, the reset distribution and success.

    Attributes:
        max_steps: time limit in control steps (the episode is truncated after it).
    """

    name: str = "task"
    max_steps: int = 80
    cube_x: tuple = (0.42, 0.6)
    cube_y: tuple = (-0.18, 0.02)
    cube_yaw: tuple = (-np.pi / 6, np.pi / 6)

    objects = (CUBE,)
    markers = ()

    def sample(self, rng: np.random.Generator) -> dict:
        """Sample episode parameters (object poses, targets) as plain floats (stored in episode metadata)."""
        return {"cube_xy": [float(rng.uniform(*self.cube_x)), float(rng.uniform(*self.cube_y))],
                "cube_yaw": float(rng.uniform(*self.cube_yaw))}

    def apply(self, backend, params: dict) -> None:
        """Place objects/markers in ``backend`` according to sampled params."""
        hz = CUBE.half_size[2]
        quat = Rotation.from_euler("z", params["cube_yaw"]).as_quat()
        backend.set_object_pose("cube", np.array([*params["cube_xy"], hz]), quat)

    def observe(self, backend, params: dict) -> dict[str, np.ndarray]:
        """Task part of the observation: ``cube_pos`` (3,) [m], ``cube_quat`` (4,) xyzw, float32."""
        pos, quat = backend.object_pose("cube")
        return {"cube_pos": pos.astype(np.float32),
                "cube_quat": canonical_quat(quat, np.array([0.0, 0.0, 0.0, 1.0])).astype(np.float32)}

    derived_keys: tuple = ()  # observation keys computed from other keys (see :meth:`derive`)

    def derive(self, obs: dict) -> None:
        """Recompute the derived keys of an observation in place (after sensor noise changed their inputs)."""

    def is_success(self, obs: dict, params: dict) -> bool:
        raise NotImplementedError

    def is_failure(self, obs: dict, params: dict) -> bool:
        """Irrecoverable failure (the episode terminates with reward 0). Default: never."""
        return False

    def obs_dims(self) -> dict[str, int]:
        return {"cube_pos": 3, "cube_quat": 4}


@dataclass
class LiftTask(Task):
    name: str = "lift"
    max_steps: int = 60
    lift_height: float = 0.08  # m the cube centre must rise above its resting height

    def is_success(self, obs, params):
        return bool(obs["cube_pos"][2] >= CUBE.half_size[2] + self.lift_height)


@dataclass
class PlaceTask(Task):
    """Precision place. Success: |cube_xy - target_xy| <= tolerance, cube resting (centre within 5 mm of its
    resting height, tilt < 0.1 rad) and released (gripper width > cube width + 1 cm)."""

    name: str = "place"
    max_steps: int = 100
    tolerance: float = 0.01
    target_x: tuple = (0.42, 0.6)
    target_y: tuple = (0.06, 0.2)
    markers = (MarkerSpec("target", radius=0.01),)

    def __post_init__(self):
        if not 0.0 < self.tolerance <= 0.05:
            raise ConfigError("tolerance", f"{self.tolerance} m is outside (0, 0.05]", "use e.g. tolerance=0.01")

    def sample(self, rng):
        p = super().sample(rng)
        p["target_xy"] = [float(rng.uniform(*self.target_x)), float(rng.uniform(*self.target_y))]
        return p

    def apply(self, backend, params):
        super().apply(backend, params)
        backend.set_marker("target", np.array([*params["target_xy"], 0.0005]))

    def observe(self, backend, params):
        """Adds ``target_pos`` (3,) m (target centre at cube-centre height) and ``cube_to_target`` (3,) m
        (= target_pos - cube_pos, the goal-relative vector, like robosuite's ``cube_to_goal``)."""
        o = super().observe(backend, params)
        o["target_pos"] = np.array([*params["target_xy"], CUBE.half_size[2]], dtype=np.float32)
        self.derive(o)
        return o

    derived_keys: tuple = ("cube_to_target",)

    def derive(self, obs):
        obs["cube_to_target"] = (obs["target_pos"] - obs["cube_pos"]).astype(np.float32)

    def obs_dims(self):
        return {**super().obs_dims(), "target_pos": 3, "cube_to_target": 3}

    def is_success(self, obs, params):
        cube, tgt = obs["cube_pos"], obs["target_pos"]
        q = obs["cube_quat"]
        tilt = 2.0 * np.arccos(np.clip(np.sqrt(q[2] ** 2 + q[3] ** 2), -1.0, 1.0))  # angle away from pure yaw
        return bool(np.linalg.norm(cube[:2] - tgt[:2]) <= self.tolerance
                    and abs(cube[2] - CUBE.half_size[2]) < 0.005 and tilt < 0.1
                    and obs["gripper_width"][0] > 2 * CUBE.half_size[1] + 0.01)


    def is_failure(self, obs, params):
        """Placed and missed (one release per episode, like a real place): the cube was carried (> 2 cm from its
        start) to within 3 cm of the target, rests on the table and is released, but is off by more than
        ``tolerance``. Ending here saves the steps a policy would spend nudging a released cube."""
        cube, tgt = obs["cube_pos"], obs["target_pos"]
        moved = np.linalg.norm(cube[:2] - np.asarray(params["cube_xy"])) > 0.02
        near = np.linalg.norm(cube[:2] - tgt[:2]) <= 0.03
        resting = abs(cube[2] - CUBE.half_size[2]) < 0.005
        released = obs["gripper_width"][0] > 2 * CUBE.half_size[1] + 0.01
        return bool(moved and near and resting and released and not self.is_success(obs, params))


TASKS = {"lift": LiftTask, "place": PlaceTask}


def make_task(name: str, **overrides) -> Task:
    """Create a task by name with field overrides. Raises ConfigError for unknown names or fields."""
    if name not in TASKS:
        raise ConfigError("task", f"unknown task {name!r}", f"choose one of {', '.join(TASKS)}")
    task = TASKS[name]()
    params = [f.name for f in fields(task) if f.name not in ("name", "derived_keys")]
    bad = [k for k in overrides if k not in params]
    if bad:
        raise ConfigError(f"task.{bad[0]}", f"task {name!r} has no parameter {bad[0]!r}",
                          f"use one of {', '.join(params)}")
    task = replace(task, **{k: _task_value(k, v, getattr(task, k)) for k, v in overrides.items()}) \
        if overrides else task
    _check_task(name, task)
    return task


def is_real(v) -> bool:
    """A finite real number (Python or numpy int/float; not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and bool(np.isfinite(v))


def _task_value(key: str, value, default):
    """An override converted to the default's kind: a number, or a (low, high) pair of numbers. Raises ConfigError."""
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 2 and all(is_real(v) for v in value):
            return (float(value[0]), float(value[1]))
        raise ConfigError(f"task.{key}", f"{value!r} is not a (low, high) range", "give two numbers, low <= high, "
                          f"e.g. {list(default)}")
    if is_real(value) and isinstance(default, float):
        return float(value)
    if is_real(value) and isinstance(default, int) and float(value).is_integer():
        return int(value)
    raise ConfigError(f"task.{key}", f"{value!r} is not {'an integer' if isinstance(default, int) else 'a number'}",
                      f"use e.g. {default!r}")


_POSITIVE = {"max_steps": "e.g. 100 control steps", "lift_height": "e.g. 0.08 (m)", "tolerance": "e.g. 0.01 (m)"}


def _check_task(name: str, task: Task) -> None:
    """Impossible task parameters -> ConfigError (positive sizes, ordered (low, high) ranges)."""
    for k, example in _POSITIVE.items():
        v = getattr(task, k, None)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"task.{k}", f"{v!r} is not a positive number", f"use {example}")
    for k in ("cube_x", "cube_y", "cube_yaw", "target_x", "target_y"):
        v = getattr(task, k, None)
        if v is not None and not v[0] <= v[1]:
            raise ConfigError(f"task.{k}", f"{v!r} is not a (low, high) range", "give two numbers, low <= high")
