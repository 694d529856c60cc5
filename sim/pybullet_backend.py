"""PyBullet backend: the twin of :mod:`robot_rl.sim.mujoco_backend`, built from the same :class:`SceneSpec`.

Same robot description (the Franka Panda URDF shipped in ``pybullet_data``, inertias taken from the file, which
Bullet then agrees with MuJoCo on to 1e-4 kg m^2), same table, objects, markers and cameras, same servo gains.
Every instance owns a private physics client (``p.connect(p.DIRECT)``) and passes ``physicsClientId`` on every
call, so several environments live side by side in one process.

Servos. MuJoCo's arm actuators are position servos ``tau = clip(kp (q_t - q) - kv qd, +-tau_max)`` plus passive
joint damping ``d`` and armature, integrated implicitly in the velocity, with gravity compensated on the arm
bodies. Torque-level PD in Bullet (semi-implicit Euler, no armature) is unstable at these gains and a 2 ms step
(the nearly parallel joints 1 and 3 oscillate), so the same law is realised with Bullet's constraint-based joint
motors, which solve for the end-of-step joint velocity

    qd' = positionGain / dt * (q_t - q) + (1 - velocityGain) * qd       (at most tau_max, as an impulse limit)

With ``positionGain = dt^2 kp / (M + dt kv')`` and ``velocityGain = dt kv' / (M + dt kv')`` (``kv' = kv + d``,
``M`` = diagonal of the joint-space inertia at the home posture plus MuJoCo's armature) this is exactly one
implicit-Euler step of ``M qdd = kp (q_t - q) - kv' qd`` per joint, i.e. MuJoCo's servo without the off-diagonal
inertia coupling. Gravity is cancelled every physics step by ``TORQUE_CONTROL`` with Bullet's inverse dynamics
``g(q)`` (MuJoCo: ``gravcomp=1``), so the force limits apply to the servo torque alone, as in MuJoCo.
Gripper: MuJoCo couples the fingers with a joint equality (the URDF ``mimic``) and drives the opening s with one
servo (kp 1000 N/m, kv 20 N s/m, +-``finger_force``) plus 5 N s/m damping per finger; here a ``JOINT_GEAR``
constraint (ratio -1) couples the fingers and each finger motor carries half of that servo (kp 500, kv' 15,
+-``finger_force`` / 2, i.e. the same 10 N squeeze per finger on a held cube).

Contacts. As in MuJoCo only the hand and the fingers collide (arm links are visual). Friction: Bullet multiplies
the two coefficients, MuJoCo takes the larger one, so the finger pads get 1.5 (MuJoCo's finger value) and
cube/table 1.0 give the same 1.5 finger-cube and 1.0 cube-table coefficients. Bullet's default body damping is
switched off (MuJoCo has none). The URDF's compliant finger contact (30 000 N/m, 1 000 N s/m) is kept.
Differences that remain are measured in ``bench/bench_pybullet.py``.

Rendering: ``ER_TINY_RENDERER`` (CPU, headless; its cost is per triangle, so the arm links in
``RobotSpec.proxy_visual_links`` are drawn with their collision meshes; docs/MEASUREMENTS.md)
with the pinhole intrinsics of ``fovy`` (vertical, degrees) and the image aspect, and the view matrix of
:func:`~robot_rl.robot.scene.look_at_matrix` (the matrix the MuJoCo camera is built from); cameras with a ``parent``
follow that link's URDF frame. Images are uint8 (H, W, 3) RGB, row 0 at the top. Quaternions are xyzw in PyBullet
and in the public API: no conversion.

Save/restore: see :meth:`PybulletBackend.get_state`.
"""

from __future__ import annotations

import os

import numpy as np
import pybullet as p

from robot_rl.sim.backend import Backend
from robot_rl.errors import ConfigError
from robot_rl.robot.scene import SceneSpec, look_at_matrix, proxy_visual_urdf

DARK = (0.25, 0.25, 0.27, 1.0)
LIGHT = (0.92, 0.92, 0.92, 1.0)
_STATE_MAGIC = 7.0e5 + 3  # first entry of a state vector from this backend (format version)
_MAX_SNAPSHOTS = 32  # in-memory Bullet snapshots kept for exact restores (oldest dropped first)


