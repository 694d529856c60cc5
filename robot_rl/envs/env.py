"""Gymnasium environments: one Task + one Controller + one Backend.

``make_env(task, backend="mujoco", **cfg)`` is the single entry point. The observation assembly, the reset
distribution, the success predicate and the controller are the same objects for every backend.

Observation (dict of float32 arrays unless noted; robot base frame, SI units, quaternions xyzw):
    joint_pos (7,) rad · joint_vel (7,) rad/s · ee_pos (3,) m · ee_quat (4,) · gripper_width (1,) m ·
    cube_pos (3,) m · cube_quat (4,) · target_pos (3,) m, cube_to_target (3,) m [place only] ·
    image_<camera> uint8 (H, W, 3) RGB for every requested camera.
Action: float32 Box (5,) in [-1, 1] — see :mod:`robot_rl.robot.controller` for units.
Reward: sparse, 1.0 on the step that reaches success, else 0.0. The episode terminates on success or on the
task's irrecoverable failure (``info["failure"]``, e.g. place: released off target) and is truncated at the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from robot_rl.sim import make_backend
from robot_rl.robot.controller import ControllerConfig, DiffIKController
from robot_rl.errors import ConfigError
from robot_rl.robot.kinematics import KinematicChain
from robot_rl.envs.randomization import Randomizer
from robot_rl.robot.scene import SceneSpec
from robot_rl.envs.tasks import Task, canonical_quat, is_real, make_task

ROBOT_OBS_DIMS = {"joint_pos": 7, "joint_vel": 7, "ee_pos": 3, "ee_quat": 4, "gripper_width": 1}
#: the components of the env's 5-D action, in order (also the names of a ROS 2 action message)
ACTION_NAMES = ("ee_dx", "ee_dy", "ee_dz", "ee_dyaw", "gripper")


def action_by_name(names, positions) -> np.ndarray:
    """float64 (5,) action in :data:`ACTION_NAMES` order from named components in any order (``names[i]`` names
    ``positions[i]``, as in a ``sensor_msgs/JointState`` action message). NaN/inf pass through (the receiver decides).
    Raises ConfigError (field ``action.name``) for a missing component or names and positions of different lengths.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    idx = {n: i for i, n in enumerate(names)}
    missing = [n for n in ACTION_NAMES if n not in idx]
    if missing or len(pos) != len(names):
        raise ConfigError("action.name", f"missing {missing} or {len(pos)} positions for {len(names)} names",
                          f"send name={list(ACTION_NAMES)} with one position each")
    return pos[[idx[n] for n in ACTION_NAMES]]


class ResetNeeded(ConfigError, gym.error.ResetNeeded):
    """:meth:`RobotEnv.step` before the first :meth:`RobotEnv.reset` /
    :meth:`RobotEnv.set_state`. Both a :class:`~robot_rl.errors.ConfigError` (a usage error: the CLI prints it on
    one line, field ``reset``) and gymnasium's ``gymnasium.error.ResetNeeded`` (what gymnasium's
    ``OrderEnforcing`` wrapper raises for the same mistake), so callers of either convention catch it."""
EE_QUAT_REF = np.array([1.0, 0.0, 0.0, 0.0])  # tool pointing down, yaw 0
_RANDOMIZATION_STATE_KEYS = {"sample", "obs_buf", "act_buf", "rng"}  # of Randomizer.get_state()


