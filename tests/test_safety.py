"""Safety module: 10 000 random (partly hostile) commands through the filter -> zero limit violations."""

import numpy as np
import pytest

from robot_rl.errors import ConfigError
from robot_rl.robot.kinematics import KinematicChain
from robot_rl.robot.safety import EStopLatch, JointLimits, SafetyConfig, SafetyFilter, Watchdog
from robot_rl.robot.scene import RobotSpec


@pytest.fixture(scope="module")
def panda():
    r = RobotSpec()
    chain = KinematicChain(r.urdf, r.base_link, r.tip_link)
    return r, chain, JointLimits.from_urdf(r.urdf, r.arm_joints)


def test_limits_parsed_from_urdf(panda):
    r, chain, lim = panda
    assert lim.names == r.arm_joints
    np.testing.assert_allclose(lim.lower, chain.lower)
    np.testing.assert_allclose(lim.upper, chain.upper)
    np.testing.assert_allclose(lim.velocity, [2.175] * 4 + [2.61] * 3)
    with pytest.raises(ConfigError, match="panda_joint99"):
        JointLimits.from_urdf(r.urdf, ["panda_joint99"])


def test_10000_random_commands_zero_violations(panda):
    r, chain, lim = panda
    cfg = SafetyConfig(joint_margin=0.01, velocity_scale=0.8, max_joint_delta=0.2,
                       workspace_low=(0.3, -0.3, 0.05), workspace_high=(0.7, 0.3, 0.4))
    f = SafetyFilter(lim, lambda q: chain.pose(q)[0], cfg)
    rng = np.random.default_rng(0)
    q = np.array(r.q_home)
    assert f.box_distance(q) == 0.0
    viol = {"position": 0, "velocity": 0, "delta": 0, "workspace": 0, "nonfinite": 0}
    moved = 0
    span = lim.upper - lim.lower
    for i in range(10_000):
        dt = float(rng.choice([0.0, 0.01, 0.1, 0.5, rng.uniform(0, 1)]))
        kind = i % 5
        if kind == 0:  # anywhere in (and beyond) the joint range
            cmd = lim.lower - 0.5 * span + rng.uniform(size=7) * 2 * span
        elif kind == 1:  # small plausible step
            cmd = q + rng.normal(0, 0.05, 7)
        elif kind == 2:  # huge values
            cmd = q + rng.normal(0, 1e6, 7)
        elif kind == 3:  # NaN / inf somewhere
            cmd = q.copy()
            cmd[rng.integers(7)] = rng.choice([np.nan, np.inf, -np.inf])
        else:  # step toward a random joint-space point (often leaves the workspace box)
            cmd = q + 0.3 * (rng.uniform(lim.lower, lim.upper) - q)
        out, rep = f.filter(cmd, q, dt)
        if not np.all(np.isfinite(out)):
            viol["nonfinite"] += 1
        if np.any(out < lim.lower + cfg.joint_margin - 1e-12) or np.any(out > lim.upper - cfg.joint_margin + 1e-12):
            viol["position"] += 1
        if np.any(np.abs(out - q) > cfg.max_joint_delta + 1e-12):
            viol["delta"] += 1
        if np.any(np.abs(out - q) > cfg.velocity_scale * lim.velocity * dt + 1e-12):
            viol["velocity"] += 1
        tool = chain.pose(out)[0]  # independent of the filter's own box_distance
        if np.any(tool < np.array(cfg.workspace_low) - 1e-9) or np.any(tool > np.array(cfg.workspace_high) + 1e-9):
            viol["workspace"] += 1
        if kind == 3:
            assert rep.rejected and np.array_equal(out, q)
        moved += int(np.any(out != q))
        q = out
    assert viol == {k: 0 for k in viol}, viol
    s = f.stats
    assert moved > 5000, moved  # a filter that refused everything would pass the checks above
    assert s["commands"] == 10_000 and s["rejected"] == 2000
    assert s["clipped_position"] > 0 and s["clipped_delta"] > 0 and s["clipped_workspace"] > 0


def test_outside_box_only_moves_back(panda):
    r, chain, lim = panda
    f = SafetyFilter(lim, lambda q: chain.pose(q)[0], SafetyConfig(workspace_low=(0.3, -0.3, 0.3)))
    q = np.array(r.q_home)  # tool z = 0.21 < 0.3: outside
    d0 = f.box_distance(q)
    assert d0 > 0
    step = np.array([0, 0.1, 0, 0.1, 0, 0, 0])
    out, rep = f.filter(q + step, q, 0.1)  # moves down/forward, further out: refused
    assert f.box_distance(out) <= d0 + 1e-12 and rep.clipped_workspace
    out, rep = f.filter(q - step, q, 0.1)  # back towards the box: let through
    assert np.any(out != q) and f.box_distance(out) < d0 - 1e-3


