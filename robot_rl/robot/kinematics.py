"""Serial-chain kinematics read from a URDF: forward kinematics and the geometric Jacobian.

This is the robot model shared by every backend (MuJoCo, PyBullet) and by the real-arm bridge, so the
controller never asks a simulator for kinematics. Only revolute, continuous, prismatic and fixed joints on the
path from ``base_link`` to ``tip_link`` are used; everything else in the URDF is ignored.

The chain is parsed from the URDF here, then compiled into a kinematic-only MuJoCo model (bodies, joints, a tip
site; no geometry, no physics) so forward kinematics (``mj_kinematics``) and the geometric Jacobian
(``mj_jacSite``) run in MuJoCo's C code (cost against numpy: docs/MEASUREMENTS.md). That model is independent of the simulated scene, so the PyBullet backend and the real-arm bridge use it too.

Frames: all poses are expressed in the ``base_link`` frame. Units: metres and radians. Quaternions are xyzw.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import mujoco
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


def _num(v) -> str:
    return " ".join(f"{float(x):.17g}" for x in v)


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
        self._model = mujoco.MjModel.from_xml_string(self._mjcf())
        self._data = mujoco.MjData(self._model)
        self._quat = np.zeros(4)

    def _mjcf(self) -> str:
        """The chain as a kinematic-only MJCF: nested bodies (fixed joints welded), unit inertias, a tip site."""
        body = '<site name="tip"/>'
        for j in reversed(self.joints):
            quat = np.zeros(4)
            mujoco.mju_mat2Quat(quat, j.origin[:3, :3].flatten())
            joint = "" if j.type == "fixed" else (
                f'<joint name="{j.name}" type="{"slide" if j.type == "prismatic" else "hinge"}" '
                f'axis="{_num(j.axis)}"/>')
            body = (f'<body pos="{_num(j.origin[:3, 3])}" quat="{_num(quat)}">'
                    f'<inertial pos="0 0 0" mass="1" diaginertia="1 1 1"/>{joint}{body}'
                    f'</body>')
        return f'<mujoco><compiler angle="radian"/><worldbody>{body}</worldbody></mujoco>'

    def _forward(self, q: np.ndarray) -> None:
        self._data.qpos[:] = q
        mujoco.mj_kinematics(self._model, self._data)

    def fk(self, q: np.ndarray) -> np.ndarray:
        """Tip pose as a 4x4 homogeneous transform in the base frame.

        Args:
            q: (n,) joint positions [rad or m], in ``joint_names`` order.
        """
        self._forward(q)
        T = np.eye(4)
        T[:3, :3] = self._data.site_xmat[0].reshape(3, 3)
        T[:3, 3] = self._data.site_xpos[0]
        return T

    def pose(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tip position (3,) [m] and orientation quaternion xyzw (4,)."""
        T = self.fk(q)
        mujoco.mju_mat2Quat(self._quat, self._data.site_xmat[0])
        return T[:3, 3].copy(), self._quat[[1, 2, 3, 0]].copy()

    def jacobian(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Geometric Jacobian (6, n): rows 0-2 linear velocity, 3-5 angular velocity of the tip, base frame.

        Returns (T_tip, J).
        """
        T = self.fk(q)
        mujoco.mj_comPos(self._model, self._data)  # mj_jac reads cdof / subtree_com
        J = np.empty((6, self.n))
        mujoco.mj_jacSite(self._model, self._data, J[:3], J[3:], 0)
        return T, J
