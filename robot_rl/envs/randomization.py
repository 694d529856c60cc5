"""Domain randomization: one seeded, backend-neutral sampler; backends only expose small generic setters.

Configure it with ``make_env(task, backend, randomization=...)`` (an :class:`~robot_rl.envs.EnvConfig` field, so it
also flows through ``make_vector_env(..., randomization=...)`` and ``train_residual(..., env_kwargs=...)``):

- ``None`` / ``"none"``: off (the env behaves exactly as without this module);
- ``"default"``: the moderate preset :data:`PRESETS` ``["default"]``; ``"visual"``: only its colours, light and
  camera pose jitter (what a camera policy must not depend on);
- a dict of overrides, nested (``{"physics": {"object_mass": [0.5, 2.0]}}``) or dotted
  (``{"physics.object_mass": [0.5, 2.0]}``). Without a ``"preset"`` key a dict starts from nothing (only what it
  names is randomized); ``{"preset": "default", ...}`` overrides the preset key by key.

Parameters (:data:`PARAMS`; ranges are ``[lo, hi]`` sampled uniformly once per episode, a single number = fixed):

=============================  ==================================================================================
``physics.object_mass``        factor on every free object's mass (and inertia: uniform density)
``physics.object_friction``    factor on the friction of every contact pair involving an object
``physics.joint_damping``      factor on the arm joints' passive damping, drawn per joint
``physics.actuator_gain``      factor on the arm position servos' stiffness kp, drawn per joint
``sensing.obs_noise``          ``{obs_key: std}`` zero-mean Gaussian noise added every step (units of the key;
                               quaternions are renormalised; derived keys such as ``cube_to_target`` follow)
``sensing.obs_bias``           ``{obs_key: half}`` a constant offset per episode, uniform in [-half, half] per
                               element (units of the key): a sensor's calibration error, e.g. a gripper width
                               that reads 4 mm wide on one robot and 2 mm narrow on another (applied before noise)
``sensing.action_latency``     ``[k_min, k_max]`` integer control steps between a command and its execution
``sensing.obs_latency``        ``[k_min, k_max]`` integer control steps an observation is delayed by
``sensing.camera_pos``         half-range [m] of a uniform offset of every camera position (in its parent frame)
``sensing.camera_angle``       half-range [rad] of a uniform rotation vector applied in every camera's own frame
``visual.object_color``        half-range added to each RGB channel of every object's colour (clipped to [0, 1])
``visual.table_color``         half-range added to each RGB channel of the table colour
``visual.light``               factor on the scene lighting intensity (MuJoCo lights + headlight; Bullet's
                               TinyRenderer ambient/diffuse coefficients)
=============================  ==================================================================================

Determinism: the episode's sample is drawn from one integer taken from the env's reset RNG, so the same reset seed
gives the same parameters, the same sensor noise and (with the same actions) the same trajectory. Each parameter
has its own generator (``default_rng([episode_seed, crc32(name)])``), so enabling one parameter never changes the
values drawn for another. The sample is plain JSON (floats, ints, lists, dicts): ``info["randomization"]`` at reset
and ``extra["randomization"]`` in the episode metadata of a collected store.

Success, reward and the controller always use the true state; noise and latency apply to what the agent sees.
"""

from __future__ import annotations

import copy
import zlib
from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from robot_rl.errors import ConfigError
from robot_rl.robot.scene import SceneSpec, look_at_matrix

GROUPS = ("physics", "sensing", "visual")


@dataclass(frozen=True)
class Param:
    """kind: ``factor`` ([lo, hi] multiplicative), ``steps`` ([k_min, k_max] ints), ``half`` (a half-range >= 0)
    or ``noise`` ({obs_key: std}); ``low``/``high``: allowed bounds (``low_open``: low itself excluded)."""

    kind: str
    low: float
    high: float
    low_open: bool = False
    example: str = ""


