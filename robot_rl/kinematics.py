"""Serial-chain kinematics read from a URDF: forward kinematics and the geometric Jacobian.

This is the robot model shared by every backend (MuJoCo, PyBullet) and by the real-arm bridge, so the
controller never asks a simulator for kinematics. Only revolute, continuous, prismatic and fixed joints on the
path from ``base_link`` to ``tip_link`` are used; everything else in the URDF is ignored.

Frames: all poses are expressed in the ``base_link`` frame. Units: metres and radians. Quaternions are xyzw.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from robot_rl.errors import ConfigError


@dataclass(frozen=True)
class JointSpec:
    """One URDF joint on the chain. ``origin`` is the 4x4 parent->joint transform at q=0."""

    name: str
    type: str  # revolute | continuous | prismatic | fixed
    origin: np.ndarray
    axis: np.ndarray
    lower: float
    upper: float
    velocity: float


def _origin(el: ET.Element | None) -> np.ndarray:
    T = np.eye(4)
    if el is None:
        return T
    xyz = [float(v) for v in el.get("xyz", "0 0 0").split()]
    rpy = [float(v) for v in el.get("rpy", "0 0 0").split()]
    T[:3, :3] = Rotation.from_euler("xyz", rpy).as_matrix()  # URDF rpy = fixed-axis roll, pitch, yaw
    T[:3, 3] = xyz
    return T


class KinematicChain:
    """FK and Jacobian of the chain ``base_link`` -> ``tip_link`` of a URDF.

    Args:
        urdf: path to the URDF file (or its XML text if it starts with ``<``).
        base_link, tip_link: link names bounding the chain.

    Raises:
        ConfigError: the file is missing or the links are not connected.
    """

    def __init__(self, urdf: str | Path, base_link: str, tip_link: str):
        text = str(urdf)
        if not text.lstrip().startswith("<"):
            if not Path(text).is_file():
                raise ConfigError("urdf", f"file {text} not found", "pass the path of an existing URDF file")
            text = Path(text).read_text()
        root = ET.fromstring(text)
        by_child = {j.find("child").get("link"): j for j in root.findall("joint")}
        chain: list[JointSpec] = []
        link = tip_link
        while link != base_link:
            if link not in by_child:
                raise ConfigError("tip_link", f"no joint path from {base_link!r} to {tip_link!r}", "check link names in the URDF")
            j = by_child[link]
            lim = j.find("limit")
            axis = j.find("axis")
            chain.append(JointSpec(
                name=j.get("name"), type=j.get("type"), origin=_origin(j.find("origin")),
                axis=np.array([float(v) for v in (axis.get("xyz") if axis is not None else "1 0 0").split()]),
                lower=float(lim.get("lower", -np.inf)) if lim is not None else -np.inf,
                upper=float(lim.get("upper", np.inf)) if lim is not None else np.inf,
                velocity=float(lim.get("velocity", np.inf)) if lim is not None else np.inf,
            ))
            link = j.find("parent").get("link")
        self.joints = chain[::-1]
        self.active = [j for j in self.joints if j.type != "fixed"]
        self.joint_names = [j.name for j in self.active]
        self.lower = np.array([j.lower for j in self.active])
        self.upper = np.array([j.upper for j in self.active])
        self.velocity_limit = np.array([j.velocity for j in self.active])
        self.n = len(self.active)
        self._prismatic = np.array([j.type == "prismatic" for j in self.active])
        self._steps, self._qidx, i = [], {}, 0
        for s_, j in enumerate(self.joints):
            k = None if j.type == "fixed" else j.axis / np.linalg.norm(j.axis)
            K = None if k is None else np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
            self._steps.append((j.origin[:3, :3].copy(), j.origin[:3, 3].copy(), k, K,
                                None if K is None else K @ K, j.type == "prismatic"))
            if k is not None:
                self._qidx[s_] = i
                i += 1

    def fk_all(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tip transform plus each active joint's world axis and origin.

        Args:
            q: (n,) joint positions [rad or m].
        Returns:
            T_tip (4,4), axes (n,3), origins (n,3) in the base frame.
        """
        R, p = np.eye(3), np.zeros(3)
        axes, origins = np.empty((self.n, 3)), np.empty((self.n, 3))
        for i, (Ro, po, k, K, KK, prismatic) in enumerate(self._steps):
            p = p + R @ po
            R = R @ Ro
            if k is None:  # fixed joint: only its origin
                continue
            qi = q[self._qidx[i]]
            axes[self._qidx[i]] = R @ k
            origins[self._qidx[i]] = p
            if prismatic:
                p = p + R @ (k * qi)
            else:  # Rodrigues: exp(qi [k]x) = I + sin(qi) K + (1 - cos(qi)) K^2
                R = R @ (np.eye(3) + np.sin(qi) * K + (1.0 - np.cos(qi)) * KK)
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, p
        return T, axes, origins

    def fk(self, q: np.ndarray) -> np.ndarray:
        """Tip pose as a 4x4 homogeneous transform in the base frame."""
        return self.fk_all(q)[0]

    def pose(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tip position (3,) [m] and orientation quaternion xyzw (4,)."""
        T = self.fk(q)
        return T[:3, 3].copy(), Rotation.from_matrix(T[:3, :3]).as_quat()

    def jacobian(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Geometric Jacobian (6, n): rows 0-2 linear velocity, 3-5 angular velocity of the tip, base frame.

        Returns (T_tip, J).
        """
        T, axes, origins = self.fk_all(q)
        J = np.empty((6, self.n))
        J[:3] = np.where(self._prismatic[:, None], axes, np.cross(axes, T[:3, 3] - origins)).T
        J[3:] = np.where(self._prismatic[:, None], 0.0, axes).T
        return T, J
