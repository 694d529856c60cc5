"""MuJoCo backend: builds the scene with ``mujoco.MjSpec`` from the Panda URDF shipped in ``pybullet_data``.

The URDF's ``package://`` mesh paths are rewritten to absolute paths; visual meshes are kept for rendering, each
multi-object OBJ flattened into one object first (:func:`single_object_obj`: MuJoCo's OBJ decoder keeps only a
file's first object, which left 42 of the Panda hand's 7 078 triangles, so the wrist camera saw no palm where
PyBullet draws one).
Arm joints are driven by position servos (gains from :class:`~robot_rl.robot.scene.RobotSpec`) with gravity
compensation on the arm bodies; the two fingers are coupled by a joint equality (the URDF ``mimic``) and
driven by one force-limited position servo. Only the hand and fingers collide, which is all the tabletop
tasks need and keeps contact detection cheap.

MuJoCo stores quaternions as wxyz; conversion to the public xyzw happens only in this module.
"""

from __future__ import annotations

import functools
import os
import warnings

import mujoco
import numpy as np

from robot_rl.sim.backend import Backend
from robot_rl.errors import ConfigError
from robot_rl.robot.scene import SceneSpec, cached_file, look_at_matrix, proxy_visual_urdf, resolved_urdf_text


def _wxyz(q_xyzw) -> np.ndarray:
    q = np.asarray(q_xyzw, dtype=np.float64)
    return np.array([q[3], q[0], q[1], q[2]])


def _xyzw(q_wxyz) -> np.ndarray:
    q = np.asarray(q_wxyz, dtype=np.float64)
    return np.array([q[1], q[2], q[3], q[0]])


def _mat_to_wxyz(R: np.ndarray) -> np.ndarray:
    q = np.empty(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(R, dtype=np.float64).ravel())
    return q


@functools.lru_cache(maxsize=None)  # read once per process: every MuJoCo env build loads the same meshes
def single_object_obj(path: str) -> str:
    """Path of a copy of the Wavefront OBJ file ``path`` as one object: its vertex positions and every face of every
    object (``o``/``g``) as triangles (polygons fanned; texture coordinates, normals and materials dropped: the
    geoms are drawn in one colour and MuJoCo computes normals). ``path`` itself when it holds a single object.

    MuJoCo's OBJ decoder reads only the first object of a file (pybullet_data's Panda: the hand keeps 42 of 7 078
    triangles, link 6 746 of 21 620), so without this the MuJoCo cameras see a different robot from PyBullet's.
    Written once under the temp directory (:func:`~robot_rl.robot.scene.cached_file`) and reused.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    if sum(ln.startswith(("o ", "g ")) for ln in lines) <= 1:
        return path
    verts, faces = [], []
    for ln in lines:
        if ln.startswith("v "):
            verts.append(ln)
        elif ln.startswith("f "):
            idx = [int(t.split("/")[0]) for t in ln.split()[1:]]
            idx = [i if i > 0 else len(verts) + 1 + i for i in idx]  # negative indices count back from here
            faces += [f"f {idx[0]} {idx[k]} {idx[k + 1]}" for k in range(1, len(idx) - 1)]
    stem = os.path.splitext(os.path.basename(path))[0]
    return cached_file(stem, ".obj", os.path.abspath(path), "\n".join(["o merged", *verts, *faces]) + "\n")


def load_robot_spec(urdf_path: str) -> mujoco.MjSpec:
    """Parse a URDF into an MjSpec, resolving ``package://`` paths against the URDF's directory and loading each
    OBJ mesh as one object (:func:`single_object_obj`)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(resolved_urdf_text(urdf_path))
    for mesh in root.iter("mesh"):
        fn = mesh.get("filename", "")
        if fn.lower().endswith(".obj") and os.path.isfile(fn):
            mesh.set("filename", single_object_obj(fn))
    text = ET.tostring(root, encoding="unicode")
    ext = '<mujoco><compiler discardvisual="false" fusestatic="false" strippath="false"/></mujoco>'
    head_end = text.index(">", text.index("<robot")) + 1
    return mujoco.MjSpec.from_string(text[:head_end] + ext + text[head_end:])