PARAMS: dict[str, Param] = {
    "physics.object_mass": Param("factor", 0.0, 10.0, True, "[0.7, 1.3]"),
    "physics.object_friction": Param("factor", 0.0, 5.0, True, "[0.7, 1.3]"),
    "physics.joint_damping": Param("factor", 0.0, 20.0, False, "[0.5, 2.0]"),
    "physics.actuator_gain": Param("factor", 0.0, 3.0, True, "[0.8, 1.2]"),
    "sensing.obs_noise": Param("noise", 0.0, 1.0, False, "{'cube_pos': 0.001}"),
    "sensing.obs_bias": Param("noise", 0.0, 1.0, False, "{'gripper_width': 0.005}"),
    "sensing.action_latency": Param("steps", 0, 10, False, "[0, 1]"),
    "sensing.obs_latency": Param("steps", 0, 10, False, "[0, 1]"),
    "sensing.camera_pos": Param("half", 0.0, 0.1, False, "0.01"),
    "sensing.camera_angle": Param("half", 0.0, 0.35, False, "0.02"),
    "visual.object_color": Param("half", 0.0, 1.0, False, "0.1"),
    "visual.table_color": Param("half", 0.0, 1.0, False, "0.1"),
    "visual.light": Param("factor", 0.0, 3.0, True, "[0.7, 1.3]"),
}

PRESETS: dict[str, dict] = {
    "none": {},
    # moderate ranges: a policy that is not brittle should keep most of its success rate under these
    "default": {
        "physics": {"object_mass": [0.7, 1.5], "object_friction": [0.7, 1.3], "joint_damping": [0.5, 2.0],
                    "actuator_gain": [0.8, 1.2]},
        "sensing": {"obs_noise": {"joint_pos": 0.001, "joint_vel": 0.01, "ee_pos": 0.0005, "ee_quat": 0.001,
                                  "gripper_width": 0.0005, "cube_pos": 0.001, "cube_quat": 0.002},
                    "action_latency": [0, 1], "obs_latency": [0, 0], "camera_pos": 0.01, "camera_angle": 0.02},
        "visual": {"object_color": 0.1, "table_color": 0.1, "light": [0.7, 1.3]},
    },
    # what a camera policy must not depend on, and nothing else (distillation's rollouts, robot_rl.stages.distill):
    # the default preset's colours, light and camera pose jitter, with the physics and sensor noise left nominal
    "visual": {
        "sensing": {"camera_pos": 0.01, "camera_angle": 0.02},
        "visual": {"object_color": 0.1, "table_color": 0.1, "light": [0.7, 1.3]},
    },
}


def _fail(name: str, problem: str, p: Param | None = None) -> ConfigError:
    """``name`` is group.param[.key]; the fix shows the whole parameter (e.g. a noise dict), never a dotted key."""
    group, param = (name.split(".") + [""])[:2]
    fix = f"use e.g. randomization={{'{group}': {{'{param}': {p.example}}}}}" if p else \
        "see robot_rl.envs.randomization.PARAMS"
    return ConfigError(f"randomization.{name}", problem, fix)


def _number(name: str, v, p: Param) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise _fail(name, f"expected a finite number, got {v!r}", p)
    return float(v)


def _check_param(name: str, value, p: Param):
    """Validate one parameter; returns its normalised form (tuple (lo, hi), float, or {key: std})."""
    if p.kind == "noise":
        if not isinstance(value, dict):
            raise _fail(name, f"expected a dict {{obs_key: std}}, got {value!r}", p)
        out = {}
        for k, v in value.items():
            s = _number(f"{name}.{k}", v, p)
            if not p.low <= s <= p.high:
                raise _fail(f"{name}.{k}", f"std {s} is outside [{p.low}, {p.high}]", p)
            out[str(k)] = s
        return out
    if p.kind == "half":
        h = _number(name, value, p)
        if not p.low <= h <= p.high:
            raise _fail(name, f"half-range {h} is outside [{p.low}, {p.high}]", p)
        return h
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _fail(name, f"expected [lo, hi] or one number, got {list(value)!r}", p)
        lo, hi = (_number(name, v, p) for v in value)
    else:
        lo = hi = _number(name, value, p)
    if p.kind == "steps" and (lo != int(lo) or hi != int(hi)):
        raise _fail(name, f"latencies are whole control steps, got [{lo}, {hi}]", p)
    low_ok = lo > p.low if p.low_open else lo >= p.low
    if not (low_ok and lo <= hi <= p.high):
        rel = "<" if p.low_open else "<="
        raise _fail(name, f"[{lo:g}, {hi:g}] must satisfy {p.low:g} {rel} lo <= hi <= {p.high:g}", p)
    return (int(lo), int(hi)) if p.kind == "steps" else (lo, hi)