def test_watchdog_and_estop():
    w = Watchdog(0.25)
    assert w.expired(0.0)
    w.kick(1.0)
    assert not w.expired(1.2) and w.expired(1.26)
    e = EStopLatch()
    e.trigger("button")
    assert e.active and e.reason == "button"
    e.trigger("again")
    assert e.active and e.clear() and not e.active and e.history == ["button", "again"]
    with pytest.raises(ConfigError):
        SafetyConfig(workspace_low=(1, 0, 0), workspace_high=(0, 1, 1)).validate()


def test_sim_robot_trajectory_follower_interpolates_like_joint_trajectory_controller():
    """Position-only points: linear interpolation by time_from_start from the command at the start, the last point
    held afterwards, a new command cancels the trajectory."""
    from robot_rl.robot.trajectory import TrajectoryFollower

    f = TrajectoryFollower(np.zeros(2))
    assert not f.active and np.array_equal(f.target(5.0), [0.0, 0.0])
    f.trajectory(10.0, np.zeros(2), [(0.5, np.array([1.0, -1.0])), (1.5, np.array([1.0, 1.0]))])
    assert f.active
    np.testing.assert_allclose(f.target(9.0), [0.0, 0.0])       # before the start: the start knot
    np.testing.assert_allclose(f.target(10.25), [0.5, -0.5])    # halfway to the first point
    np.testing.assert_allclose(f.target(11.0), [1.0, 0.0])      # halfway between the two points
    np.testing.assert_allclose(f.target(12.0), [1.0, 1.0])      # after the end: the last point, held
    assert not f.active
    f.trajectory(20.0, f.target(20.0), [(0.0, np.array([3.0, 3.0]))])  # a point at t=0 replaces the start knot
    np.testing.assert_allclose(f.target(20.0), [3.0, 3.0])
    f.command(np.array([7.0, 7.0]))
    assert not f.active and np.array_equal(f.target(21.0), [7.0, 7.0])


def test_published_profiles_and_tighter_of_urdf_and_profile(panda):
    """Franka's published limits (robot_rl/robot/profiles.py) picked by joint names; per joint the tighter of URDF
    and profile wins (positions, velocity), the profile adds acceleration limits; from_urdf itself is unchanged."""
    from robot_rl.robot.profiles import FR3, PANDA, PROFILES, profile_for, select_profile

    r, chain, lim = panda
    assert set(PROFILES) == {"panda", "fr3"}
    assert profile_for(r.arm_joints) is PANDA and profile_for(r.finger_joints) is PANDA
    assert profile_for([f"fr3_joint{i}" for i in range(1, 8)]) is FR3
    assert profile_for(["joint1"]) is None and profile_for([]) is None
    assert select_profile("auto", r.arm_joints) is PANDA and select_profile("none", r.arm_joints) is None
    for p in (PANDA, FR3):
        arm = [j for j in p.joints if "finger" not in j.name]
        assert len(arm) == 7 and all(j.lower < j.upper and j.velocity > 0 and j.acceleration > 0 for j in arm)
    assert np.isinf(lim.acceleration).all()  # unknown in a URDF
    t = lim.tighten(PANDA)
    assert t.names == lim.names and np.isinf(lim.acceleration).all()  # a new object; lim unchanged
    # pybullet_data's panda.urdf is looser than the published Panda limits (issue 22): the profile wins there
    np.testing.assert_allclose(t.upper, [2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
    np.testing.assert_allclose(t.lower, [-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
    np.testing.assert_allclose(t.velocity, [2.175] * 4 + [2.61] * 3)
    np.testing.assert_allclose(t.acceleration, [15, 7.5, 10, 12.5, 15, 20, 20])
    assert np.all(t.lower >= lim.lower) and np.all(t.upper <= lim.upper) and lim.tighten(None) is lim
    # the URDF wins where it is tighter: a 1 rad/s URDF velocity and a narrower joint-1 range stay
    narrow = JointLimits(lim.names, lim.lower / 2, lim.upper.copy(), np.ones(7))
    t2 = narrow.tighten(PANDA)
    np.testing.assert_allclose(t2.velocity, 1.0)
    assert t2.lower[0] == narrow.lower[0] and t2.upper[0] == 2.8973
    # joints the profile does not cover keep their URDF limits
    mixed = JointLimits(("panda_joint1", "other"), np.array([-3.0, -1.0]), np.array([3.0, 1.0]), np.ones(2))
    t3 = mixed.tighten(PANDA)
    assert t3.upper.tolist() == [2.8973, 1.0] and t3.acceleration[1] == np.inf
    with pytest.raises(ConfigError) as e:  # ranges that do not overlap: different robots
        JointLimits(("panda_joint4",), np.array([0.5]), np.array([1.0]), np.ones(1)).tighten(PANDA)
    assert e.value.field == "robot_profile"
    with pytest.raises(ConfigError) as e:
        select_profile("ur5", r.arm_joints)
    assert e.value.field == "robot_profile"
    with pytest.raises(ConfigError):  # a named profile must cover the joints
        select_profile("fr3", r.arm_joints)
