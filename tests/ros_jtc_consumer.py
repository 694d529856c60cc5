"""An independent consumer of the arm command stream, written WITHOUT robot_rl (importing it fails here): it records
every ``trajectory_msgs/JointTrajectory`` on a topic with its receive time, then replays the stream the way a
ros2_control ``joint_trajectory_controller`` would execute it (a new trajectory starts from the current desired
position and velocity, cubic Hermite segments through knots with velocities, linear through position-only knots,
the last knot held), under injected message delays, sampled at 1 kHz, and writes what it measured as JSON.

    python tests/ros_jtc_consumer.py OUT.json /arm_controller/joint_trajectory

Stops on SIGINT/SIGTERM. Checks per delay scenario: velocity jump at each join (finite differences at 1 kHz),
the largest acceleration per joint, trajectories that ran out before the next message although it was published on
rate (stops mid-motion; messages published late, e.g. after a stalled policy, are counted as publisher gaps), and
positions against given limits.
"""

import sys

sys.modules["robot_rl"] = None  # this consumer must not use robot_rl: an import of it raises ImportError

import json  # noqa: E402
import signal  # noqa: E402

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

DT = 0.001  # 1 kHz, a ros2_control update rate
STREAM_GAP = 0.5  # s: messages received closer than this belong to one continuous stream
ON_RATE = 0.2  # s: messages published closer than this (two control periods at 10 Hz): the publisher kept its rate


def hermite(q0, v0, q1, v1, h, s):
    s2, s3 = s * s, s * s * s
    return ((2 * s3 - 3 * s2 + 1) * q0 + (s3 - 2 * s2 + s) * h * v0 + (-2 * s3 + 3 * s2) * q1
            + (s3 - s2) * h * v1)


class Trajectory:
    """One applied trajectory: start (t0, q0, v0) then knots (t, q, v or None)."""

    def __init__(self, t0, q0, v0, knots):
        self.t, self.q, self.v = [t0], [q0], [v0]
        self.spline = all(k[2] is not None for k in knots)
        for t, q, v in knots:
            if t <= self.t[-1]:
                self.t[-1], self.q[-1] = t, q
                self.v[-1] = v if v is not None else np.zeros_like(q)
            else:
                self.t.append(t)
                self.q.append(q)
                self.v.append(v if v is not None else np.zeros_like(q))
        self.end = self.t[-1]

    def state(self, t):
        if t >= self.end:
            return self.q[-1], np.zeros_like(self.q[-1])
        if t <= self.t[0]:
            return self.q[0], self.v[0]
        i = int(np.searchsorted(self.t, t, side="right"))
        h = self.t[i] - self.t[i - 1]
        s = (t - self.t[i - 1]) / h
        if not self.spline:
            return (1 - s) * self.q[i - 1] + s * self.q[i], (self.q[i] - self.q[i - 1]) / h
        eps = 1e-6
        p = hermite(self.q[i - 1], self.v[i - 1], self.q[i], self.v[i], h, s)
        p2 = hermite(self.q[i - 1], self.v[i - 1], self.q[i], self.v[i], h, min(s + eps / h, 1.0))
        return p, (p2 - p) / eps


def replay(msgs, times):
    """Apply each message at ``times`` (kept in order), sample the desired positions at 1 kHz. A message starts
    from the controller's desired state then (the held last knot once the previous trajectory ended), except the
    first of a new stream (received ``STREAM_GAP`` or more after the previous message: between episodes, when the
    simulator may have reset the arm), which starts from the measured positions at rest."""
    apply, last = [], -np.inf
    for t in times:
        last = max(last, t)
        apply.append(last)
    rx = [m[0] for m in msgs]
    trajs, cur, fresh = [], None, []
    for i, (a, (_, knots, measured, stamp, _)) in enumerate(zip(apply, msgs)):
        fresh.append(i == 0 or (a >= cur.end and rx[i] - rx[i - 1] >= STREAM_GAP))
        if fresh[-1]:
            q0, v0 = np.asarray(measured), np.zeros(len(measured))
        else:
            q0, v0 = cur.state(a)
        t0 = stamp if stamp > 0 else a  # header.stamp 0: start on receipt; else knots are at stamp + time_from_start
        pts = [(t0 + t, np.asarray(q), None if v is None else np.asarray(v)) for t, q, v in knots if t0 + t > a]
        cur = Trajectory(a, q0, v0, pts or [(a, np.asarray(knots[-1][1]), None)])  # all knots past: hold the last
        trajs.append(cur)
    t_end = max(tr.end for tr in trajs) + 0.05
    ts = np.arange(apply[0], t_end, DT)
    idx = np.searchsorted(apply, ts, side="right") - 1
    qs = np.stack([trajs[i].state(t)[0] for i, t in zip(idx, ts)])
    return np.asarray(apply), trajs, ts, qs, np.asarray(fresh)


