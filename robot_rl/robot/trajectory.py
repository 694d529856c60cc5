"""Joint trajectories as a ros2_control ``joint_trajectory_controller`` (JTC) runs them, and the knots the arm bridge
sends so that a real arm moves smoothly through the policy's steps.

JTC semantics reproduced by :class:`TrajectoryFollower` (ros2_controllers' ``joint_trajectory_controller``,
"Trajectory representation" and "Trajectory replacement" in its documentation): a new trajectory replaces the
current one; it starts from the controller's current desired state (position and velocity) at its start time
(``header.stamp`` 0 = on receipt), and joins the knots by linear segments when they carry positions only, or by
cubic Hermite segments when they also carry velocities (the ``splines`` interpolation, position + velocity), so a
replacing trajectory with velocities joins without a velocity jump. After the last knot the last position is held.

:func:`plan_knots` makes those knots from the joint targets of consecutive control steps (the arm bridge's IK of
this step's action and of the rest of the planned action chunk): knot i at ``i * period`` (minus an optional lead),
velocities by central differences (Catmull-Rom), zero at the last knot, then, per joint and segment, each knot is
moved (never more than needed) so that both end accelerations of its cubic segment, which bound the acceleration
over the segment since a cubic's acceleration is linear in time, stay within ``acc_max``, and its velocity within
``vel_max``. The trajectory thus spans several control periods: a late next message finds the arm still moving
along the plan, not stopped at its first knot.

Units: rad, rad/s, rad/s^2, seconds. Arrays are float64 (J,) per knot, (n, J) for n knots.
"""

from __future__ import annotations

import numpy as np


def hermite(q0, v0, q1, v1, h: float, s):
    """Position, velocity and acceleration of the cubic Hermite segment from (q0, v0) to (q1, v1) over ``h``
    seconds at fraction ``s`` in [0, 1] (scalar): (J,) arrays each."""
    s2, s3 = s * s, s * s * s
    p = (2 * s3 - 3 * s2 + 1) * q0 + (s3 - 2 * s2 + s) * h * v0 + (-2 * s3 + 3 * s2) * q1 + (s3 - s2) * h * v1
    v = ((6 * s2 - 6 * s) * q0 + (3 * s2 - 4 * s + 1) * h * v0 + (-6 * s2 + 6 * s) * q1 + (3 * s2 - 2 * s) * h * v1) / h
    a = ((12 * s - 6) * q0 + (6 * s - 4) * h * v0 + (-12 * s + 6) * q1 + (6 * s - 2) * h * v1) / (h * h)
    return p, v, a