def camera_view_matrix(R: np.ndarray, pos: np.ndarray) -> list[float]:
    """OpenGL view matrix (world -> camera), column-major flat list of 16, from a camera pose.

    Args:
        R: (3, 3) camera rotation in the world frame, columns = camera x (right), y (up), z (backward),
            i.e. :func:`~robot_rl.robot.scene.look_at_matrix` (the MuJoCo camera frame).
        pos: (3,) camera position [m], world frame.
    """
    V = np.eye(4)
    V[:3, :3] = R.T
    V[:3, 3] = -R.T @ pos
    return V.T.reshape(-1).tolist()


def camera_projection_matrix(fovy_deg: float, height: int, width: int, near: float = 0.0203,
                             far: float = 10.0) -> list[float]:
    """OpenGL perspective projection, column-major flat list of 16. ``fovy_deg`` vertical field of view [deg],
    square pixels (aspect = width / height), clip planes ``near``/``far`` [m] (they do not move pixels; the
    default near plane is MuJoCo's for this scene, 0.01 x model extent of 2.03 m)."""
    f = 1.0 / np.tan(np.deg2rad(fovy_deg) / 2.0)
    P = np.zeros((4, 4))
    P[0, 0] = f * height / width
    P[1, 1] = f
    P[2, 2] = (far + near) / (near - far)
    P[2, 3] = 2.0 * far * near / (near - far)
    P[3, 2] = -1.0
    return P.T.reshape(-1).tolist()