def analyse(msgs, times, lower, upper):
    apply, trajs, ts, qs, new_stream = replay(msgs, times)  # new_stream: started from the measured positions
    v = np.diff(qs, axis=0) / DT
    acc = np.diff(v, axis=0) / DT
    rx_gap = np.r_[np.inf, np.diff([m[0] for m in msgs])]
    pub_gap = np.r_[np.inf, np.diff([m[4] for m in msgs])]
    inner = ~new_stream[1:] & ~np.isin(apply[1:], apply[new_stream])  # (a delayed message may land on a start)
    joins = np.searchsorted(ts, apply[1:][inner])  # sample index of each join within a stream
    jumps = [float(np.max(np.abs(v[k] - v[k - 1]))) for k in joins if 1 <= k < len(v)]
    starts = np.searchsorted(ts, apply[new_stream])  # a stream's start from the measured state is not a join
    keep = np.ones(len(acc), bool)
    for k in starts:
        keep[max(k - 2, 0):k + 1] = False
    acc = acc[keep]
    # a trajectory (not a one-knot stop from rest) that ran out before the next message was applied, although the
    # publisher sent that one on rate: the plan's horizon did not cover the delay. A message published later (a
    # stalled publisher: the bridge's watchdog hold brakes to rest, then the stream resumes) is counted apart.
    stops = sum(1 for i in range(1, len(msgs)) if len(msgs[i - 1][1]) >= 2 and apply[i] > trajs[i - 1].end + 1e-9
                and rx_gap[i] < STREAM_GAP and pub_gap[i] <= ON_RATE)
    out = {"messages": len(msgs), "samples": len(ts), "max_join_velocity_jump": max(jumps) if jumps else 0.0,
           "max_acceleration": np.max(np.abs(acc), axis=0).tolist(),
           "max_velocity": np.max(np.abs(v), axis=0).tolist(), "stops_mid_motion": stops,
           "publisher_gaps": int(np.sum((pub_gap > ON_RATE) & (rx_gap < STREAM_GAP))),
           "max_gap_between_applies": float(np.max(np.diff(apply))) if len(apply) > 1 else 0.0}
    if lower is not None:
        out["below_lower"] = float(np.max(np.asarray(lower) - qs))
        out["above_upper"] = float(np.max(qs - np.asarray(upper)))
    return out


def main():
    out_path, topic = sys.argv[1], sys.argv[2]
    limits = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    rclpy.init()
    node = rclpy.create_node("independent_jtc_consumer")
    msgs, names, measured = [], [], {}

    def on_js(m):
        measured.update(zip(m.name, m.position))

    def on_traj(m, info):
        t = node.get_clock().now().nanoseconds * 1e-9  # the clock header stamps are in (ROS time, no /clock here)
        published = info["source_timestamp"] * 1e-9  # the publisher's write time (DDS source timestamp, same clock)
        if not names:
            names.extend(m.joint_names)
        order = [list(m.joint_names).index(n) for n in names]
        knots = []
        for p in m.points:
            tfs = p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec
            vel = [p.velocities[j] for j in order] if len(p.velocities) else None
            knots.append((tfs, [p.positions[j] for j in order], vel))
        stamp = m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec
        msgs.append((t, knots, [measured.get(n, knots[0][1][j]) for j, n in enumerate(names)], stamp, published))

    node.create_subscription(JointState, "/joint_states", on_js, QoSProfile(depth=10,
                                                                            reliability=ReliabilityPolicy.RELIABLE))
    node.create_subscription(JointTrajectory, topic, on_traj, QoSProfile(depth=100,
                                                                         reliability=ReliabilityPolicy.RELIABLE))
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while not stop:
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.shutdown()
    result = {"joint_names": names, "messages": len(msgs),
              "points_per_message": [len(m[1]) for m in msgs][:2000],
              "with_velocities": all(all(p[2] is not None for p in m[1]) for m in msgs),
              "latency_ms": np.percentile([1e3 * (m[0] - m[3]) for m in msgs if m[3] > 0] or [0], [50, 99]).tolist(),
              "transport_ms": np.percentile([1e3 * (m[0] - m[4]) for m in msgs] or [0], [50, 99, 100]).tolist()}
    if len(msgs) >= 2:
        rng = np.random.default_rng(0)
        lo, hi = limits.get("lower"), limits.get("upper")
        rx, pub = np.array([m[0] for m in msgs]), np.array([m[4] for m in msgs])
        result["scenarios"] = {
            "as_published": analyse(msgs, pub, lo, hi),  # the plan itself: no transport, independent of host load
            "no_delay": analyse(msgs, rx, lo, hi),  # on receipt: + DDS transport and this process's scheduling
            "random_0_150ms": analyse(msgs, rx + rng.uniform(0.0, 0.15, len(msgs)), lo, hi),
            "every_other_150ms": analyse(msgs, rx + np.where(np.arange(len(msgs)) % 2 == 1, 0.15, 0.0), lo, hi),
        }
    result["raw"] = [list(m) for m in msgs]  # receive time, knots (tfs, positions, velocities), measured, stamp,
    # publish time
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
