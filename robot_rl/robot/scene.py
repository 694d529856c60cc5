"""Backend-neutral description of the robot and the tabletop scene.

Every backend builds its world from these specs, so MuJoCo and PyBullet load the same robot description
(the Franka Panda URDF shipped in ``pybullet_data``), the same table, objects, markers and cameras.
Frames: the world frame is the robot base frame; the table top is the plane z = 0. Units: SI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np


def panda_dir() -> str:
    """Directory of the Franka Panda URDF + meshes inside the installed ``pybullet_data`` package."""
    import pybullet_data

    return os.path.join(pybullet_data.getDataPath(), "franka_panda")


def panda_urdf_path() -> str:
    return os.path.join(panda_dir(), "panda.urdf")


def resolved_urdf_text(urdf_path: str) -> str:
    """URDF text with ``package://`` mesh paths rewritten to absolute paths (against the URDF's directory)."""
    base = os.path.dirname(os.path.abspath(urdf_path))
    with open(urdf_path) as f:
        return f.read().replace("package://", base + "/")


def proxy_visual_urdf(urdf_path: str, links: tuple) -> str:
    """Path of a derived URDF whose ``links`` draw their collision mesh as their visual mesh.

    Used by renderers whose cost is per triangle (PyBullet's TinyRenderer). Mesh paths are made absolute; the file
    is written once per (URDF, links) under the temp directory (atomic rename, safe across processes) and reused.

    Raises:
        ConfigError: a link in ``links`` is not in the URDF or has no collision mesh.
    """
    import xml.etree.ElementTree as ET

    from robot_rl.errors import ConfigError

    root = ET.fromstring(resolved_urdf_text(urdf_path))
    by_name = {ln.get("name"): ln for ln in root.iter("link")}
    for name in links:
        link = by_name.get(name)
        col = None if link is None else link.find("collision/geometry/mesh")
        if col is None:
            raise ConfigError("robot.proxy_visual_links", f"link {name!r} has no collision mesh in {urdf_path}",
                              "list links of the URDF that have a <collision> mesh")
        for vis in link.findall("visual/geometry/mesh"):
            vis.set("filename", col.get("filename"))
            vis.attrib.pop("scale", None)
            if col.get("scale") is not None:
                vis.set("scale", col.get("scale"))
    text = ET.tostring(root, encoding="unicode")
    return cached_file(os.path.splitext(os.path.basename(urdf_path))[0], ".urdf", os.path.abspath(urdf_path), text)


def cached_file(stem: str, suffix: str, source: str, text: str) -> str:
    """Path of ``text`` written once under ``<tempdir>/robot_rl_urdf/<stem>_<hash of source and text><suffix>``
    (atomic rename, safe across processes) and reused: the derived URDFs and meshes the backends load."""
    import hashlib
    import tempfile

    key = hashlib.sha1((source + "|" + text).encode()).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), "robot_rl_urdf")
    path = os.path.join(out_dir, f"{stem}_{key}{suffix}")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class RobotSpec:
    """Arm description: URDF plus the names the controller and backends need."""

    urdf: str = field(default_factory=panda_urdf_path)
    base_link: str = "panda_link0"
    tip_link: str = "panda_grasptarget"  # tool centre point between the fingertips
    arm_joints: tuple = tuple(f"panda_joint{i}" for i in range(1, 8))
    finger_joints: tuple = ("panda_finger_joint1", "panda_finger_joint2")
    hand_link: str = "panda_hand"
    # posture with the tool 0.5 m in front of the base, ~0.25 m above the table, pointing down, yaw 0
    q_home: tuple = (0.0, 0.15, 0.0, -2.2, 0.0, 2.35, 0.785398)
    kp: tuple = (4500.0, 4500.0, 3500.0, 3500.0, 2000.0, 2000.0, 2000.0)
    kv: tuple = (450.0, 450.0, 350.0, 350.0, 200.0, 200.0, 200.0)
    max_width: float = 0.08
    finger_force: float = 20.0  # N, URDF effort limit of the finger joints
    # servo and joint parameters every simulator backend uses (MuJoCo and PyBullet read them from here)
    tau_max: tuple = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)  # N m, arm servo torque limits (URDF efforts)
    joint_damping: float = 1.0  # N m s/rad, passive damping of every arm joint
    armature: float = 0.1  # kg m^2, reflected rotor inertia of every arm joint
    finger_kp: float = 1000.0  # N/m, gripper servo on the opening of one finger (both fingers coupled)
    finger_kv: float = 20.0  # N s/m
    finger_damping: float = 5.0  # N s/m, passive, per finger joint
    finger_armature: float = 0.01  # kg, per finger joint
    finger_friction: float = 1.5  # sliding friction coefficient of the finger pads
    # links both backends draw with their collision mesh: TinyRenderer's (and software GL's) cost is per triangle,
    # and these flat-coloured links hold most of the visual meshes' triangles (docs/MEASUREMENTS.md); hand and
    # fingers, the parts the cameras look at, keep their visual meshes. Both backends draw the same meshes, so a
    # camera policy sees one robot in either.
    proxy_visual_links: tuple = tuple(f"panda_link{i}" for i in range(1, 7))


