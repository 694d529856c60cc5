"""Rollouts on a real 2-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a second node, each its own
raylet, on this machine): evaluation equals the local vector env episode by episode (and the recorded episodes byte
for byte) with env workers on both nodes; a worker killed with SIGKILL mid-episode is restarted and its episode
re-run from the seed, with nothing counted twice; residual PPO and the TD3 actor-learner split run on the cluster,
the latter surviving a killed actor."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import ray  # the `ray` extra (scripts/setup.sh installs it)
from ray.cluster_utils import Cluster

from robot_rl.datasets.store import ZarrStore
from robot_rl.envs.experts import ScriptedExpert
from robot_rl.envs.vector import EVAL_SEED_START, make_vector_env, reset_some
from robot_rl.stages.evaluation import evaluate

TASK = "place"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c.address
    ray.shutdown()
    c.shutdown()


def _procs(title: str) -> list[int]:
    """PIDs of this machine's processes whose title starts with ``title`` (Ray names its workers ray::Class)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().startswith(title.encode()):
                        out.append(int(d))
            except OSError:
                pass
    return out


class ExpertPolicy:
    """Noisy scripted experts as an :func:`evaluate` policy: some episodes succeed, some fail, lengths differ by
    seed, so a mixed-up seed or a lost step shows. Each episode's noise is seeded from its first observation.
    ``on_act(calls)`` runs before each batched action (the test's fault injection)."""

    def __init__(self, n, on_act=None):
        self.experts = [ScriptedExpert(TASK, noise=0.6) for _ in range(n)]
        self.calls, self.on_act = 0, on_act

    def reset(self, mask, obs):
        for i in np.flatnonzero(mask):
            self.experts[i].reset(int(abs(obs["cube_pos"][i]).sum() * 1e6) % 2**31)

    def observe(self, obs, mask):
        pass

    def act(self, obs):
        self.calls += 1
        if self.on_act is not None:
            self.on_act(self.calls)
        return np.stack([e.act({k: v[i] for k, v in obs.items()}) for i, e in enumerate(self.experts)])


def _eval(tmp_path, name, env_kwargs, on_act=None):
    store = ZarrStore.create(tmp_path / f"{name}.zarr")
    r = evaluate(None, TASK, n_episodes=20, n_envs=2, policy=ExpertPolicy(2, on_act), env_kwargs=env_kwargs,
                 progress=False, record=store)
    return r, ZarrStore.open(tmp_path / f"{name}.zarr")


def _same_store(a, b):
    assert a.n_episodes == b.n_episodes
    for e in range(a.n_episodes):
        ma, mb = a.episode_meta(e), b.episode_meta(e)
        assert {k: v for k, v in ma.items() if k != "created"} == {k: v for k, v in mb.items() if k != "created"}
        da, db = a.get_episode(e), b.get_episode(e)
        assert da.keys() == db.keys()
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=f"episode {e} key {k}")


def test_eval_on_two_nodes_equals_local_and_survives_a_killed_worker(cluster, tmp_path, capfd):
    local, s_local = _eval(tmp_path, "local", {})
    assert 0 < local["successes"] < 20, "the experts should both succeed and fail"
    assert local["worker_restarts"] == 0

    venv = make_vector_env(TASK, 4, ray=cluster)  # the workers spread over both nodes
    try:
        reset_some(venv, np.ones(4, bool), [1, 2, 3, 4], None)
        assert len({w["node"] for w in venv.placement()}) == 2
    finally:
        venv.close()

    on_ray, s_ray = _eval(tmp_path, "ray", {"ray": cluster})
    assert on_ray["per_episode"] == local["per_episode"] and on_ray["worker_restarts"] == 0
    _same_store(s_local, s_ray)

    killed = []

    def kill(calls):  # mid-episode (episodes last ~40-60 steps): SIGKILL one env worker process
        if calls == 25:
            pids = _procs("ray::EnvWorker")
            assert len(pids) == 2, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    capfd.readouterr()
    hit, s_hit = _eval(tmp_path, "killed", {"ray": cluster}, kill)
    err = capfd.readouterr().err
    assert killed and hit["worker_restarts"] == 1 and "re-running its episode (seed" in err
    # every seed once, each episode as in the local run: nothing counted twice, nothing lost
    assert [r["seed"] for r in hit["per_episode"]] == list(range(EVAL_SEED_START, EVAL_SEED_START + 20))
    assert hit["per_episode"] == local["per_episode"]
    _same_store(s_local, s_hit)


BASE = os.path.join(os.path.dirname(__file__), "fixtures", "place_bc_mujoco")


def test_residual_ppo_on_the_cluster_learns_the_local_curve(cluster, tmp_path):
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.ppo import PPOConfig, train_residual

    ppo = PPOConfig(total_env_steps=200, n_envs=2, n_steps=50, n_minibatches=2, update_epochs=1, val_every=0)
    curves = [train_residual(load_policy(BASE), TASK, ppo, tmp_path / name, env_kwargs=kw, progress=False)[1]
              for name, kw in (("local", {}), ("ray", {"ray": cluster}))]
    assert curves[1][-1]["env_steps"] == 200
    # the same seeds and actions give the same episodes, so the same learning curve (wall time aside)
    strip = lambda c: [{k: v for k, v in r.items() if "wall" not in k and not k.endswith("_s")} for r in c]  # noqa: E731
    assert json.dumps(strip(curves[1])) == json.dumps(strip(curves[0]))  # NaN == NaN


def test_td3_actors_on_the_cluster_survive_a_killed_actor(cluster, tmp_path, capfd):
    """The actor-learner split with its 2 actors as Ray tasks: one is SIGKILLed once the learner has checkpointed
    (so mid-run); it is started again and the run completes with every counted step stored at most once."""
    from robot_rl.policies.checkpoint import load_policy, read_checkpoint
    from robot_rl.rl.offpolicy import STATE_FORMAT
    from robot_rl.rl.td3 import TD3Config
    from robot_rl.serve.learner import train_residual_td3_actors

    td3 = TD3Config(total_env_steps=900, n_envs=4, actors=2, learning_starts=120, critic_warmup_updates=0,
                    push_every=2, utd_ratio=0.25, batch_size=32, log_every=60, val_every=0, critic_hidden=(32, 32),
                    n_critics=4, checkpoint_every=150)
    killed = []

    def killer():
        t = time.time()
        while time.time() - t < 120 and not (tmp_path / "td3" / "state").exists():
            time.sleep(0.05)
        pids = _procs("ray::run_actor")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    capfd.readouterr()
    _, curve = train_residual_td3_actors(load_policy(BASE), TASK, td3, tmp_path / "td3",
                                         env_kwargs={"ray": cluster}, progress=False)
    th.join(timeout=5)
    err = capfd.readouterr().err
    assert killed and "starting it again on new seeds" in err
    assert curve[-1]["env_steps"] == 900 and all(r["mixed_version_chunks"] == 0 for r in curve)
    _, meta = read_checkpoint(tmp_path / "td3" / "checkpoint")
    assert meta["extra"]["actor_restarts"] == 1
    _, state = read_checkpoint(tmp_path / "td3" / "state", STATE_FORMAT)
    assert state["config"]["replay_added"] <= 900  # no row counted twice


def test_an_absent_cluster_is_one_line_error_within_seconds(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "eval", "--base", BASE, "--task", TASK, "--episodes", "2",
                        "--videos", "0", "--out", str(tmp_path / "e"), "--ray", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t < 60
    assert r.stderr.strip().splitlines()[-1].startswith("robot-rl: error: env.ray: no Ray head answers at")