@dataclass
class EnvConfig:
    """Environment options (all validated in :func:`make_env`).

    cameras: names of cameras to render into the observation (``front``, ``wrist``).
    image_size: (H, W) of observation images. control_dt / physics_dt in seconds.
    init_joint_noise: uniform half-range [rad] added to the home posture at reset.
    max_steps: overrides the task's time limit when set.
    randomization: domain randomization: None (off), a preset name (``"default"``) or a dict of overrides;
        see :mod:`robot_rl.envs.randomization`. The episode's sample is ``info["randomization"]`` at reset.
    """

    cameras: tuple = ()
    image_size: tuple = (96, 96)
    control_dt: float = 0.1
    physics_dt: float = 0.002
    init_joint_noise: float = 0.03
    max_steps: int | None = None
    render_size: tuple = (240, 320)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    randomization: str | dict | None = None

    def validate(self) -> "EnvConfig":
        """Return self, or raise ConfigError naming the first impossible field and a fix."""
        known = {c.name for c in SceneSpec().cameras}
        for cam in self.cameras:
            if cam not in known:
                raise ConfigError("cameras", f"unknown camera {cam!r}", f"choose from {sorted(known)}")
        if not (0 < self.physics_dt <= self.control_dt):
            raise ConfigError("physics_dt", f"physics_dt={self.physics_dt} must be in (0, control_dt="
                                            f"{self.control_dt}]", "use e.g. physics_dt=0.002, control_dt=0.1")
        n = self.control_dt / self.physics_dt
        if abs(n - round(n)) > 1e-6 * n:
            raise ConfigError("physics_dt", f"control_dt={self.control_dt} is not a whole number of physics steps "
                                            f"of {self.physics_dt}", "use e.g. physics_dt=0.002 with control_dt=0.1")
        for k, lo in (("image_size", 8), ("render_size", 8)):
            v = tuple(getattr(self, k))
            if len(v) != 2 or min(v) < lo:
                raise ConfigError(k, f"{v} is not a valid (H, W)", f"use e.g. {k}=(96, 96)")
        if not self.init_joint_noise >= 0:
            raise ConfigError("init_joint_noise", f"{self.init_joint_noise} < 0", "use e.g. 0.03 (rad), or 0")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ConfigError("max_steps", f"{self.max_steps!r} is not a positive integer",
                              "use e.g. 100, or leave it unset for the task's limit")
        return self


def _normalised(cfg: dict) -> dict:
    """EnvConfig values converted to their field types (a camera name -> a 1-tuple, integral numbers -> int,
    numbers -> float, a controller dict -> ControllerConfig); ConfigError naming the field for anything else."""
    if "cameras" in cfg:
        c = cfg["cameras"]
        c = () if c is None else (c,) if isinstance(c, str) else c
        if not (isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c)):
            raise ConfigError("cameras", f"{cfg['cameras']!r} is not a list of camera names", "use e.g. ['front']")
        cfg["cameras"] = tuple(c)
    for k in ("image_size", "render_size"):
        if k in cfg:
            v = cfg[k]
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(is_real(x) and float(x).is_integer()
                                                                          for x in v)):
                raise ConfigError(k, f"{v!r} is not an (H, W) pair of integers", f"use e.g. {k}=(96, 96)")
            cfg[k] = (int(v[0]), int(v[1]))
    for k in ("control_dt", "physics_dt", "init_joint_noise"):
        if k in cfg:
            if not is_real(cfg[k]):
                raise ConfigError(k, f"{cfg[k]!r} is not a number", f"use e.g. {k}={getattr(EnvConfig, k)}")
            cfg[k] = float(cfg[k])
    if cfg.get("max_steps") is not None:
        v = cfg["max_steps"]
        if is_real(v) and float(v).is_integer():
            cfg["max_steps"] = int(v)
    if "controller" in cfg and not isinstance(cfg["controller"], ControllerConfig):
        c = cfg["controller"]
        names = list(ControllerConfig.__dataclass_fields__)
        if not isinstance(c, dict) or set(c) - set(names):
            raise ConfigError("controller", f"{c!r} is not a ControllerConfig or a dict of its fields",
                              f"use fields {names}")
        cfg["controller"] = ControllerConfig(**c)
    return cfg