@dataclass(frozen=True)
class ObjectSpec:
    """A free rigid box. ``half_size`` (3,) [m], ``mass`` [kg], ``friction`` sliding coefficient."""

    name: str
    half_size: tuple = (0.02, 0.02, 0.02)
    mass: float = 0.05
    friction: float = 1.0
    rgba: tuple = (0.85, 0.2, 0.2, 1.0)


@dataclass(frozen=True)
class MarkerSpec:
    """A visual-only disk lying on the table (no collision), e.g. a placement target. ``radius`` [m]."""

    name: str
    radius: float = 0.01
    rgba: tuple = (0.1, 0.8, 0.2, 1.0)  # opaque: PyBullet's TinyRenderer does not blend alpha, MuJoCo does


@dataclass(frozen=True)
class LightSpec:
    """The scene's one directional light, drawn alike by both renderers (no shadows in either).

    The shading model is PyBullet TinyRenderer's (``getCameraImage``'s light arguments): a surface of colour c with
    unit normal n gets c * (ambient + diffuse * max(n . toward, 0)) plus a small specular term, where ``toward``
    [world frame] points from the scene to the light and is used as given (not normalised). MuJoCo draws the same
    with its headlight as the ambient term, one directional light along -toward with diffuse
    ``diffuse * |toward|``, and no specular term (its specular is view-dependent). With this light the two
    backends' camera images differ by a few intensity levels per pixel (``tests/test_pybullet.py``).
    """

    toward: tuple = (0.3, 0.2, 1.0)
    ambient: float = 0.5
    diffuse: float = 0.5
    specular: float = 0.05


@dataclass(frozen=True)
class CameraSpec:
    """A pinhole camera. ``fovy`` vertical field of view [deg]. If ``parent`` is a link name the pose is in
    that link's frame (wrist camera); otherwise ``pos``/``lookat`` are in the world frame."""

    name: str
    pos: tuple = (1.05, 0.0, 0.5)
    lookat: tuple = (0.5, 0.0, 0.0)
    up: tuple = (0.0, 0.0, 1.0)
    fovy: float = 45.0
    parent: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    robot: RobotSpec = field(default_factory=RobotSpec)
    objects: tuple = ()
    markers: tuple = ()
    cameras: tuple = (CameraSpec("front"), CameraSpec("wrist", pos=(0.06, 0.0, 0.0), lookat=(0.0, 0.0, 0.2),
                                                       up=(1.0, 0.0, 0.0), fovy=75.0, parent="panda_hand"))
    table_half_size: tuple = (0.55, 0.6, 0.02)
    table_center_xy: tuple = (0.35, 0.0)
    table_rgba: tuple = (0.62, 0.5, 0.38, 1.0)
    light: LightSpec = field(default_factory=LightSpec)
    background_rgb: tuple = (1.0, 1.0, 1.0)  # what a camera sees beyond the table (PyBullet's clear colour)
    physics_dt: float = 0.002  # s
    control_dt: float = 0.1  # s (10 Hz)

    @property
    def n_substeps(self) -> int:
        return max(1, int(round(self.control_dt / self.physics_dt)))


def look_at_matrix(pos, lookat, up) -> np.ndarray:
    """Camera rotation (3,3) in the OpenGL convention: columns = camera x (right), y (up), z (backward)."""
    pos, lookat, up = (np.asarray(v, dtype=np.float64) for v in (pos, lookat, up))
    z = pos - lookat
    z /= np.linalg.norm(z)
    x = np.cross(up, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)