def build_model(scene: SceneSpec) -> mujoco.MjModel:
    """Compile the MuJoCo model of a scene (robot + table + objects + markers + cameras)."""
    r = scene.robot
    # the same meshes as PyBullet draws (RobotSpec.proxy_visual_links), so both backends' cameras see one robot
    spec = load_robot_spec(proxy_visual_urdf(r.urdf, r.proxy_visual_links) if r.proxy_visual_links else r.urdf)
    spec.option.timestep = scene.physics_dt
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.impratio = 10.0
    spec.visual.global_.offwidth = 640
    spec.visual.global_.offheight = 480
    arm_links = {f"panda_link{i}" for i in range(0, 9)}
    for b in spec.bodies:
        if b.name in arm_links or b.name.startswith("panda_"):
            b.gravcomp = 1.0
    for g in spec.geoms:
        body = g.parent.name
        if g.contype == 0:  # visual geom from the URDF
            g.group = 2
            g.rgba = [0.25, 0.25, 0.27, 1] if body in ("panda_hand", "panda_leftfinger", "panda_rightfinger", "panda_link7") else [0.92, 0.92, 0.92, 1]
        else:
            g.group = 3
            keep = body in ("panda_hand", "panda_leftfinger", "panda_rightfinger")
            g.contype = g.conaffinity = 1 if keep else 0
            if body in ("panda_leftfinger", "panda_rightfinger"):
                g.friction = [r.finger_friction, 0.01, 0.0001]
                g.condim = 4
    for name, kp, kv, tau in zip(r.arm_joints, r.kp, r.kv, r.tau_max):
        j = spec.joint(name)
        j.armature = r.armature
        j.damping = [r.joint_damping, 0.0, 0.0]
        act = spec.add_actuator(name=name, target=name, trntype=mujoco.mjtTrn.mjTRN_JOINT)
        act.set_to_position(kp=kp, kv=kv)
        act.forcelimited = True
        act.forcerange = [-tau, tau]
        act.ctrllimited = False
    f1, f2 = r.finger_joints
    for fj in (f1, f2):
        spec.joint(fj).damping = [r.finger_damping, 0.0, 0.0]
        spec.joint(fj).armature = r.finger_armature
    spec.add_equality(type=mujoco.mjtEq.mjEQ_JOINT, name1=f2, name2=f1, objtype=mujoco.mjtObj.mjOBJ_JOINT,
                      data=[0, 1] + [0] * 10)
    fa = spec.add_actuator(name="gripper", target=f1, trntype=mujoco.mjtTrn.mjTRN_JOINT)
    fa.set_to_position(kp=r.finger_kp, kv=r.finger_kv)
    fa.forcelimited = True
    fa.forcerange = [-r.finger_force, r.finger_force]

    world = spec.worldbody
    hx, hy, hz = scene.table_half_size
    cx, cy = scene.table_center_xy
    world.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX, size=[hx, hy, hz], pos=[cx, cy, -hz],
                   rgba=list(scene.table_rgba), friction=[1.0, 0.005, 0.0001])
    # the scene's light as PyBullet draws it (LightSpec): ambient from the headlight, one directional light
    lt = scene.light
    toward = np.asarray(lt.toward, dtype=np.float64)
    length = float(np.linalg.norm(toward))
    head = spec.visual.headlight
    head.ambient, head.diffuse, head.specular = [lt.ambient] * 3, [0.0] * 3, [0.0] * 3
    world.add_light(name="key", pos=list(toward), dir=list(-toward / length),
                    type=mujoco.mjtLightType.mjLIGHT_DIRECTIONAL, diffuse=[lt.diffuse * length] * 3,
                    specular=[0.0] * 3, ambient=[0.0] * 3)
    spec.add_texture(name="background", type=mujoco.mjtTexture.mjTEXTURE_SKYBOX,
                     builtin=mujoco.mjtBuiltin.mjBUILTIN_FLAT, rgb1=list(scene.background_rgb),
                     rgb2=list(scene.background_rgb), width=8, height=8)
    for o in scene.objects:
        b = world.add_body(name=o.name, pos=[0.5, 0.0, o.half_size[2]])
        b.add_freejoint(name=o.name + "_free")
        b.add_geom(name=o.name, type=mujoco.mjtGeom.mjGEOM_BOX, size=list(o.half_size), mass=o.mass,
                   rgba=list(o.rgba), friction=[o.friction, 0.01, 0.0001], condim=4)
    for mk in scene.markers:
        b = world.add_body(name=mk.name, mocap=True, pos=[0.5, 0.0, 0.0])
        b.add_geom(name=mk.name, type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[mk.radius, 0.0005, 0],
                   rgba=list(mk.rgba), contype=0, conaffinity=0, group=2)
    for c in scene.cameras:
        parent = world if c.parent is None else spec.body(c.parent)
        if parent is None:
            raise ConfigError(f"cameras.{c.name}.parent", f"unknown link {c.parent!r}", "use a link of the robot URDF")
        R = look_at_matrix(c.pos, c.lookat, c.up)
        parent.add_camera(name=c.name, pos=list(c.pos), quat=list(_mat_to_wxyz(R)), fovy=c.fovy)
    with warnings.catch_warnings():  # pybullet_data's visual .obj files lack some texture coordinates
        warnings.filterwarnings("ignore", message="obj_decoder")
        return spec.compile()


