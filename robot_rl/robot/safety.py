"""Command safety shared by every path to a real (or simulated) arm: the ROS 2 arm bridge, the sim robot node and
any other driver. Pure numpy; no ROS import.

Layers, applied in this order by :meth:`SafetyFilter.filter` to one joint-position command ``q_cmd`` given the
reference ``q_ref`` it moves from (the previous safe command, or the measured posture after a hold):

1. **finite** — a command with NaN/inf anywhere is rejected outright: the output is ``q_ref`` (hold).
2. **joint position limits** — clipped to ``[lower + margin, upper - margin]`` (limits parsed from the URDF, and
   with :meth:`JointLimits.tighten` the tighter of those and the robot's published profile,
   :mod:`robot_rl.robot.profiles`).
3. **per-step delta / velocity** — ``|q - q_ref| <= min(max_joint_delta, velocity_scale * v_max * dt)`` per joint
   (``v_max`` from the URDF ``<limit velocity=...>``, ``dt`` = time the command is given to complete).
4. **end-effector workspace box** — the tool position ``FK(q)`` must lie in ``[workspace_low, workspace_high]``
   (robot base frame). Otherwise the command is shortened along the segment ``q_ref -> q`` to the largest fraction
   that stays inside (bisection); when ``q_ref`` itself is outside (e.g. the arm was moved by hand), only a command
   that does not increase the distance to the box is accepted, else the output is ``q_ref``.

Because each output is a convex combination of ``q_ref`` and a clipped target, and 2-4 only ever shrink the step,
a sequence of filtered commands starting inside the limits never leaves them (tested with 10 000 random commands).

Also here: :class:`Watchdog` (command timeout -> hold) and :class:`EStopLatch` (latched emergency stop that only an
explicit clear releases). Units: radians, metres, seconds.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robot_rl.errors import ConfigError


@dataclass(frozen=True)
class JointLimits:
    """Position limits [rad or m], velocity limits [rad/s or m/s] and acceleration limits [rad/s^2 or m/s^2;
    inf = unknown, the default] of named joints, in that order; each array has shape (len(names),)."""

    names: tuple
    lower: np.ndarray
    upper: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray | None = None

    def __post_init__(self):
        if self.acceleration is None:
            object.__setattr__(self, "acceleration", np.full(len(self.names), np.inf))

    def tighten(self, profile) -> "JointLimits":
        """The tighter of these limits and a published :class:`~robot_rl.robot.profiles.Profile` (None: unchanged).

        Per joint the profile covers: max of the lower bounds, min of the upper bounds, min of the velocity and of
        the acceleration limits; joints the profile lacks keep their limits. Raises ConfigError when a joint's two
        position ranges do not overlap (the URDF and the profile describe different robots).
        """
        if profile is None:
            return self
        lo, hi = self.lower.astype(float), self.upper.astype(float)
        vel, acc = self.velocity.astype(float), self.acceleration.astype(float)
        for i, n in enumerate(self.names):
            p = profile.get(n)
            if p is None:
                continue
            lo[i], hi[i] = max(lo[i], p.lower), min(hi[i], p.upper)
            vel[i], acc[i] = min(vel[i], p.velocity), min(acc[i], p.acceleration)
            if lo[i] > hi[i]:
                raise ConfigError("robot_profile", f"joint {n!r}: URDF range [{self.lower[i]}, {self.upper[i]}] "
                                                   f"and profile {profile.name!r} [{p.lower}, {p.upper}] do not "
                                                   "overlap", "check the URDF, or set robot_profile:=none")
        return JointLimits(tuple(self.names), lo, hi, vel, acc)

    @classmethod
    def from_urdf(cls, urdf: str | Path, joint_names) -> "JointLimits":
        """Read ``<limit lower upper velocity>`` of ``joint_names`` from a URDF file (or XML text).

        Continuous joints get +-inf position limits. Raises ConfigError naming a joint that is missing or has
        no finite velocity limit.
        """
        text = str(urdf)
        if not text.lstrip().startswith("<"):
            if not Path(text).is_file():
                raise ConfigError("urdf", f"file {text} not found", "pass the path of the robot's URDF")
            text = Path(text).read_text()
        joints = {j.get("name"): j for j in ET.fromstring(text).findall("joint")}
        lo, hi, vel = [], [], []
        for n in joint_names:
            if n not in joints:
                raise ConfigError("joint_names", f"joint {n!r} is not in the URDF",
                                  f"use joints of the URDF, e.g. {sorted(joints)[:4]}")
            j, lim = joints[n], joints[n].find("limit")
            if j.get("type") == "continuous":
                lo.append(-np.inf)
                hi.append(np.inf)
            else:
                if lim is None or lim.get("lower") is None or lim.get("upper") is None:
                    raise ConfigError("joint_names", f"joint {n!r} has no position limits in the URDF",
                                      "add <limit lower=... upper=...> to that joint in the URDF (or construct "
                                      "JointLimits(names, lower, upper, velocity) yourself)")
                lo.append(float(lim.get("lower")))
                hi.append(float(lim.get("upper")))
            v = float(lim.get("velocity", "inf")) if lim is not None else np.inf
            if not np.isfinite(v) or v <= 0:
                raise ConfigError("joint_names", f"joint {n!r} has no positive velocity limit in the URDF",
                                  "add <limit velocity=...> to the URDF")
            vel.append(v)
        return cls(tuple(joint_names), np.array(lo), np.array(hi), np.array(vel))


@dataclass
class SafetyConfig:
    """Safety parameters (SI units, robot base frame).

    joint_margin: distance kept from every URDF position limit. velocity_scale: fraction of the URDF velocity
    limits allowed. max_joint_delta: absolute cap per command. workspace_low/high: tool-position box (a little
    larger than the controller's own workspace clip, so normal commands never touch it). command_timeout: watchdog
    period after which a silent command source makes the arm hold.
    """

    joint_margin: float = 0.01
    velocity_scale: float = 1.0
    max_joint_delta: float = 0.25
    workspace_low: tuple = (0.2, -0.45, 0.0)
    workspace_high: tuple = (0.8, 0.45, 0.55)
    command_timeout: float = 0.25
    bisection_iters: int = 12

    def validate(self) -> "SafetyConfig":
        lo, hi = np.asarray(self.workspace_low, float), np.asarray(self.workspace_high, float)
        if lo.shape != (3,) or hi.shape != (3,) or not np.all(lo < hi):
            raise ConfigError("workspace_low", f"box {self.workspace_low}..{self.workspace_high} is empty or not 3-D",
                              "give 3 values each with low < high")
        if not 0 < self.velocity_scale <= 1:
            raise ConfigError("velocity_scale", f"{self.velocity_scale} not in (0, 1]", "use e.g. 0.5")
        if not self.max_joint_delta > 0:
            raise ConfigError("max_joint_delta", f"{self.max_joint_delta} <= 0", "use e.g. 0.25 rad")
        if not self.joint_margin >= 0:
            raise ConfigError("joint_margin", f"{self.joint_margin} < 0", "use e.g. 0.01 rad")
        if not self.command_timeout > 0:
            raise ConfigError("command_timeout", f"{self.command_timeout} <= 0", "use e.g. 0.25 s")
        return self


@dataclass
class SafetyReport:
    """What the filter changed: ``rejected`` (non-finite -> hold), ``clipped_position``, ``clipped_delta``,
    ``clipped_workspace`` flags, and ``scale`` (fraction of the requested step kept by the workspace check)."""

    rejected: bool = False
    clipped_position: bool = False
    clipped_delta: bool = False
    clipped_workspace: bool = False
    scale: float = 1.0

    @property
    def modified(self) -> bool:
        return self.rejected or self.clipped_position or self.clipped_delta or self.clipped_workspace


class SafetyFilter:
    """Filters joint-position commands (see module docstring).

    Args:
        limits: :class:`JointLimits` of the commanded joints.
        fk: callable q -> tool position (3,) [m] in the base frame (e.g. ``KinematicChain.pose(q)[0]``); None
            disables the workspace check.
        config: :class:`SafetyConfig`.
    """

    def __init__(self, limits: JointLimits, fk=None, config: SafetyConfig | None = None):
        self.limits, self.fk = limits, fk
        self.cfg = (config or SafetyConfig()).validate()
        m = self.cfg.joint_margin
        self.lo = limits.lower + m
        self.hi = limits.upper - m
        if np.any(self.lo > self.hi):
            raise ConfigError("joint_margin", f"{m} leaves no room inside the joint limits", "use a smaller margin")
        self.box_lo = np.asarray(self.cfg.workspace_low, float)
        self.box_hi = np.asarray(self.cfg.workspace_high, float)
        self.stats = {"commands": 0, "rejected": 0, "clipped_position": 0, "clipped_delta": 0, "clipped_workspace": 0}

    def max_step(self, dt: float) -> np.ndarray:
        """Largest allowed |delta q| per joint for a command given ``dt`` seconds."""
        return np.minimum(self.cfg.max_joint_delta, self.cfg.velocity_scale * self.limits.velocity * max(dt, 0.0))

    def box_distance(self, q: np.ndarray) -> float:
        """Euclidean distance [m] of FK(q) from the workspace box (0 inside; 0 when no FK is given)."""
        if self.fk is None:
            return 0.0
        p = np.asarray(self.fk(q), float)
        return float(np.linalg.norm(np.maximum(self.box_lo - p, 0) + np.maximum(p - self.box_hi, 0)))

    def filter(self, q_cmd, q_ref, dt: float) -> tuple[np.ndarray, SafetyReport]:
        """Safe command (n,) for ``q_cmd`` moving from ``q_ref`` in ``dt`` seconds, and what was changed."""
        rep = SafetyReport()
        self.stats["commands"] += 1
        q_ref = np.asarray(q_ref, dtype=np.float64).reshape(-1)
        q = np.asarray(q_cmd, dtype=np.float64).reshape(-1)
        n = len(self.limits.names)
        if q_ref.shape != (n,) or not np.all(np.isfinite(q_ref)):
            raise ConfigError("q_ref", f"reference must be {n} finite joint positions, got {q_ref}",
                              "pass the measured joint positions")
        if q.shape != (n,) or not np.all(np.isfinite(q)):
            rep.rejected = True
            self.stats["rejected"] += 1
            return q_ref.copy(), rep
        q1 = np.clip(q, self.lo, self.hi)
        rep.clipped_position = bool(np.any(q1 != q))
        d = self.max_step(dt)
        step = np.clip(q1 - q_ref, -d, d)
        rep.clipped_delta = bool(np.any(step != q1 - q_ref))
        q2 = q_ref + step
        if self.fk is not None:
            d_ref = self.box_distance(q_ref)
            d_new = self.box_distance(q2)
            if d_ref == 0.0 and d_new > 0.0:  # leaving the box: keep the largest fraction that stays inside
                lo_t, hi_t = 0.0, 1.0
                for _ in range(self.cfg.bisection_iters):
                    mid = 0.5 * (lo_t + hi_t)
                    if self.box_distance(q_ref + mid * step) == 0.0:
                        lo_t = mid
                    else:
                        hi_t = mid
                rep.scale, q2, rep.clipped_workspace = lo_t, q_ref + lo_t * step, True
            elif d_ref > 0.0 and d_new > d_ref:  # already outside: never move further away
                rep.scale, q2, rep.clipped_workspace = 0.0, q_ref.copy(), True
        for k in ("clipped_position", "clipped_delta", "clipped_workspace"):
            self.stats[k] += int(getattr(rep, k))
        return q2, rep


class Watchdog:
    """Command timeout: :meth:`expired` is True when nothing :meth:`kick`-ed it for ``timeout`` seconds (or ever).
    Times are caller-supplied seconds (wall or ROS time, consistently)."""

    def __init__(self, timeout: float):
        if not timeout > 0:
            raise ConfigError("command_timeout", f"{timeout} <= 0", "use e.g. 0.25 s")
        self.timeout = float(timeout)
        self.last: float | None = None

    def kick(self, now: float) -> None:
        self.last = float(now)

    def reset(self) -> None:
        self.last = None

    def age(self, now: float) -> float:
        return np.inf if self.last is None else float(now) - self.last

    def expired(self, now: float) -> bool:
        return self.age(now) > self.timeout


@dataclass
class EStopLatch:
    """Latched emergency stop: once triggered it stays active until :meth:`clear` (an explicit operator action).
    ``history`` keeps (reason) of every trigger."""

    active: bool = False
    reason: str = ""
    history: list = field(default_factory=list)

    def trigger(self, reason: str = "e-stop") -> None:
        self.active, self.reason = True, reason
        self.history.append(reason)

    def clear(self) -> bool:
        """Release the latch; returns whether it was active."""
        was, self.active, self.reason = self.active, False, ""
        return was