class TrajectoryFollower:
    """The desired state of a JTC (module doc). ``command(q)`` holds a position (a forward command, cancelling any
    trajectory); ``trajectory(t_start, q_start, points)`` follows ``points`` = [(time_from_start s, positions (J,))
    or (time_from_start, positions, velocities (J,))]; ``state(t)`` -> (position, velocity); ``target(t)`` ->
    position (the last knot is held, and the trajectory dropped, once ``t`` passes it)."""

    def __init__(self, q0):
        self.command(q0)

    @property
    def active(self) -> bool:
        return self.ts is not None

    def command(self, q) -> None:
        """Constant position command; cancels any trajectory."""
        self.hold = np.array(q, dtype=np.float64)
        self.ts = self.qs = self.vs = None

    def trajectory(self, t_start: float, q_start, points: list, v_start=None) -> None:
        """Follow ``points`` from ``q_start`` at ``t_start`` (velocity ``v_start``; default: the current desired
        velocity, so a replacing trajectory joins smoothly). With velocities in the points the segments are cubic
        Hermite, else linear; a point at (or before) the start replaces the start knot."""
        v0 = self.state(t_start)[1] if v_start is None else np.asarray(v_start, dtype=np.float64)
        with_v = bool(points) and all(len(p) > 2 and p[2] is not None for p in points)
        ts, qs, vs = [t_start], [np.asarray(q_start, dtype=np.float64)], [v0]
        for p in points:
            t, q = t_start + float(p[0]), np.asarray(p[1], dtype=np.float64)
            v = np.asarray(p[2], dtype=np.float64) if with_v else np.zeros_like(q)
            if t <= ts[-1]:
                ts[-1], qs[-1], vs[-1] = t, q, v
            else:
                ts.append(t)
                qs.append(q)
                vs.append(v)
        self.ts, self.qs = np.array(ts), np.stack(qs)
        self.vs = np.stack(vs) if with_v else None

    def state(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Desired (position, velocity) at time ``t``."""
        if self.ts is None or t >= self.ts[-1]:
            q = self.hold if self.ts is None else self.qs[-1]
            return q.copy(), np.zeros_like(q)
        if t <= self.ts[0]:
            return self.qs[0].copy(), (self.vs[0].copy() if self.vs is not None else np.zeros_like(self.qs[0]))
        i = int(np.searchsorted(self.ts, t, side="right"))
        h = self.ts[i] - self.ts[i - 1]
        s = (t - self.ts[i - 1]) / h
        if self.vs is None:
            return (1 - s) * self.qs[i - 1] + s * self.qs[i], (self.qs[i] - self.qs[i - 1]) / h
        p, v, _ = hermite(self.qs[i - 1], self.vs[i - 1], self.qs[i], self.vs[i], h, s)
        return p, v

    def target(self, t: float) -> np.ndarray:
        if self.ts is not None and t >= self.ts[-1]:
            self.command(self.qs[-1])
        return self.state(t)[0]


def plan_knots(q_start, v_start, q_steps, period: float, *, vel_max, acc_max, lead: float = 0.0,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knots of a smooth trajectory through the joint targets of consecutive control steps (module doc).

    Args:
        q_start, v_start: (J,) the desired position and velocity when the trajectory starts (what the controller
            is following then; at rest: the measured position and zeros).
        q_steps: (n, J) joint targets of the next n control steps (step i reached at ``(i + 1) * period``).
        period: control period [s] (> 0).
        vel_max, acc_max: (J,) limits [rad/s], [rad/s^2] (> 0; inf allowed for no limit).
        lead: knots come this much earlier [s] (0 <= lead < period): a servo tracking the trajectory lags it.

    Returns:
        (times (m,) time_from_start [s], positions (m, J), velocities (m, J)), m >= n: braking knots (one per
        period) follow when the last target's velocity cannot reach 0 within ``acc_max``; the last velocity is 0.
    """
    q_steps = np.atleast_2d(np.asarray(q_steps, dtype=np.float64))
    n = len(q_steps)
    q0, v0 = np.asarray(q_start, dtype=np.float64), np.asarray(v_start, dtype=np.float64)
    vmax, amax = np.asarray(vel_max, dtype=np.float64), np.asarray(acc_max, dtype=np.float64)
    times = (np.arange(1, n + 1) * period - lead).astype(np.float64)
    t_all = np.concatenate([[0.0], times])
    q_all = np.vstack([q0, q_steps])
    v_des = np.zeros_like(q_steps)
    for i in range(1, n):  # knot i of q_all (= q_steps[i - 1]); the last knot keeps velocity 0
        v_des[i - 1] = (q_all[i + 1] - q_all[i - 1]) / (t_all[i + 1] - t_all[i - 1])
    qs, vs = np.empty_like(q_steps), np.empty_like(q_steps)
    q_a, v_a = q0, np.clip(v0, -vmax, vmax)
    for i in range(n):
        h = t_all[i + 1] - t_all[i]
        v_b = np.clip(np.clip(v_des[i], v_a - amax * h, v_a + amax * h), -vmax, vmax)
        # both end accelerations of the cubic within +-amax: 6 * (q_b - q_a) in [hi - amax h^2, lo + amax h^2]
        lo = np.minimum(4 * h * v_a + 2 * h * v_b, 2 * h * v_a + 4 * h * v_b)
        hi = np.maximum(4 * h * v_a + 2 * h * v_b, 2 * h * v_a + 4 * h * v_b)
        d = np.clip(q_steps[i] - q_a, (hi - amax * h * h) / 6, (lo + amax * h * h) / 6)
        q_b = q_a + np.where(np.isfinite(d), d, q_steps[i] - q_a)
        qs[i], vs[i] = q_b, v_b
        q_a, v_a = q_b, v_b
    times, qs, vs = list(times), list(qs), list(vs)
    for _ in range(64):  # the last knot was given velocity 0 but may not reach it within acc_max: brake further
        if not np.any(np.abs(v_a) > 1e-9):
            break
        h = period
        v_b = v_a - np.clip(v_a, -amax * h, amax * h)
        q_a = q_a + h * (v_a + v_b) / 2  # constant deceleration (v_b - v_a) / h on this segment
        v_a = v_b
        times.append(times[-1] + h)
        qs.append(q_a)
        vs.append(v_a)
    vs[-1] = np.zeros_like(vs[-1])
    return np.array(times), np.stack(qs), np.stack(vs)
