"""Gymnasium environments: one Task + one Controller + one Backend.

``make_env(task, backend="mujoco", **cfg)`` is the single entry point. The observation assembly, the reset
distribution, the success predicate and the controller are the same objects for every backend.

Observation (dict of float32 arrays unless noted; robot base frame, SI units, quaternions xyzw):
    joint_pos (7,) rad · joint_vel (7,) rad/s · ee_pos (3,) m · ee_quat (4,) · gripper_width (1,) m ·
    cube_pos (3,) m · cube_quat (4,) · target_pos (3,) m, cube_to_target (3,) m [place only] ·
    image_<camera> uint8 (H, W, 3) RGB for every requested camera.
Action: float32 Box (5,) in [-1, 1] — see :mod:`robot_rl.controller` for units.
Reward: sparse, 1.0 on the step that reaches success (the episode then terminates), else 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from robot_rl.backend import make_backend
from robot_rl.controller import ControllerConfig, DiffIKController
from robot_rl.errors import ConfigError
from robot_rl.kinematics import KinematicChain
from robot_rl.scene import SceneSpec
from robot_rl.tasks import Task, canonical_quat, make_task

ROBOT_OBS_DIMS = {"joint_pos": 7, "joint_vel": 7, "ee_pos": 3, "ee_quat": 4, "gripper_width": 1}
EE_QUAT_REF = np.array([1.0, 0.0, 0.0, 0.0])  # tool pointing down, yaw 0


@dataclass
class EnvConfig:
    """Environment options (all validated in :func:`make_env`).

    cameras: names of cameras to render into the observation (``front``, ``wrist``).
    image_size: (H, W) of observation images. control_dt / physics_dt in seconds.
    init_joint_noise: uniform half-range [rad] added to the home posture at reset.
    max_steps: overrides the task's time limit when set.
    """

    cameras: tuple = ()
    image_size: tuple = (96, 96)
    control_dt: float = 0.1
    physics_dt: float = 0.002
    init_joint_noise: float = 0.03
    max_steps: int | None = None
    render_size: tuple = (240, 320)
    controller: ControllerConfig = field(default_factory=ControllerConfig)


class RobotEnv(gym.Env):
    """Tabletop manipulation env. Use :func:`make_env` to build one."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: Task, backend: str = "mujoco", config: EnvConfig | None = None,
                 render_mode: str | None = "rgb_array"):
        self.task, self.cfg = task, config or EnvConfig()
        cfg = self.cfg
        known = {c.name for c in SceneSpec().cameras}
        for cam in cfg.cameras:
            if cam not in known:
                raise ConfigError("cameras", f"unknown camera {cam!r}", f"choose from {sorted(known)}")
        if not (0 < cfg.physics_dt <= cfg.control_dt):
            raise ConfigError("physics_dt", f"physics_dt={cfg.physics_dt} must be in (0, control_dt={cfg.control_dt}]",
                              "use e.g. physics_dt=0.002, control_dt=0.1")
        if len(cfg.image_size) != 2 or min(cfg.image_size) < 8:
            raise ConfigError("image_size", f"{cfg.image_size} is not a valid (H, W)", "use e.g. image_size=(96, 96)")
        self.scene = SceneSpec(objects=task.objects, markers=task.markers, control_dt=cfg.control_dt,
                               physics_dt=cfg.physics_dt)
        self.backend_name = backend
        self.backend = make_backend(backend, self.scene)
        r = self.scene.robot
        self.chain = KinematicChain(r.urdf, r.base_link, r.tip_link)
        self.q_home = np.array(r.q_home)
        self.controller = DiffIKController(self.chain, self.q_home, cfg.controller)
        self.max_steps = cfg.max_steps or task.max_steps
        self.render_mode = render_mode
        spaces = {k: gym.spaces.Box(-np.inf, np.inf, (d,), np.float32) for k, d in ROBOT_OBS_DIMS.items()}
        spaces.update({k: gym.spaces.Box(-np.inf, np.inf, (d,), np.float32) for k, d in task.obs_dims().items()})
        H, W = cfg.image_size
        spaces.update({f"image_{c}": gym.spaces.Box(0, 255, (H, W, 3), np.uint8) for c in cfg.cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.params: dict = {}
        self.t = 0
        self._seed = None

    # -- observation -------------------------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        q, dq, width = self.backend.joint_state()
        pos, quat = self.controller.ee_pose(q)
        obs = {"joint_pos": q.astype(np.float32), "joint_vel": dq.astype(np.float32),
               "ee_pos": pos.astype(np.float32), "ee_quat": canonical_quat(quat, EE_QUAT_REF).astype(np.float32),
               "gripper_width": np.array([width], dtype=np.float32)}
        obs.update(self.task.observe(self.backend, self.params))
        H, W = self.cfg.image_size
        for cam in self.cfg.cameras:
            obs[f"image_{cam}"] = self.backend.render(cam, H, W)
        return obs

    # -- gymnasium API -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Seeded reset. Same seed -> same initial state and (with the same actions) the same trajectory."""
        super().reset(seed=seed)
        self._seed = seed
        rng = self.np_random
        self.params = self.task.sample(rng)
        q0 = self.q_home + rng.uniform(-1, 1, size=7) * self.cfg.init_joint_noise
        self.params["q0"] = [float(v) for v in q0]
        self.backend.reset_robot(q0, self.scene.robot.max_width)
        self.task.apply(self.backend, self.params)
        self.t = 0
        obs = self._obs()
        return obs, {"success": False, "params": self.params}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (5,):
            raise ConfigError("action", f"shape {a.shape} != (5,)", "send [dx, dy, dz, dyaw, gripper] in [-1, 1]")
        if not np.all(np.isfinite(a)):
            raise ConfigError("action", "contains NaN or inf", "check the policy output")
        q, _, _ = self.backend.joint_state()
        q_t, width = self.controller.compute(q, a)
        self.backend.set_targets(q_t, width)
        self.backend.step()
        self.t += 1
        obs = self._obs()
        success = self.task.is_success(obs, self.params)
        truncated = (not success) and self.t >= self.max_steps
        return obs, float(success), success, truncated, {"success": success, "t": self.t}

    def render(self):
        H, W = self.cfg.render_size
        return self.backend.render("front", H, W)

    def get_state(self) -> dict:
        """Everything needed to resume this episode exactly: backend state, step counter, task params."""
        return {"backend": self.backend.get_state(), "t": self.t, "params": dict(self.params)}

    def set_state(self, state: dict) -> None:
        self.backend.set_state(state["backend"])
        self.t, self.params = state["t"], dict(state["params"])

    def close(self):
        self.backend.close()


def make_env(task: str = "place", backend: str = "mujoco", *, task_kwargs: dict | None = None,
             render_mode: str | None = "rgb_array", **cfg) -> RobotEnv:
    """Build an environment.

    Args:
        task: ``lift`` or ``place``.
        backend: ``mujoco`` or ``pybullet`` (same scene, servos, task and controller; ``ros2`` arrives with
            its issue).
        task_kwargs: task field overrides (e.g. ``{"tolerance": 0.007}``).
        **cfg: :class:`EnvConfig` fields (``cameras``, ``image_size``, ``control_dt``, ...).
    Raises:
        ConfigError: unknown task/backend/field or an impossible value.
    """
    t = make_task(task, **(task_kwargs or {}))
    fields = EnvConfig.__dataclass_fields__
    for k in cfg:
        if k not in fields:
            raise ConfigError(k, f"unknown env option {k!r}", f"use one of {', '.join(fields)}")
    cfg = dict(cfg)
    if "cameras" in cfg:
        cfg["cameras"] = tuple(cfg["cameras"])
    return RobotEnv(t, backend, EnvConfig(**cfg), render_mode=render_mode)