class PybulletBackend(Backend):
    """PyBullet implementation of :class:`~robot_rl.sim.backend.Backend` (private ``DIRECT`` client per instance).

    Args:
        scene: the backend-neutral scene; ``physics_dt`` is Bullet's fixed time step and
            ``n_substeps`` steps make one :meth:`step`.
    """

    name = "pybullet"

    def __init__(self, scene: SceneSpec):
        super().__init__(scene)
        self.cid = p.connect(p.DIRECT)
        if self.cid < 0:
            raise ConfigError("backend", "could not start a PyBullet DIRECT client", "check the pybullet installation")
        self._token = float(int.from_bytes(os.urandom(6), "little"))  # identifies this instance in state vectors
        self._snapshots: dict[int, int] = {}  # snapshot serial -> Bullet state id (insertion ordered)
        self._serial = 0
        try:
            self._build()
            self._reset_joints(self._q_t, self._w_t)
        except Exception:
            p.disconnect(self.cid)
            raise

    # -- construction ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        sc, r, c = self.scene, self.scene.robot, self.cid
        p.setPhysicsEngineParameter(fixedTimeStep=sc.physics_dt, numSubSteps=0, deterministicOverlappingPairs=1,
                                    physicsClientId=c)
        p.setGravity(0.0, 0.0, -9.81, physicsClientId=c)
        flags = p.URDF_USE_INERTIA_FROM_FILE
        urdf = proxy_visual_urdf(r.urdf, r.proxy_visual_links) if r.proxy_visual_links else r.urdf
        self.robot = p.loadURDF(urdf, [0, 0, 0], [0, 0, 0, 1], useFixedBase=True, flags=flags, physicsClientId=c)
        n = p.getNumJoints(self.robot, physicsClientId=c)
        info = [p.getJointInfo(self.robot, j, physicsClientId=c) for j in range(n)]
        joint_idx = {i[1].decode(): i[0] for i in info}
        self._link_idx = {i[12].decode(): i[0] for i in info}
        self._link_idx[r.base_link] = -1
        for jn in (*r.arm_joints, *r.finger_joints):
            if jn not in joint_idx:
                raise ConfigError("robot.arm_joints", f"joint {jn!r} not in {r.urdf}", "check the joint names")
        self._arm = [joint_idx[j] for j in r.arm_joints]
        self._fingers = [joint_idx[j] for j in r.finger_joints]
        self._movable = self._arm + self._fingers
        # no Bullet body damping (MuJoCo has none)
        for link in range(-1, n):
            p.changeDynamics(self.robot, link, linearDamping=0.0, angularDamping=0.0, jointDamping=0.0,
                             physicsClientId=c)
        # only the hand and the fingers collide (as in MuJoCo)
        colliding = {self._link_idx[r.hand_link], *self._fingers}
        for link in range(-1, n):
            if link not in colliding:
                p.setCollisionFilterGroupMask(self.robot, link, 0, 0, physicsClientId=c)
        for f in self._fingers:
            p.changeDynamics(self.robot, f, lateralFriction=r.finger_friction, physicsClientId=c)
        # URDF mimic: finger 2 follows finger 1 (gear ratio -1 = same direction for these axes)
        self._gear = p.createConstraint(self.robot, self._fingers[0], self.robot, self._fingers[1], p.JOINT_GEAR,
                                        [1, 0, 0], [0, 0, 0], [0, 0, 0], physicsClientId=c)
        p.changeConstraint(self._gear, gearRatio=-1, erp=0.1, maxForce=100.0, physicsClientId=c)
        # colours as in the MuJoCo scene
        dark = {self._link_idx[n_] for n_ in (r.hand_link, "panda_link7", "panda_leftfinger", "panda_rightfinger")
                if n_ in self._link_idx}
        for vs in p.getVisualShapeData(self.robot, physicsClientId=c):
            p.changeVisualShape(self.robot, vs[1], rgbaColor=DARK if vs[1] in dark else LIGHT, physicsClientId=c)

        hx, hy, hz = sc.table_half_size
        cx, cy = sc.table_center_xy
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[hx, hy, hz], physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=[hx, hy, hz], rgbaColor=list(sc.table_rgba),
                                  physicsClientId=c)
        self.table = p.createMultiBody(0.0, col, vis, [cx, cy, -hz], physicsClientId=c)
        p.changeDynamics(self.table, -1, lateralFriction=1.0, physicsClientId=c)

        self._objects: dict[str, int] = {}
        for o in sc.objects:
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=list(o.half_size), physicsClientId=c)
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=list(o.half_size), rgbaColor=list(o.rgba),
                                      physicsClientId=c)
            b = p.createMultiBody(o.mass, col, vis, [0.5, 0.0, o.half_size[2]], physicsClientId=c)
            p.changeDynamics(b, -1, lateralFriction=o.friction, linearDamping=0.0, angularDamping=0.0,
                             physicsClientId=c)
            self._objects[o.name] = b
        self._markers: dict[str, int] = {}
        for mk in sc.markers:
            # a flat disc (32-gon fan, normals up, 1 mm above its origin): TinyRenderer shades a thin
            # GEOM_CYLINDER's cap with smoothed side normals (ambient only), unlike MuJoCo's cylinder
            ang = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
            verts = [[0.0, 0.0, 0.001]] + [[mk.radius * np.cos(a), mk.radius * np.sin(a), 0.001] for a in ang]
            fan = [[0, 1 + i, 1 + (i + 1) % 32] for i in range(32)]
            vis = p.createVisualShape(p.GEOM_MESH, vertices=verts, indices=[int(v) for f in fan for v in f],
                                      normals=[[0.0, 0.0, 1.0]] * len(verts), rgbaColor=list(mk.rgba),
                                      physicsClientId=c)
            self._markers[mk.name] = p.createMultiBody(0.0, -1, vis, [0.5, 0.0, 0.0], physicsClientId=c)
        self._cams = {}
        for cam in sc.cameras:
            if cam.parent is not None and cam.parent not in self._link_idx:
                raise ConfigError(f"cameras.{cam.name}.parent", f"unknown link {cam.parent!r}",
                                  "use a link of the robot URDF")
            self._cams[cam.name] = (cam, look_at_matrix(cam.pos, cam.lookat, cam.up), np.asarray(cam.pos, float))

        q0 = list(r.q_home) + [0.5 * r.max_width] * 2
        self._M = (np.diag(p.calculateMassMatrix(self.robot, q0, physicsClientId=c))
                   + np.array([r.armature] * 7 + [r.finger_armature] * 2))
        self._kp_factor, self._damping_factor = np.ones(7), np.ones(7)
        self._set_motor_gains()
        if not hasattr(self, "_applied"):  # what the randomization setters set, re-applied after a rebuild
            self._applied = {"physics": {}, "colors": {}, "cameras": {}, "light": None}
        self._obj_nominal = {n: p.getDynamicsInfo(b, -1, physicsClientId=c) for n, b in self._objects.items()}
        self._obj_friction = {o.name: float(o.friction) for o in sc.objects}
        self._light = 1.0
        self._motor_fmax = [float(v) for v in r.tau_max] + [0.5 * r.finger_force] * 2
        self._q_t = np.array(r.q_home, dtype=np.float64)
        self._w_t = float(r.max_width)
        self._zeros9 = [0.0] * 9

    def _set_motor_gains(self) -> None:
        """Bullet motor gains from the servo law (module docstring) with the current kp / damping factors."""
        r, dt = self.scene.robot, self.scene.physics_dt
        # per-joint servo (7 arm + 2 finger joints); the gripper servo's force is split over the two fingers
        kp = np.concatenate([np.asarray(r.kp) * self._kp_factor, [0.5 * r.finger_kp] * 2])
        kv = np.concatenate([np.asarray(r.kv) + r.joint_damping * self._damping_factor,
                             [0.5 * r.finger_kv + r.finger_damping] * 2])
        M = self._M
        self._motor_kp = (dt * dt * kp / (M + dt * kv)).tolist()
        self._motor_kd = (dt * kv / (M + dt * kv)).tolist()

    # -- Backend API -------------------------------------------------------------------------------------------
    def reset_robot(self, q_arm, width):
        """Every episode starts in a freshly built world (``resetSimulation`` + rebuild, ~20 ms): Bullet keeps
        contact manifolds, the broadphase pair cache and the solver's warm start across teleports, and with them
        an episode depended (at the 1e-7 level) on the one before, which contact can amplify into a different
        outcome (docs/MEASUREMENTS.md).
        Randomized parameters are applied after this, per episode; older :meth:`get_state` snapshots restore
        from their explicit part."""
        p.resetSimulation(physicsClientId=self.cid)
        self._snapshots.clear()
        self._build()
        self._reapply()
        self._reset_joints(q_arm, width)

    def _reset_joints(self, q_arm, width):
        c = self.cid
        for j, q in zip(self._arm, np.asarray(q_arm, dtype=np.float64)):
            p.resetJointState(self.robot, j, float(q), 0.0, physicsClientId=c)
        for j in self._fingers:
            p.resetJointState(self.robot, j, float(width) / 2.0, 0.0, physicsClientId=c)
        self.set_targets(q_arm, width)

    def set_targets(self, q_arm, width):
        self._q_t = np.array(q_arm, dtype=np.float64).reshape(7)
        self._w_t = float(width)
        self._write_motors()

    def _write_motors(self) -> None:
        """Send the servo targets to Bullet's joint motors (they persist until changed)."""
        q_t = np.concatenate([self._q_t, [0.5 * self._w_t] * 2]).tolist()
        p.setJointMotorControlArray(self.robot, self._movable, p.POSITION_CONTROL, targetPositions=q_t,
                                    targetVelocities=self._zeros9, positionGains=self._motor_kp,
                                    velocityGains=self._motor_kd, forces=self._motor_fmax, physicsClientId=self.cid)

    def _gravity_torques(self) -> list[float]:
        """Joint torques (9,) [N m, N] that hold the arm and fingers against gravity at the current posture."""
        st = p.getJointStates(self.robot, self._movable, physicsClientId=self.cid)
        return list(p.calculateInverseDynamics(self.robot, [s[0] for s in st], self._zeros9, self._zeros9,
                                               physicsClientId=self.cid))

    def step(self):
        c = self.cid
        for _ in range(self.scene.n_substeps):  # applied torques last one Bullet step: re-apply g(q) each time
            p.setJointMotorControlArray(self.robot, self._movable, p.TORQUE_CONTROL,
                                        forces=self._gravity_torques(), physicsClientId=c)
            p.stepSimulation(physicsClientId=c)

    def joint_state(self):
        st = p.getJointStates(self.robot, self._movable, physicsClientId=self.cid)
        q = np.array([s[0] for s in st[:7]])
        qd = np.array([s[1] for s in st[:7]])
        return q, qd, float(st[7][0] + st[8][0])

    def _obj(self, name):
        if name not in self._objects:
            raise ConfigError("object", f"unknown object {name!r}", f"use one of {sorted(self._objects)}")
        return self._objects[name]

    def object_pose(self, name):
        pos, quat = p.getBasePositionAndOrientation(self._obj(name), physicsClientId=self.cid)
        return np.array(pos), np.array(quat)

    def set_object_pose(self, name, pos, quat_xyzw):
        b = self._obj(name)
        p.resetBasePositionAndOrientation(b, [float(v) for v in pos], [float(v) for v in quat_xyzw],
                                          physicsClientId=self.cid)
        p.resetBaseVelocity(b, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], physicsClientId=self.cid)

    def set_marker(self, name, pos):
        if name not in self._markers:
            raise ConfigError("marker", f"unknown marker {name!r}", f"use one of {sorted(self._markers)}")
        p.resetBasePositionAndOrientation(self._markers[name], [float(v) for v in pos], [0, 0, 0, 1],
                                          physicsClientId=self.cid)

    def camera_pose(self, camera: str) -> tuple[np.ndarray, np.ndarray]:
        """World pose of a camera: rotation (3, 3) (columns x right, y up, z backward) and position (3,) [m]."""
        if camera not in self._cams:
            raise ConfigError("camera", f"unknown camera {camera!r}", f"use one of {sorted(self._cams)}")
        cam, R, pos = self._cams[camera]
        if cam.parent is None:
            return R, pos
        link = self._link_idx[cam.parent]
        if link == -1:
            lp, lq = p.getBasePositionAndOrientation(self.robot, physicsClientId=self.cid)
        else:  # URDF link frame (not the inertial frame)
            ls = p.getLinkState(self.robot, link, computeForwardKinematics=True, physicsClientId=self.cid)
            lp, lq = ls[4], ls[5]
        Rl = np.array(p.getMatrixFromQuaternion(lq)).reshape(3, 3)
        return Rl @ R, np.asarray(lp) + Rl @ pos

    def render(self, camera, height, width):
        R, pos = self.camera_pose(camera)
        cam, lt = self._cams[camera][0], self.scene.light
        _, _, rgba, _, _ = p.getCameraImage(
            width, height, camera_view_matrix(R, pos), camera_projection_matrix(cam.fovy, height, width),
            renderer=p.ER_TINY_RENDERER, shadow=0, lightDirection=list(lt.toward), lightColor=[1, 1, 1],
            lightAmbientCoeff=lt.ambient * self._light, lightDiffuseCoeff=lt.diffuse * self._light,
            lightSpecularCoeff=lt.specular * self._light,
            flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=self.cid)
        return np.ascontiguousarray(np.reshape(rgba, (height, width, 4))[:, :, :3], dtype=np.uint8)

    # -- randomization setters ---------------------------------------------------------------------------------
    def _reapply(self) -> None:
        """After a rebuild: the values the randomization setters gave (they are absolute, so re-applying is exact)."""
        a = self._applied
        if a["physics"]:
            self.set_physics(dict(a["physics"]))
        if a["colors"]:
            self.set_colors(dict(a["colors"]))
        for name, (pos, R) in list(a["cameras"].items()):
            self.set_camera_pose(name, pos, R)
        if a["light"] is not None:
            self.set_lighting(a["light"])

    def set_physics(self, params):
        """See :meth:`Backend.set_physics`. Bullet multiplies the two coefficients of a contact pair, so
        ``object_friction`` scales the objects' own coefficient only (finger-table contacts are unchanged).
        Passive joint damping is part of the motor's velocity gain here (module docstring), so ``joint_damping``
        and ``actuator_gain`` recompute the motor gains."""
        c = self.cid
        self._applied["physics"].update(params)
        for name, b in self._objects.items():
            nom = self._obj_nominal[name]
            if "object_mass" in params:
                f = float(params["object_mass"])
                p.changeDynamics(b, -1, mass=nom[0] * f, localInertiaDiagonal=[v * f for v in nom[2]],
                                 physicsClientId=c)
            if "object_friction" in params:
                self._obj_friction[name] = nom[1] * float(params["object_friction"])
                p.changeDynamics(b, -1, lateralFriction=self._obj_friction[name], physicsClientId=c)
        if "joint_damping" in params or "actuator_gain" in params:
            if "joint_damping" in params:
                self._damping_factor = np.asarray(params["joint_damping"], dtype=np.float64).reshape(7)
            if "actuator_gain" in params:
                self._kp_factor = np.asarray(params["actuator_gain"], dtype=np.float64).reshape(7)
            self._set_motor_gains()
            self._write_motors()

    def get_physics(self):
        r, c = self.scene.robot, self.cid
        return {"object_mass": {n: float(p.getDynamicsInfo(b, -1, physicsClientId=c)[0])
                                for n, b in self._objects.items()},
                "object_friction": {n: float(p.getDynamicsInfo(b, -1, physicsClientId=c)[1])  # x table's 1.0
                                    for n, b in self._objects.items()},
                "joint_damping": [float(v) for v in r.joint_damping * self._damping_factor],
                "actuator_gain": [float(v) for v in np.asarray(r.kp) * self._kp_factor]}

    def set_camera_pose(self, camera, pos, R):
        if camera not in self._cams:
            raise ConfigError("camera", f"unknown camera {camera!r}", f"use one of {sorted(self._cams)}")
        cam = self._cams[camera][0]
        self._applied["cameras"][camera] = (pos, R)
        self._cams[camera] = (cam, np.asarray(R, dtype=np.float64).reshape(3, 3), np.asarray(pos, dtype=np.float64))

    def set_colors(self, rgba):
        for name, col in rgba.items():
            body = self.table if name == "table" else self._objects.get(name)
            if body is None:
                raise ConfigError("colors", f"unknown object {name!r}",
                                  f"use 'table' or one of {sorted(self._objects)}")
            p.changeVisualShape(body, -1, rgbaColor=[float(v) for v in col], physicsClientId=self.cid)
        self._applied["colors"].update(rgba)

    def set_lighting(self, intensity):
        self._applied["light"] = self._light = float(intensity)

    # -- save / restore ----------------------------------------------------------------------------------------
    def _explicit_state(self) -> np.ndarray:
        c = self.cid
        st = p.getJointStates(self.robot, self._movable, physicsClientId=c)
        parts = [[s[0] for s in st], [s[1] for s in st]]
        for b in self._objects.values():
            pos, quat = p.getBasePositionAndOrientation(b, physicsClientId=c)
            lin, ang = p.getBaseVelocity(b, physicsClientId=c)
            parts += [pos, quat, lin, ang]
        for b in self._markers.values():
            parts.append(p.getBasePositionAndOrientation(b, physicsClientId=c)[0])
        parts += [self._q_t, [self._w_t]]
        return np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in parts])

    def get_state(self):
        """Flat float64 vector: [magic, instance token, snapshot serial, q (9), qd (9) of the 7 arm + 2 finger
        joints, per object pos (3) quat xyzw (4) linear vel (3) angular vel (3), per marker pos (3),
        arm targets (7) [rad], width target (1) [m]].

        Restoring in the instance that saved it (one of its last 32 :meth:`get_state` calls) restores Bullet's
        own snapshot (``p.saveState``: positions, velocities, contact manifolds, solver warm start), so the
        continuation is bit-identical. Anywhere else (another env, another process, an older vector) the explicit
        part restores joint and object positions/velocities exactly, but contacts start cold, so a trajectory
        with the cube in contact drifts by millimetres (docs/MEASUREMENTS.md).
        """
        sid = p.saveState(physicsClientId=self.cid)
        self._serial += 1
        self._snapshots[self._serial] = sid
        while len(self._snapshots) > _MAX_SNAPSHOTS:
            old = next(iter(self._snapshots))
            p.removeState(self._snapshots.pop(old), physicsClientId=self.cid)
        return np.concatenate([[_STATE_MAGIC, self._token, float(self._serial)], self._explicit_state()])

    def state_size(self):
        return 3 + len(self._explicit_state())

    def set_state(self, state):
        s = self.check_state(np.ravel(state) if isinstance(state, np.ndarray) else state)
        if s[0] != _STATE_MAGIC:
            raise ConfigError("state.backend", f"not a PyBullet state of this scene ({s.shape[0]} values)",
                              "pass a vector returned by get_state() of a pybullet env with the same task")
        c, x = self.cid, s[3:]
        n_obj, n_mk = 13 * len(self._objects), 3 * len(self._markers)
        serial = int(s[2])
        if s[1] == self._token and serial in self._snapshots:
            # exact: Bullet's own snapshot (positions, velocities, contact manifolds, solver warm start);
            # resetting joints/bases on top of it would drop the contact cache again
            p.restoreState(self._snapshots[serial], physicsClientId=c)
        else:
            q, qd, i = x[:9], x[9:18], 18
            for j, qj, qdj in zip(self._movable, q, qd):
                p.resetJointState(self.robot, j, float(qj), float(qdj), physicsClientId=c)
            for b in self._objects.values():
                pos, quat, lin, ang = x[i:i + 3], x[i + 3:i + 7], x[i + 7:i + 10], x[i + 10:i + 13]
                i += 13
                p.resetBasePositionAndOrientation(b, pos.tolist(), quat.tolist(), physicsClientId=c)
                p.resetBaseVelocity(b, lin.tolist(), ang.tolist(), physicsClientId=c)
            for b in self._markers.values():
                p.resetBasePositionAndOrientation(b, x[i:i + 3].tolist(), [0, 0, 0, 1], physicsClientId=c)
                i += 3
        i = 18 + n_obj + n_mk
        self.set_targets(x[i:i + 7], float(x[i + 7]))

    def close(self):
        """Disconnect the private physics client (idempotent)."""
        cid, self.cid = getattr(self, "cid", None), None
        if cid is not None and cid >= 0 and p.isConnected(physicsClientId=cid):
            p.disconnect(physicsClientId=cid)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: pybullet may already be gone
            pass
