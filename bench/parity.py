"""Cross-backend parity measurements (MuJoCo vs PyBullet), shared by ``tests/test_pybullet.py`` and
``bench/bench_pybullet.py`` so that the test and the benchmark measure exactly the same thing.

Frames: robot base frame = world frame; units: metres, radians, pixels.
"""

from __future__ import annotations

import numpy as np

from robot_rl.sim.backend import Backend
from robot_rl.robot.kinematics import KinematicChain
from robot_rl.robot.scene import SceneSpec


def free_space_targets(q_home, n_steps: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A joint-target sequence that sweeps the arm through free space (the tool stays > 5 cm above the table).

    Sums of per-joint sinusoids (amplitudes 0.2-0.5 rad, periods 3-6 s at 10 Hz) starting at ``q_home``, plus a
    0.15 rad step on every joint for 20 steps in the middle (a saturating, force-limited move) and a gripper
    that opens/closes every 2.5 s.

    Returns:
        q_targets (n_steps, 7) [rad], widths (n_steps,) [m].
    """
    rng = np.random.default_rng(seed)
    q_home = np.asarray(q_home, dtype=np.float64)
    k = np.arange(n_steps)[:, None]
    amp = np.array([0.4, 0.25, 0.3, 0.3, 0.5, 0.3, 0.5])
    period = np.array([47, 61, 53, 37, 43, 29, 31])
    phase = rng.uniform(0.0, 2.0 * np.pi, 7)
    q = q_home + amp * (np.sin(2.0 * np.pi * k / period + phase) - np.sin(phase))
    mid = n_steps // 2
    q[mid:mid + 20] += 0.15
    widths = np.where((np.arange(n_steps) // 25) % 2 == 0, 0.08, 0.0)
    return q, widths


def ee_trajectory(backend: Backend, chain: KinematicChain, q_targets: np.ndarray, widths: np.ndarray,
                  q0=None) -> np.ndarray:
    """Reset the arm to ``q0`` (default: the first target), park every object on a table corner behind the
    robot base (out of the arm's way), then play the joint targets one control step each.

    Returns:
        (n_steps, 3) tool-centre positions [m] after each control step (FK of the measured joints).
    """
    q0 = q_targets[0] if q0 is None else q0
    backend.reset_robot(np.asarray(q0), float(widths[0]))
    for i, o in enumerate(backend.scene.objects):
        backend.set_object_pose(o.name, np.array([-0.15, -0.5 + 0.1 * i, o.half_size[2]]), np.array([0, 0, 0, 1.0]))
    out = np.empty((len(q_targets), 3))
    for t, (q_t, w) in enumerate(zip(q_targets, widths)):
        backend.set_targets(q_t, float(w))
        backend.step()
        out[t] = chain.fk(backend.joint_state()[0])[:3, 3]
    return out


def rms_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square Euclidean distance between two (T, 3) trajectories [same unit as the inputs]."""
    return float(np.sqrt(np.mean(np.sum((np.asarray(a) - np.asarray(b)) ** 2, axis=1))))


def free_space_parity(backend_a: Backend, backend_b: Backend, n_steps: int = 200, seed: int = 0) -> dict:
    """Play the same :func:`free_space_targets` on two backends built from the same scene.

    Returns:
        dict with ``rms_m`` and ``max_m`` (tool-position distance [m]), ``ee_a``/``ee_b`` (n_steps, 3).
    """
    r = backend_a.scene.robot
    chain = KinematicChain(r.urdf, r.base_link, r.tip_link)
    q_t, w = free_space_targets(r.q_home, n_steps, seed)
    ea = ee_trajectory(backend_a, chain, q_t, w)
    eb = ee_trajectory(backend_b, chain, q_t, w)
    d = np.linalg.norm(ea - eb, axis=1)
    return {"rms_m": rms_distance(ea, eb), "max_m": float(d.max()), "ee_a": ea, "ee_b": eb}


def colour_mask(img: np.ndarray, rgba) -> np.ndarray:
    """Boolean (H, W) mask of the pixels of a saturated object colour under shading.

    Pixels whose dominant channel is the object's dominant channel and exceeds the other two by a factor 1.8
    (the red cube: r > 1.8 g and r > 1.8 b; the table, robot and the green marker fail this).
    """
    x = np.asarray(img, dtype=np.float64)
    c = int(np.argmax(rgba[:3]))
    others = [i for i in range(3) if i != c]
    return (x[..., c] > 40) & (x[..., c] > 1.8 * x[..., others[0]]) & (x[..., c] > 1.8 * x[..., others[1]])


def centroid(mask: np.ndarray) -> np.ndarray | None:
    """Pixel centroid (x = column, y = row) of a boolean mask, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])


def cube_centroid_difference(backend_a: Backend, backend_b: Backend, camera: str, size=(96, 96)) -> dict:
    """Render the current state of two backends (the caller puts them in the same state) from ``camera`` and
    compare the pixel centroid of the first scene object (segmented by colour).

    Returns:
        dict with ``diff_px`` (Euclidean centroid distance, nan if either mask is empty), ``centroid_a``/``_b``
        (x, y) and ``pixels_a``/``_b`` (mask areas).
    """
    obj = backend_a.scene.objects[0]
    H, W = size
    ma = colour_mask(backend_a.render(camera, H, W), obj.rgba)
    mb = colour_mask(backend_b.render(camera, H, W), obj.rgba)
    ca, cb = centroid(ma), centroid(mb)
    diff = float("nan") if ca is None or cb is None else float(np.linalg.norm(ca - cb))
    return {"diff_px": diff, "centroid_a": ca, "centroid_b": cb, "pixels_a": int(ma.sum()), "pixels_b": int(mb.sum())}


def scene_for(task) -> SceneSpec:
    """The scene an env for ``task`` (a :class:`~robot_rl.envs.tasks.Task`) builds, with default timing."""
    return SceneSpec(objects=task.objects, markers=task.markers)