PER_KEY = ("sensing.obs_noise", "sensing.obs_bias")  # the parameters that are {obs_key: value} dicts


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"physics": {"object_mass": x}}`` or ``{"physics.object_mass": x}`` -> ``{"physics.object_mass": x}``
    (``obs_noise`` / ``obs_bias`` dicts stay whole, and ``sensing.obs_noise.<key>`` is accepted)."""
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise _fail(str(k), "keys must be strings")
        name = f"{prefix}{k}"
        if name.rsplit(".", 1)[0] in PER_KEY and name.count(".") == 2:
            out.setdefault(name.rsplit(".", 1)[0], {})[name.split(".", 2)[2]] = v
        elif isinstance(v, dict) and v and name not in PARAMS:
            out.update(_flatten(v, name + "."))
        elif isinstance(v, dict) and not v and name in GROUPS:
            continue
        elif name in PER_KEY and isinstance(v, dict):
            out.setdefault(name, {}).update(v)
        else:
            out[name] = v
    return out


def resolve(spec) -> dict:
    """Validate a randomization spec (None, preset name or dict) and return the normalised flat config
    ``{"physics.object_mass": (lo, hi), "sensing.obs_noise": {key: std}, ...}`` ({} = off).

    Raises:
        ConfigError: unknown preset, group or key, wrong type, or a value outside its allowed range; the field
            is ``randomization.<group>.<key>``.
    """
    if spec is None or spec is False:
        return {}
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise ConfigError("randomization", f"expected a preset name or a dict, got {type(spec).__name__}",
                          f"use one of {sorted(PRESETS)} or a dict such as "
                          "{'physics': {'object_mass': [0.7, 1.3]}}")
    spec = dict(spec)
    preset = spec.pop("preset", "none")
    if preset not in PRESETS:
        raise ConfigError("randomization.preset", f"unknown preset {preset!r}", f"use one of {sorted(PRESETS)}")
    merged = _flatten(copy.deepcopy(PRESETS[preset]))
    for name, v in _flatten(spec).items():
        if name in PER_KEY and isinstance(v, dict):
            merged[name] = {**merged.get(name, {}), **v}
        else:
            merged[name] = v
    out = {}
    for name, v in merged.items():
        group = name.split(".")[0]
        if group not in GROUPS:
            raise ConfigError(f"randomization.{group}", f"unknown randomization group {group!r}",
                              f"use one of {', '.join(GROUPS)} (e.g. 'physics.object_mass')")
        if name in GROUPS:
            first = next(k for k in PARAMS if k.startswith(name + ".")).split(".")[1]
            raise ConfigError(f"randomization.{name}", f"expected a dict of {name} parameters, got {v!r}",
                              f"write e.g. {{'{name}': {{'{first}': ...}}}}")
        if name not in PARAMS:
            keys = [k.split(".", 1)[1] for k in PARAMS if k.startswith(group + ".")]
            raise ConfigError(f"randomization.{name}", f"unknown {group} randomization key",
                              f"use one of {', '.join(keys)}")
        if v is None:  # an override may switch a preset parameter off
            continue
        out[name] = _check_param(name, v, PARAMS[name])
    for name in PER_KEY:
        if out.get(name) == {}:
            del out[name]
    return out


def as_nested(flat: dict) -> dict:
    """Flat resolved config -> nested plain-JSON dict (ranges as lists), e.g. for reports."""
    out: dict = {}
    for name, v in flat.items():
        g, k = name.split(".", 1)
        out.setdefault(g, {})[k] = list(v) if isinstance(v, tuple) else v
    return out


class Randomizer:
    """Per-env randomization state: samples episode parameters, applies them through the backend's setters, and
    models the sensing chain (noise, observation / action latency).

    Args:
        spec: see :func:`resolve`.
        scene: the env's scene (nominal camera poses, colours, objects).
        obs_keys: low-dimensional observation keys the env produces (``sensing.obs_noise`` / ``obs_bias`` must
            use them).
        derived_keys: keys computed from others (not noisy themselves; recomputed by ``derive``).
        derive: in-place recomputation of the derived keys of an observation dict (e.g. ``Task.derive``).
    """

    def __init__(self, spec, scene: SceneSpec, obs_keys=(), derived_keys=(), derive=None):
        self.config = resolve(spec)
        self.scene = scene
        self.active = bool(self.config)
        self.derive = derive
        allowed = [k for k in obs_keys if k not in derived_keys]
        for name in PER_KEY:
            for k in self.config.get(name, {}):
                if k not in allowed:
                    why = "is derived from other keys (randomize its inputs instead)" if k in derived_keys \
                        else "is not a low-dimensional observation key of this task"
                    raise ConfigError(f"randomization.{name}.{k}", f"{k!r} {why}", f"use one of {', '.join(allowed)}")
        self._noise = {k: s for k, s in self.config.get("sensing.obs_noise", {}).items() if s > 0}
        self._bias_half = {k: h for k, h in self.config.get("sensing.obs_bias", {}).items() if h > 0}
        self._bias: dict = {}  # this episode's offsets {key: array}
        self.sample_: dict = {}
        self._obs_buf: deque = deque(maxlen=1)
        self._act_buf: deque = deque()
        self._rng = np.random.default_rng(0)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _rng_for(self, seed: int, name: str) -> np.random.Generator:
        return np.random.default_rng([int(seed), zlib.crc32(name.encode())])

    def sample(self, seed: int) -> dict:
        """Episode parameters from an integer seed: nested dict of plain floats / ints / lists."""
        c, out = self.config, {}
        phys = {}
        for k in ("object_mass", "object_friction"):
            if f"physics.{k}" in c:
                phys[k] = float(self._rng_for(seed, f"physics.{k}").uniform(*c[f"physics.{k}"]))
        for k in ("joint_damping", "actuator_gain"):
            if f"physics.{k}" in c:
                n = len(self.scene.robot.arm_joints)
                phys[k] = [float(v) for v in self._rng_for(seed, f"physics.{k}").uniform(*c[f"physics.{k}"], n)]
        if phys:
            out["physics"] = phys
        sens = {}
        for k in ("action_latency", "obs_latency"):
            if f"sensing.{k}" in c:
                lo, hi = c[f"sensing.{k}"]
                sens[k] = int(self._rng_for(seed, f"sensing.{k}").integers(lo, hi + 1))
        if self._noise:
            sens["obs_noise"] = dict(self._noise)
        hp, ha = c.get("sensing.camera_pos"), c.get("sensing.camera_angle")
        if hp is not None or ha is not None:
            cams = {}
            for cam in self.scene.cameras:
                r = self._rng_for(seed, f"sensing.camera.{cam.name}")
                dp, dr = r.uniform(-1, 1, 3) * (hp or 0.0), r.uniform(-1, 1, 3) * (ha or 0.0)
                cams[cam.name] = {"dpos": [float(v) for v in dp], "drot": [float(v) for v in dr]}
            sens["cameras"] = cams
        if sens:
            out["sensing"] = sens
        vis = {}
        colors = {}
        if "visual.object_color" in c:
            for o in self.scene.objects:
                colors[o.name] = self._jitter(o.rgba, c["visual.object_color"], self._rng_for(seed, f"color.{o.name}"))
        if "visual.table_color" in c:
            colors["table"] = self._jitter(self.scene.table_rgba, c["visual.table_color"],
                                           self._rng_for(seed, "color.table"))
        if colors:
            vis["colors"] = colors
        if "visual.light" in c:
            vis["light"] = float(self._rng_for(seed, "visual.light").uniform(*c["visual.light"]))
        if vis:
            out["visual"] = vis
        return out

    @staticmethod
    def _jitter(rgba, half: float, rng: np.random.Generator) -> list[float]:
        rgb = np.clip(np.asarray(rgba[:3], float) + rng.uniform(-half, half, 3), 0.0, 1.0)
        return [float(v) for v in rgb] + [float(rgba[3])]

    # -- applying ----------------------------------------------------------------------------------------------
    def apply(self, backend, sample: dict) -> None:
        """Push a sample into the backend through its generic setters (absolute w.r.t. the nominal scene)."""
        if "physics" in sample:
            backend.set_physics(sample["physics"])
        for cam in self.scene.cameras:
            off = sample.get("sensing", {}).get("cameras", {}).get(cam.name)
            if off is not None:
                R = look_at_matrix(cam.pos, cam.lookat, cam.up) @ Rotation.from_rotvec(off["drot"]).as_matrix()
                backend.set_camera_pose(cam.name, np.asarray(cam.pos, float) + np.asarray(off["dpos"]), R)
        vis = sample.get("visual", {})
        if "colors" in vis:
            backend.set_colors(vis["colors"])
        if "light" in vis:
            backend.set_lighting(vis["light"])

    # -- sensing chain -----------------------------------------------------------------------------------------
    def start_episode(self, seed: int, sample: dict, obs: dict, hold_action: np.ndarray) -> dict:
        """Begin an episode: noise generator from ``seed``, latency buffers filled with the first (noisy)
        observation and with ``hold_action`` (what the robot executes before the first command arrives)."""
        self.sample_ = sample
        sens = sample.get("sensing", {})
        self._rng = self._rng_for(seed, "sensing.noise_stream")
        # the offsets take the keys' shapes, known from the first observation; the sample records them
        self._bias = {k: self._rng_for(seed, f"sensing.obs_bias.{k}").uniform(-h, h, obs[k].shape)
                      for k, h in self._bias_half.items()}
        if self._bias:
            sample.setdefault("sensing", {})["obs_bias"] = {k: [float(v) for v in b.ravel()]
                                                             for k, b in self._bias.items()}
        self._obs_buf = deque(maxlen=sens.get("obs_latency", 0) + 1)
        first = self._noisy(obs)
        for _ in range(self._obs_buf.maxlen):
            self._obs_buf.append(first)
        self._act_buf = deque([np.asarray(hold_action, np.float64)] * sens.get("action_latency", 0))
        return first

    def observe(self, obs: dict) -> dict:
        """Measured -> what the agent sees: noise now, then the observation from ``obs_latency`` steps ago."""
        self._obs_buf.append(self._noisy(obs))
        return self._obs_buf[0]

    def delay_action(self, action: np.ndarray) -> np.ndarray:
        """Commanded -> executed action (the one commanded ``action_latency`` steps ago)."""
        if not self._act_buf:
            return action
        self._act_buf.append(np.asarray(action, np.float64))
        return self._act_buf.popleft()

    def _noisy(self, obs: dict) -> dict:
        if not self._noise and not self._bias:
            return obs
        out = dict(obs)
        for k in dict.fromkeys([*self._bias, *self._noise]):
            v = obs[k].astype(np.float64) + self._bias.get(k, 0.0)
            if k in self._noise:
                v = v + self._rng.normal(0.0, self._noise[k], obs[k].shape)
            if k.endswith("_quat"):
                v /= np.linalg.norm(v)
            out[k] = v.astype(obs[k].dtype)
        if self.derive is not None:
            self.derive(out)
        return out

    def get_state(self) -> dict:
        return {"sample": copy.deepcopy(self.sample_), "obs_buf": list(self._obs_buf),
                "act_buf": [a.copy() for a in self._act_buf], "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def set_state(self, backend, state: dict) -> None:
        self.sample_ = copy.deepcopy(state["sample"])
        self._bias = {k: np.asarray(b, np.float64)  # low-dimensional keys are 1-D
                      for k, b in self.sample_.get("sensing", {}).get("obs_bias", {}).items()}
        self.apply(backend, self.sample_)
        self._obs_buf = deque(state["obs_buf"], maxlen=len(state["obs_buf"]))
        self._act_buf = deque(a.copy() for a in state["act_buf"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
