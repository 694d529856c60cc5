"""Published joint limits of the robots we know, to be combined with a robot's URDF (the tighter limit wins).

A URDF's ``<limit>`` values are whatever its author wrote: pybullet_data's ``panda.urdf`` allows joint 2 +-1.8326 rad
where the arm's controller aborts a motion beyond +-1.7628 rad, and has no acceleration limits at all. A
:class:`Profile` holds the manufacturer's published limits per joint name; :meth:`JointLimits.tighten
<robot_rl.robot.safety.JointLimits.tighten>` takes, per joint, the larger lower bound, the smaller upper bound and the
smaller velocity limit of the two, and adds the profile's acceleration limits.

Sources (units: rad, rad/s, rad/s^2, rad/s^3; fingers m, m/s):

- ``panda`` (Franka Emika Robot "FER" / Panda, joint names ``panda_joint1..7``): Franka Robotics, FCI documentation,
  "Robot and interface specifications", table "Limits for Panda" (frankaemika.github.io/docs/control_parameters.html;
  now "Limits for Franka Emika Robot (FER)" in frankarobotics.github.io/docs/robot_specifications.html): q_max,
  q_min, dq_max, ddq_max and dddq_max in joint space. The same constants are in libfranka-based bindings (e.g. the
  franka_rust crate's ``franka_emika.rs``), which we cross-checked.
- ``fr3`` (Franka Research 3, ``fr3_joint1..7``): the same FCI page, table "Limits for Franka Research 3" (the FR3
  datasheet's joint ranges and speeds): q_max, q_min, dq_max, ddq_max = 10 and dddq_max = 5000 for every joint.
  Cross-checked against franka_rust's ``franka_fr3.rs`` (its non-"conservative" constants).
- Fingers (``<arm>_finger_joint1/2``, the Franka Hand on both arms): 0 .. 0.04 m per finger (80 mm total stroke) and
  0.2 m/s, as franka_description's hand URDF writes them (the FCI tables do not list the hand). No acceleration
  limit is published for them (inf).

The FCI tables are *necessary conditions* of the robot's 1 kHz interface: a command outside them aborts the motion.
Keep a margin (:class:`~robot_rl.robot.safety.SafetyConfig` ``joint_margin``, ``velocity_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robot_rl.errors import ConfigError


@dataclass(frozen=True)
class JointProfile:
    """Published limits of one joint: position ``lower``/``upper`` [rad or m], ``velocity`` [rad/s or m/s],
    ``acceleration`` [rad/s^2 or m/s^2] and ``jerk`` [rad/s^3 or m/s^3] (inf = not published)."""

    name: str
    lower: float
    upper: float
    velocity: float
    acceleration: float = np.inf
    jerk: float = np.inf


@dataclass(frozen=True)
class Profile:
    """A robot's published limits: ``joints`` (arm joints in chain order, then gripper joints) and where the
    numbers come from (``source``)."""

    name: str
    joints: tuple
    source: str

    @property
    def joint_names(self) -> tuple:
        return tuple(j.name for j in self.joints)

    def get(self, name: str) -> JointProfile | None:
        """The limits of joint ``name``, or None when the profile does not cover it."""
        for j in self.joints:
            if j.name == name:
                return j
        return None

    def covers(self, names) -> bool:
        """True when every joint in ``names`` (non-empty) is in this profile."""
        names = list(names)
        return bool(names) and all(self.get(n) is not None for n in names)


def _franka(name: str, prefix: str, q_min, q_max, dq_max, ddq_max, dddq_max, source: str) -> Profile:
    arm = tuple(JointProfile(f"{prefix}_joint{i + 1}", lo, hi, v, a, j)
                for i, (lo, hi, v, a, j) in enumerate(zip(q_min, q_max, dq_max, ddq_max, dddq_max)))
    fingers = tuple(JointProfile(f"{prefix}_finger_joint{i}", 0.0, 0.04, 0.2) for i in (1, 2))
    return Profile(name, arm + fingers, source)


PANDA = _franka(
    "panda", "panda",
    q_min=(-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973),
    q_max=(2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973),
    dq_max=(2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61),
    ddq_max=(15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0),
    dddq_max=(7500.0, 3750.0, 5000.0, 6250.0, 7500.0, 10000.0, 10000.0),
    source="Franka Robotics FCI docs, 'Robot and interface specifications', Limits for Panda (FER); fingers: "
           "franka_description hand URDF")
FR3 = _franka(
    "fr3", "fr3",
    q_min=(-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159),
    q_max=(2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159),
    dq_max=(2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26),
    ddq_max=(10.0,) * 7,
    dddq_max=(5000.0,) * 7,
    source="Franka Robotics FCI docs, 'Robot and interface specifications', Limits for Franka Research 3 (FR3 "
           "datasheet); fingers: franka_description hand URDF")

#: profile name -> Profile
PROFILES = {"panda": PANDA, "fr3": FR3}


def profile_for(joint_names) -> Profile | None:
    """The profile that covers every name in ``joint_names`` (e.g. ``fr3_joint1..7``), or None (unknown robot)."""
    for p in PROFILES.values():
        if p.covers(joint_names):
            return p
    return None


def select_profile(choice: str, joint_names) -> Profile | None:
    """The profile for a ``robot_profile`` setting: ``auto`` (:func:`profile_for` the joint names; None when no
    profile matches), ``none`` (None), or a name in :data:`PROFILES`.

    Raises:
        ConfigError: an unknown name, or a named profile that does not cover ``joint_names``.
    """
    choice = str(choice).strip().lower()
    if choice == "auto":
        return profile_for(joint_names)
    if choice == "none":
        return None
    if choice not in PROFILES:
        raise ConfigError("robot_profile", f"unknown profile {choice!r}",
                          f"use auto, none or one of {sorted(PROFILES)}")
    p = PROFILES[choice]
    missing = [n for n in joint_names if p.get(n) is None]
    if missing:
        raise ConfigError("robot_profile", f"profile {choice!r} has no joints {missing}",
                          f"it covers {list(p.joint_names)}; use the profile of this robot (robot_profile:=auto "
                          "picks it by joint names) or robot_profile:=none (URDF limits only)")
    return p
