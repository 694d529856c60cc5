"""Domain randomization on real MuJoCo and PyBullet: seeded determinism, physics that really changes, the sensing
chain (noise, latency), visuals, per-episode store metadata, bad input, and a tiny ``robot-rl transfer`` run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from robot_rl.stages.collect import collect
from robot_rl.envs.env import make_env
from robot_rl.errors import ConfigError
from robot_rl.envs.experts import ScriptedExpert
from robot_rl.envs.randomization import PRESETS, resolve
from robot_rl.envs.vector import make_vector_env
from robot_rl.datasets.store import ZarrStore

BACKENDS = ["mujoco", "pybullet"]
CLI = [sys.executable, "-m", "robot_rl.cli"]


def _rollout(env, seed, n=30):
    obs, info = env.reset(seed=seed)
    ex = ScriptedExpert("place", noise=0.2, seed=seed)
    traj = []
    for _ in range(n):
        obs, *_ = env.step(ex.act(obs))
        traj.append(np.concatenate([obs["ee_pos"], obs["cube_pos"], obs["joint_pos"], obs["gripper_width"]]))
    return info["randomization"], np.array(traj)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_parameters_and_trajectory(backend):
    e = make_env("place", backend, randomization="default")
    p7, a = _rollout(e, 7)
    p8, c = _rollout(e, 8)
    p7b, b = _rollout(e, 7)
    e.close()
    assert p7 == p7b and p7 != p8
    assert json.loads(json.dumps(p7)) == p7  # plain JSON
    assert set(p7) == {"physics", "sensing", "visual"}
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[-1], c[-1])


def test_sample_is_shared_code_not_per_backend():
    """The same seed draws the same parameters on both backends (one sampler; backends only apply them)."""
    infos = []
    for backend in BACKENDS:
        e = make_env("place", backend, randomization="default")
        infos.append(e.reset(seed=3)[1]["randomization"])
        e.close()
    assert infos[0] == infos[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_physics_parameters_reach_the_simulator_and_change_behaviour(backend):
    spec = {"physics": {"object_mass": 10.0, "object_friction": 0.1, "joint_damping": 3.0, "actuator_gain": 0.5}}
    nominal, rand = make_env("lift", backend), make_env("lift", backend, randomization=spec)
    nominal.reset(seed=0)
    _, info = rand.reset(seed=0)
    n, r = nominal.backend.get_physics(), rand.backend.get_physics()
    assert info["randomization"]["physics"]["object_mass"] == 10.0
    assert r["object_mass"]["cube"] == pytest.approx(10.0 * n["object_mass"]["cube"])
    assert r["object_friction"]["cube"] == pytest.approx(0.1 * n["object_friction"]["cube"])
    np.testing.assert_allclose(r["joint_damping"], 3.0 * np.asarray(n["joint_damping"]))
    np.testing.assert_allclose(r["actuator_gain"], 0.5 * np.asarray(n["actuator_gain"]))
    # behaviour: the scripted lift succeeds on the nominal cube; a 10x heavier, 10x more slippery one slips out
    results = []
    for env in (nominal, rand):
        obs, _ = env.reset(seed=0)
        ex = ScriptedExpert("lift", seed=0)
        while True:
            obs, _, term, trunc, info = env.step(ex.act(obs))
            if term or trunc:
                break
        results.append(info["success"])
    assert results == [True, False]
    # factors are absolute (relative to the nominal scene), not cumulative: factor 1 restores the nominal values
    rand.backend.set_physics({"object_mass": 1.0, "object_friction": 1.0, "joint_damping": [1.0] * 7,
                              "actuator_gain": [1.0] * 7})
    assert rand.backend.get_physics() == n
    nominal.close()
    rand.close()


def _step_response(backend, physics):
    """Joints 2 and 4 moved after one control step towards a +0.2 rad target step (rad)."""
    e = make_env("lift", backend, randomization={"physics": physics} if physics else None)
    e.reset(seed=0)
    q = np.array(e.backend.joint_state()[0])
    target = q.copy()
    target[[1, 3]] += 0.2
    e.backend.set_targets(target, 0.04)
    e.backend.step()
    moved = (np.array(e.backend.joint_state()[0]) - q)[[1, 3]]
    e.close()
    return moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_servo_gain_and_damping_change_the_simulated_step_response(backend):
    """What get_physics reports is what the simulator does: half the actuator gain moves the joints much less in
    one control step; 20x joint damping slows them measurably."""
    nominal = _step_response(backend, None)
    assert np.all(nominal > 0.1)
    assert np.all(_step_response(backend, {"actuator_gain": 0.5}) < 0.8 * nominal)
    assert np.all(_step_response(backend, {"joint_damping": 20.0}) < nominal - 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_restore_brings_back_the_episode_parameters(backend):
    """get_state/set_state carry the sample, latency buffers and noise generator: an exact continuation even after
    another episode (other physics) ran in between."""
    spec = {"preset": "default", "sensing": {"action_latency": 1, "obs_latency": 1}}
    e = make_env("place", backend, randomization=spec)
    obs, _ = e.reset(seed=5)
    ex = ScriptedExpert("place", seed=5)
    for _ in range(15):
        obs, *_ = e.step(ex.act(obs))
    state = e.get_state()
    acts = [np.random.default_rng(i).uniform(-1, 1, 5) for i in range(10)]
    first = [e.step(a)[0] for a in acts]
    e.reset(seed=9)
    e.set_state(state)
    second = [e.step(a)[0] for a in acts]
    for x, y in zip(first, second):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    e.close()


def test_latency_delays_actions_and_observations_exactly():
    """obs_latency 2 + action_latency 1 == the nominal env driven by [hold] + actions, observed 2 steps late."""
    off = make_env("place")
    lat = make_env("place", randomization={"sensing": {"obs_latency": 2, "action_latency": 1}})
    acts = [np.random.default_rng(i).uniform(-1, 1, 5) for i in range(8)]
    hold = np.array([0.0, 0.0, 0.0, 0.0, -1.0])  # stay, gripper open as at reset
    o_off = [off.reset(seed=4)[0]] + [off.step(a)[0] for a in [hold] + acts[:-1]]
    o_lat = [lat.reset(seed=4)[0]] + [lat.step(a)[0] for a in acts]
    for t, o in enumerate(o_lat):
        for k in o:
            np.testing.assert_array_equal(o[k], o_off[max(t - 2, 0)][k], err_msg=f"step {t} key {k}")
    off.close()
    lat.close()


def test_observation_noise_only_changes_what_the_agent_sees():
    e = make_env("place", randomization={"sensing": {"obs_noise": {"cube_pos": 0.01, "cube_quat": 0.05}}})
    obs, _ = e.reset(seed=2)
    diffs = []
    for _ in range(20):
        true_pos, _ = e.backend.object_pose("cube")
        diffs.append(obs["cube_pos"] - true_pos)
        np.testing.assert_allclose(obs["cube_to_target"], obs["target_pos"] - obs["cube_pos"], atol=1e-6)
        assert abs(np.linalg.norm(obs["cube_quat"]) - 1.0) < 1e-5
        obs, *_ = e.step(np.zeros(5, dtype=np.float32))
    assert 0.005 < np.std(diffs) < 0.02
    e.close()


def test_observation_bias_is_one_offset_per_episode_recorded_in_its_sample():
    """sensing.obs_bias: a constant offset per episode (a calibration error) in [-half, half], on what the agent
    sees only, the same for the same seed, recorded in info["randomization"], restored with the env's state."""
    spec = {"sensing": {"obs_bias": {"gripper_width": 0.005, "cube_pos": 0.002}}}
    e, nominal = make_env("place", randomization=spec), make_env("place")
    offsets = []
    for seed in (3, 4, 3):
        obs, info = e.reset(seed=seed)
        ref, _ = nominal.reset(seed=seed)
        bias = info["randomization"]["sensing"]["obs_bias"]
        assert set(bias) == {"gripper_width", "cube_pos"} and len(bias["cube_pos"]) == 3
        acts = [np.random.default_rng(i).uniform(-1, 1, 5) for i in range(6)]
        for a in [None, *acts]:
            if a is not None:
                obs, ref = e.step(a)[0], nominal.step(a)[0]
            np.testing.assert_allclose(obs["gripper_width"] - ref["gripper_width"], bias["gripper_width"], atol=1e-6)
            np.testing.assert_allclose(obs["cube_pos"] - ref["cube_pos"], bias["cube_pos"], atol=1e-6)
            np.testing.assert_allclose(obs["cube_to_target"], obs["target_pos"] - obs["cube_pos"], atol=1e-6)
            np.testing.assert_array_equal(obs["ee_pos"], ref["ee_pos"])
        assert abs(bias["gripper_width"][0]) <= 0.005 and max(map(abs, bias["cube_pos"])) <= 0.002
        offsets.append(bias)
        if seed == 4:
            state = e.get_state()
            after = [e.step(a)[0] for a in acts[:2]]
    assert offsets[0] == offsets[2] and offsets[0] != offsets[1]  # seeded per episode
    e.set_state(state)  # episode 3 ran meanwhile, with other offsets
    for x, y in zip(after, [e.step(a)[0] for a in acts[:2]]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    e.close()
    nominal.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_visual_and_camera_randomization_change_images_deterministically(backend):
    kw = dict(cameras=("front",), image_size=(48, 48))
    nominal = make_env("place", backend, **kw)
    rand = make_env("place", backend, randomization={"visual": PRESETS["default"]["visual"],
                                                     "sensing": {"camera_pos": 0.02, "camera_angle": 0.05}}, **kw)
    img0 = nominal.reset(seed=1)[0]["image_front"].astype(int)
    img1 = rand.reset(seed=1)[0]["image_front"].astype(int)
    img2 = rand.reset(seed=2)[0]["image_front"].astype(int)
    assert np.abs(img1 - rand.reset(seed=1)[0]["image_front"]).max() == 0
    assert np.abs(img1 - img0).mean() > 2 and np.abs(img1 - img2).mean() > 2
    nominal.close()
    rand.close()


def test_collected_episodes_store_their_randomization(tmp_path):
    collect(tmp_path / "s.zarr", "lift", 2, backend="pybullet", randomization="default", only_success=False,
            progress=False)
    store = ZarrStore.open(tmp_path / "s.zarr")
    env = make_env("lift", "pybullet", randomization="default")
    metas = store.episodes_meta()
    assert len(metas) == 2 and metas[0]["extra"]["randomization"] != metas[1]["extra"]["randomization"]
    for m in metas:
        expect = env.reset(seed=m["seed"])[1]["randomization"]
        assert m["extra"]["randomization"] == expect and expect["physics"]["object_mass"] > 0
    env.close()


@pytest.mark.parametrize("spec,field", [
    ({"physics": {"mass": [0.5, 2.0]}}, "randomization.physics.mass"),
    ({"physic": {"object_mass": 1.0}}, "randomization.physic"),
    ({"physics": {"object_mass": [0.0, 2.0]}}, "randomization.physics.object_mass"),
    ({"physics.actuator_gain": [1.2, 0.8]}, "randomization.physics.actuator_gain"),
    ({"sensing": {"action_latency": [0, 11]}}, "randomization.sensing.action_latency"),
    ({"sensing": {"obs_noise": {"cube_pos": -0.1}}}, "randomization.sensing.obs_noise.cube_pos"),
    ({"sensing": {"obs_noise": {"banana": 0.1}}}, "randomization.sensing.obs_noise.banana"),
    ({"sensing": {"obs_bias": {"cube_to_target": 0.1}}}, "randomization.sensing.obs_bias.cube_to_target"),
    ({"sensing": {"obs_bias": {"gripper_width": 2.0}}}, "randomization.sensing.obs_bias.gripper_width"),
    ({"visual": {"light": [0.5, 4.0]}}, "randomization.visual.light"),
    ("strong", "randomization.preset"),
])
def test_bad_randomization_is_a_one_line_config_error(spec, field):
    with pytest.raises(ConfigError) as ei:
        make_env("place", randomization=spec)
    assert ei.value.field == field and "\n" not in str(ei.value) and "->" in str(ei.value)
    with pytest.raises(ConfigError):  # vector envs fail in the parent process, before any worker starts
        make_vector_env("place", 2, randomization=spec)


def test_newcombe_interval_matches_the_published_example():
    from robot_rl.stages.evaluation import wilson_interval
    from robot_rl.stages.transfer import newcombe_diff

    r = lambda k, n: {"success_rate": k / n, "ci95": wilson_interval(k, n)}  # noqa: E731
    d, lo, hi = newcombe_diff(r(56, 70), r(48, 80))  # Newcombe (1998), Table II, method 10: 0.0524 to 0.3339
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (0.2, 0.0524, 0.3339)


def test_presets_and_overrides():
    assert resolve(None) == {} and resolve("none") == {}
    d = resolve({"preset": "default", "physics.object_mass": [0.9, 1.1], "sensing": {"obs_noise": {"cube_pos": 0.0}},
                 "visual": {"light": None}})
    assert d["physics.object_mass"] == (0.9, 1.1) and "visual.light" not in d
    assert d["sensing.obs_noise"]["cube_pos"] == 0.0 and d["sensing.obs_noise"]["joint_pos"] > 0
    assert resolve({"physics": {"object_friction": 1.2}}) == {"physics.object_friction": (1.2, 1.2)}


def _cli(*args, cwd=None):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from robot_rl.policies import make_policy
    from robot_rl.policies.base import PolicyConfig
    from robot_rl.policies.checkpoint import save_policy

    torch.manual_seed(0)
    keys = {"ee_pos": 3, "cube_pos": 3}
    st = lambda d: {"min": np.full(d, -1, np.float32), "max": np.full(d, 1, np.float32),  # noqa: E731
                    "mean": np.zeros(d, np.float32), "std": np.ones(d, np.float32)}
    pol = make_policy(PolicyConfig(kind="bc", obs_keys=list(keys), obs_dims=keys, action_dim=5, bc_hidden=[32]),
                      {"ee_pos": st(3), "cube_pos": st(3), "action": st(5)})
    return save_policy(pol.freeze(), tmp_path_factory.mktemp("ck") / "base")


def test_transfer_cli_writes_its_table(tiny_checkpoint, tmp_path):
    out = tmp_path / "tr"
    r = _cli("transfer", "--checkpoint", tiny_checkpoint, "--task", "lift", "--train-backend", "mujoco",
             "--eval-backend", "pybullet", "--episodes", 2, "--n-envs", 1, "--videos", 1, "--out", out,
             "--set", "env.max_steps=8", "--set", "randomization.physics.object_mass=[0.5,2.0]")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    rows = rep["results"]
    assert [(x["backend"], x["randomized"]) for x in rows] == [("mujoco", False), ("mujoco", True),
                                                              ("pybullet", False), ("pybullet", True)]
    for x in rows:
        assert x["episodes"] == 2 and 0.0 <= x["ci95"][0] <= x["success_rate"] <= x["ci95"][1] <= 1.0
    assert rep["randomization"]["resolved"]["physics"]["object_mass"] == [0.5, 2.0]
    md = (out / "report.md").read_text()
    assert md.count("\n| mujoco") == 2 and md.count("\n| pybullet") == 2 and "Wilson" in md
    vids = sorted(p.name for p in (out / "videos").glob("*.mp4"))
    assert len(vids) == 4 and vids[0].startswith("mujoco_nominal")


def test_transfer_cli_bad_randomization_is_one_line(tiny_checkpoint, tmp_path):
    r = _cli("transfer", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "x",
             "--set", "randomization.physics.mass=[0.5,2.0]")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "randomization.physics.mass" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "x").exists()