class MujocoBackend(Backend):
    """MuJoCo implementation of :class:`~robot_rl.sim.backend.Backend`."""

    name = "mujoco"

    def __init__(self, scene: SceneSpec):
        super().__init__(scene)
        self.model = build_model(scene)
        self.data = mujoco.MjData(self.model)
        m, r = self.model, scene.robot
        self._arm_qadr = np.array([m.jnt_qposadr[m.joint(j).id] for j in r.arm_joints])
        self._arm_dadr = np.array([m.jnt_dofadr[m.joint(j).id] for j in r.arm_joints])
        self._f_qadr = np.array([m.jnt_qposadr[m.joint(j).id] for j in r.finger_joints])
        self._arm_act = np.array([m.actuator(j).id for j in r.arm_joints])
        self._grip_act = m.actuator("gripper").id
        self._obj_qadr = {o.name: m.jnt_qposadr[m.joint(o.name + "_free").id] for o in scene.objects}
        self._obj_dadr = {o.name: m.jnt_dofadr[m.joint(o.name + "_free").id] for o in scene.objects}
        self._mocap = {mk.name: m.body_mocapid[m.body(mk.name).id] for mk in scene.markers}
        self._n_sub = scene.n_substeps
        self._renderers: dict = {}
        self._vis_opt = mujoco.MjvOption()
        self._vis_opt.geomgroup[:] = [1, 1, 1, 0, 0, 0]  # hide collision geoms (group 3)
        self._state_spec = mujoco.mjtState.mjSTATE_INTEGRATION
        # nominal values for the randomization setters (factors always apply to these)
        self._obj_body = {o.name: m.body(o.name).id for o in scene.objects}
        self._obj_geom = {o.name: m.geom(o.name).id for o in scene.objects}
        self._nominal = {"body_mass": m.body_mass.copy(), "body_inertia": m.body_inertia.copy(),
                         "geom_friction": m.geom_friction.copy(), "dof_damping": m.dof_damping.copy(),
                         "gainprm": m.actuator_gainprm.copy(), "biasprm": m.actuator_biasprm.copy(),
                         "light_diffuse": m.light_diffuse.copy(), "light_specular": m.light_specular.copy(),
                         "head_diffuse": m.vis.headlight.diffuse.copy(), "head_ambient": m.vis.headlight.ambient.copy()}

    def reset_robot(self, q_arm, width):
        d = self.data
        d.qpos[self._arm_qadr] = q_arm
        d.qpos[self._f_qadr] = width / 2.0
        d.qvel[:] = 0.0
        self.set_targets(q_arm, width)
        mujoco.mj_forward(self.model, d)

    def set_targets(self, q_arm, width):
        self.data.ctrl[self._arm_act] = q_arm
        self.data.ctrl[self._grip_act] = width / 2.0

    def step(self):
        mujoco.mj_step(self.model, self.data, nstep=self._n_sub)

    def joint_state(self):
        d = self.data
        return d.qpos[self._arm_qadr].copy(), d.qvel[self._arm_dadr].copy(), float(d.qpos[self._f_qadr].sum())

    def _obj(self, name):
        if name not in self._obj_qadr:
            raise ConfigError("object", f"unknown object {name!r}", f"use one of {sorted(self._obj_qadr)}")
        return self._obj_qadr[name]

    def object_pose(self, name):
        a = self._obj(name)
        q = self.data.qpos
        return q[a:a + 3].copy(), _xyzw(q[a + 3:a + 7])

    def set_object_pose(self, name, pos, quat_xyzw):
        a = self._obj(name)
        self.data.qpos[a:a + 3] = pos
        self.data.qpos[a + 3:a + 7] = _wxyz(quat_xyzw)
        dv = self._obj_dadr[name]
        self.data.qvel[dv:dv + 6] = 0.0
        mujoco.mj_forward(self.model, self.data)

    def set_marker(self, name, pos):
        self.data.mocap_pos[self._mocap[name]] = pos
        mujoco.mj_kinematics(self.model, self.data)  # else the first rendered frame shows the old marker pose

    def render(self, camera, height, width):
        key = (height, width)
        if key not in self._renderers:
            self._renderers[key] = mujoco.Renderer(self.model, height=height, width=width)
        rd = self._renderers[key]
        rd.update_scene(self.data, camera=camera, scene_option=self._vis_opt)
        # no shadows: PyBullet's cameras render none either (shadow=0), and on a software GL (EGL/llvmpipe, OSMesa)
        # the 4096^2 shadow maps cost nearly the whole frame (docs/MEASUREMENTS.md)
        rd.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        return rd.render().copy()

    def get_state(self):
        s = np.empty(mujoco.mj_stateSize(self.model, self._state_spec))
        mujoco.mj_getState(self.model, self.data, s, self._state_spec)
        return s

    def state_size(self):
        return int(mujoco.mj_stateSize(self.model, self._state_spec))

    def set_state(self, state):
        mujoco.mj_setState(self.model, self.data, self.check_state(state), self._state_spec)
        mujoco.mj_forward(self.model, self.data)

    # -- randomization setters ---------------------------------------------------------------------------------
    def set_physics(self, params):
        """See :meth:`Backend.set_physics`. Friction: MuJoCo takes the larger coefficient of a contact pair, so
        ``object_friction`` scales every geom's sliding friction (a pair with an object then gets exactly factor x
        its nominal value; contacts without an object, e.g. finger-table, scale too). Constant model fields that
        depend on masses are recomputed (``mj_setConst``) with the simulation state preserved."""
        m, nom = self.model, self._nominal
        if "object_mass" in params:
            f = float(params["object_mass"])
            for b in self._obj_body.values():
                m.body_mass[b] = nom["body_mass"][b] * f
                m.body_inertia[b] = nom["body_inertia"][b] * f
        if "object_friction" in params:
            m.geom_friction[:, 0] = nom["geom_friction"][:, 0] * float(params["object_friction"])
        if "joint_damping" in params:
            m.dof_damping[self._arm_dadr] = nom["dof_damping"][self._arm_dadr] * np.asarray(params["joint_damping"])
        if "actuator_gain" in params:
            f, a = np.asarray(params["actuator_gain"], dtype=np.float64), self._arm_act
            m.actuator_gainprm[a, 0] = nom["gainprm"][a, 0] * f
            m.actuator_biasprm[a, 1] = nom["biasprm"][a, 1] * f  # -kp
        state = self.get_state()  # integration state: qpos, qvel, ctrl, mocap, warm start, ...
        mujoco.mj_setConst(m, self.data)  # overwrites qpos with qpos0: restore the state afterwards
        self.set_state(state)

    def get_physics(self):
        m = self.model
        table = m.geom("table").id
        return {"object_mass": {n: float(m.body_mass[b]) for n, b in self._obj_body.items()},
                "object_friction": {n: float(max(m.geom_friction[g, 0], m.geom_friction[table, 0]))
                                    for n, g in self._obj_geom.items()},
                "joint_damping": [float(v) for v in m.dof_damping[self._arm_dadr]],
                "actuator_gain": [float(v) for v in m.actuator_gainprm[self._arm_act, 0]]}

    def set_camera_pose(self, camera, pos, R):
        try:
            cid = self.model.camera(camera).id
        except KeyError:
            raise ConfigError("camera", f"unknown camera {camera!r}",
                              f"use one of {[c.name for c in self.scene.cameras]}") from None
        self.model.cam_pos[cid] = np.asarray(pos, dtype=np.float64)
        self.model.cam_quat[cid] = _mat_to_wxyz(np.asarray(R, dtype=np.float64))

    def set_colors(self, rgba):
        for name, c in rgba.items():
            if name != "table" and name not in self._obj_geom:
                raise ConfigError("colors", f"unknown object {name!r}",
                                  f"use 'table' or one of {sorted(self._obj_geom)}")
            self.model.geom_rgba[self.model.geom(name).id] = np.asarray(c, dtype=np.float32)

    def set_lighting(self, intensity):
        m, nom, f = self.model, self._nominal, float(intensity)
        m.light_diffuse[:] = np.clip(nom["light_diffuse"] * f, 0.0, 1.0)
        m.light_specular[:] = np.clip(nom["light_specular"] * f, 0.0, 1.0)
        m.vis.headlight.diffuse[:] = np.clip(nom["head_diffuse"] * f, 0.0, 1.0)
        m.vis.headlight.ambient[:] = np.clip(nom["head_ambient"] * f, 0.0, 1.0)

    def close(self):
        for rd in self._renderers.values():
            rd.close()
        self._renderers.clear()