def assemble_observation(controller: DiffIKController, task: Task, joint_state: tuple, objects, params: dict,
                         images: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """THE observation assembly, shared by :class:`RobotEnv` and the ROS 2 policy node / recorder.

    Args:
        controller: gives the tool pose from joint positions (URDF forward kinematics).
        task: adds its keys via ``task.observe(objects, params)``.
        joint_state: (q (7,) rad, dq (7,) rad/s, gripper width m).
        objects: anything with ``object_pose(name) -> (pos (3,), quat xyzw (4,))`` (a Backend, or a cache of ROS
            PoseStamped messages).
        params: the episode's task parameters (``target_xy`` for ``place``).
        images: {camera: uint8 (H, W, 3) RGB}; stored as ``image_<camera>``.
    """
    q, dq, width = joint_state
    q, dq = np.asarray(q, dtype=np.float64), np.asarray(dq, dtype=np.float64)
    pos, quat = controller.ee_pose(q)
    obs = {"joint_pos": q.astype(np.float32), "joint_vel": dq.astype(np.float32),
           "ee_pos": pos.astype(np.float32), "ee_quat": canonical_quat(quat, EE_QUAT_REF).astype(np.float32),
           "gripper_width": np.array([width], dtype=np.float32)}
    obs.update(task.observe(objects, params))
    for cam, img in (images or {}).items():
        obs[f"image_{cam}"] = img
    return obs


class RobotEnv(gym.Env):
    """Tabletop manipulation env. Use :func:`make_env` to build one."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: Task, backend: str = "mujoco", config: EnvConfig | None = None,
                 render_mode: str | None = "rgb_array"):
        self.task, self.cfg = task, (config or EnvConfig()).validate()
        cfg = self.cfg
        self.scene = SceneSpec(objects=task.objects, markers=task.markers, control_dt=cfg.control_dt,
                               physics_dt=cfg.physics_dt)
        self.backend_name = backend
        lowdim = [*ROBOT_OBS_DIMS, *task.obs_dims()]
        self.randomizer = Randomizer(cfg.randomization, self.scene, lowdim, task.derived_keys, task.derive)
        self.randomization: dict = {}  # this episode's sample (plain JSON), {} when randomization is off
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
        self._started = False  # True once reset() or set_state() gave the episode its parameters
        # keys of an episode's params (the task's sample + the initial posture): what set_state() must be given
        sample = {**task.sample(np.random.default_rng(0)), "q0": [0.0] * 7}
        self._param_shapes = {k: np.shape(v) for k, v in sample.items()}
        self._param_keys = frozenset(sample)

    # -- observation -------------------------------------------------------------------------------------------
    def observe(self) -> dict[str, np.ndarray]:
        """The observation of the current state, without stepping: {key: array} with the keys of
        ``observation_space`` (low-dim float32 (d,) in the units and frames of :func:`assemble_observation`; images
        uint8 (H, W, 3) RGB, rendered now). It is the TRUE state: with domain randomization on, :meth:`reset` and
        :meth:`step` return it through the sensor model (noise, latency), this method does not — it is what
        success and failure are judged on (e.g. the ``sim_robot`` node's ``success`` topic)."""
        H, W = self.cfg.image_size
        images = {cam: self.backend.render(cam, H, W) for cam in self.cfg.cameras}
        return assemble_observation(self.controller, self.task, self.backend.joint_state(), self.backend,
                                    self.params, images)

    # -- gymnasium API -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Seeded reset. Same seed -> same initial state and (with the same actions) the same trajectory."""
        super().reset(seed=seed)
        self._seed = seed
        rng = self.np_random
        self.params = self.task.sample(rng)
        q0 = self.q_home + rng.uniform(-1, 1, size=7) * self.cfg.init_joint_noise
        self.params["q0"] = [float(v) for v in q0]
        self.randomization = {}
        if self.randomizer.active:  # one draw from the reset RNG seeds everything randomized in this episode
            ep_seed = int(rng.integers(2**63))
            self.randomization = self.randomizer.sample(ep_seed)
            self.randomizer.apply(self.backend, self.randomization)
        self.backend.reset_robot(q0, self.scene.robot.max_width)
        self.task.apply(self.backend, self.params)
        self.t = 0
        self._started = True
        obs = self.observe()
        if self.randomizer.active:
            hold = np.zeros(5)  # executed until the first (delayed) command arrives: stay, gripper as at reset
            hold[4] = 1.0 - 2.0 * self.scene.robot.max_width / self.controller.cfg.max_width
            obs = self.randomizer.start_episode(ep_seed, self.randomization, obs, hold)
        return obs, {"success": False, "params": self.params, "randomization": self.randomization}

    def _need_reset(self, what: str) -> None:
        if not self._started:
            raise ResetNeeded("reset", f"{what}() before the first reset()",
                              "call env.reset(seed=...) (or env.set_state(state)) first")

    def step(self, action):
        """One control step (``control_dt`` s). Raises :class:`ResetNeeded` before the first reset, ConfigError for
        an action that is not 5 finite numbers."""
        self._need_reset("step")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (5,):
            raise ConfigError("action", f"shape {a.shape} != (5,)", "send [dx, dy, dz, dyaw, gripper] in [-1, 1]")
        if not np.all(np.isfinite(a)):
            raise ConfigError("action", "contains NaN or inf", "check the policy output")
        if self.randomizer.active:
            a = self.randomizer.delay_action(a)
        q, _, _ = self.backend.joint_state()
        q_t, width = self.controller.compute(q, a)
        self.backend.set_targets(q_t, width)
        self.backend.step()
        self.t += 1
        obs = self.observe()
        success = self.task.is_success(obs, self.params)
        failure = (not success) and self.task.is_failure(obs, self.params)
        truncated = not (success or failure) and self.t >= self.max_steps
        if self.randomizer.active:  # success / failure above use the true state; the agent sees the sensors
            obs = self.randomizer.observe(obs)
        return obs, float(success), success or failure, truncated, {"success": success, "failure": failure, "t": self.t}

    def render(self):
        """``rgb_array``: the front camera at ``render_size``, uint8 (H, W, 3); None when ``render_mode`` is None."""
        if self.render_mode is None:
            return None
        H, W = self.cfg.render_size
        return self.backend.render("front", H, W)

    def get_state(self) -> dict:
        """Everything needed to resume this episode exactly: backend state, step counter, task params (and, with
        randomization on, the episode's sample, latency buffers and sensor-noise generator)."""
        st = {"backend": self.backend.get_state(), "t": self.t, "params": dict(self.params)}
        if self.randomizer.active:
            st["randomization"] = self.randomizer.get_state()
        return st

    def set_state(self, state: dict) -> None:
        """Restore a :meth:`get_state` of an env of the same task, backend and randomization setting.

        Everything is checked before anything changes: ConfigError naming ``state`` (not a dict), the missing or
        unexpected key (``state.backend``, ``state.t``, ``state.params.target_xy``, ``state.randomization``), a
        ``t`` that is not an integer >= 0, non-finite params, or a backend state of another scene or with NaN/inf
        (the backend's check: ``state.backend``). A bad state leaves the env as it was."""
        if not isinstance(state, dict):
            raise ConfigError("state", f"{type(state).__name__} is not an env state",
                              "pass a dict returned by env.get_state()")
        want = {"backend", "t", "params"} | ({"randomization"} if self.randomizer.active else set())
        missing, extra = sorted(want - set(state)), sorted(set(state) - want, key=str)
        if missing or extra:
            k = (missing or extra)[0]
            why = "missing" if missing else "not a key of this env's state" + (
                " (randomization is off here)" if k == "randomization" else "")
            raise ConfigError(f"state.{str(k)[:40]}", why,
                              "pass env.get_state() of an env with the same task and randomization setting")
        t, params = state["t"], state["params"]
        if not (isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0):
            raise ConfigError("state.t", f"{repr(t)[:60]} is not a step count (integer >= 0)", "pass env.get_state()")
        if not isinstance(params, dict) or set(params) != self._param_keys:
            got = sorted(params, key=str) if isinstance(params, dict) else type(params).__name__
            k = str(sorted(self._param_keys ^ set(params), key=str)[0])[:40] if isinstance(params, dict) else ""
            raise ConfigError(f"state.params{'.' + k if k else ''}",
                              f"keys {str(got)[:200]} do not match this task's {sorted(self._param_keys)}",
                              f"pass a state saved from a {self.task.name!r} env")
        for k, v in params.items():
            try:
                a = np.asarray(v, dtype=np.float64)
                ok = a.shape == self._param_shapes[k] and bool(np.all(np.isfinite(a)))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"state.params.{k}", f"is not {self._param_shapes[k] or 'one'} finite number(s)",
                                  "pass env.get_state()")
        self.backend.check_state(state["backend"])
        if self.randomizer.active:
            r, want_r = state["randomization"], _RANDOMIZATION_STATE_KEYS
            if not isinstance(r, dict) or set(r) != want_r:
                raise ConfigError("state.randomization", f"not a randomization state (keys {sorted(want_r)})",
                                  "pass env.get_state() of an env with the same randomization setting")
            self.randomizer.set_state(self.backend, state["randomization"])  # physics first (MuJoCo setConst)
            self.randomization = self.randomizer.sample_
        self.backend.set_state(state["backend"])
        self.t, self.params = int(t), dict(params)
        self._started = True

    def close(self):
        self.backend.close()


def make_env(task: str = "place", backend: str = "mujoco", *, task_kwargs: dict | None = None,
             render_mode: str | None = "rgb_array", **cfg) -> RobotEnv:
    """Build an environment.

    Args:
        task: ``lift`` or ``place``.
        backend: ``mujoco`` or ``pybullet`` (same scene, servos, task and controller). Robots and the
            ``sim_robot`` node are driven through the ROS 2 nodes (:mod:`robot_rl.ros`), which assemble the same
            observation dict; there is no ``ros2`` backend (see docs/ARCHITECTURE.md).
        task_kwargs: task field overrides (e.g. ``{"tolerance": 0.007}``).
        **cfg: :class:`EnvConfig` fields (``cameras``, ``image_size``, ``control_dt``, ``randomization``, ...).
    Raises:
        ConfigError: unknown task/backend/field or an impossible value.
    """
    if render_mode not in RobotEnv.metadata["render_modes"] and render_mode is not None:
        raise ConfigError("render_mode", f"unsupported {render_mode!r}",
                          "use 'rgb_array' (env.render() returns uint8 H x W x 3) or None")
    t, cfg = check_env_options(task, task_kwargs, **cfg)
    return RobotEnv(t, backend, EnvConfig(**cfg), render_mode=render_mode)


def check_env_options(task: str, task_kwargs: dict | None = None, backend: str | None = None,
                      ray: str | None = None, **cfg) -> tuple[Task, dict]:
    """Validate task name/kwargs, the backend name (when given), the vector envs' Ray address (when given: a
    non-empty string, :func:`robot_rl.envs.vector.make_vector_env`), :class:`EnvConfig` field names and values and
    the randomization spec without building a simulator (vector envs and ``collect`` call this before anything is
    started or written, so bad input fails there, on one line). Returns (task, normalised cfg). Raises ConfigError."""
    from robot_rl.sim import BACKENDS

    if ray is not None and not (isinstance(ray, str) and ray.strip()):
        raise ConfigError("env.ray", f"{ray!r} is not a Ray address", "use local, auto or HOST:PORT")

    if backend is not None and backend not in BACKENDS:
        raise ConfigError("backend", f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    if task_kwargs is not None and not isinstance(task_kwargs, dict):
        raise ConfigError("task_kwargs", f"{task_kwargs!r} is not a dict", "pass e.g. {'tolerance': 0.004}")
    t = make_task(task, **(task_kwargs or {}))
    fields = EnvConfig.__dataclass_fields__
    for k in cfg:
        if k not in fields:
            raise ConfigError(k, f"unknown env option {k!r}", f"use one of {', '.join(fields)}")
    cfg = _normalised(dict(cfg))
    EnvConfig(**cfg).validate()
    if cfg.get("randomization") is not None:
        Randomizer(cfg["randomization"], SceneSpec(objects=t.objects, markers=t.markers),
                   [*ROBOT_OBS_DIMS, *t.obs_dims()], t.derived_keys)
    return t, cfg
