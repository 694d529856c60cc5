"""Policy server against real server processes (``python -m robot_rl.cli serve``) on loopback.

Round trip == in-process inference exactly; batching across concurrent clients == unbatched; weight push changes
versions and actions without dropping in-flight requests; a killed server -> ServerTimeout within the deadline and
a restarted one is reconnected to; malformed / oversized / unauthenticated requests get error replies and never
kill the server; CLI bad input -> one-line errors; ``robot-rl eval --server`` == in-process evaluation.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
import torch
import zmq

from bench_hostile_server import start_server as bench_start_server
from robot_rl.errors import ConfigError
from robot_rl.envs.env import make_env
from robot_rl.stages.evaluation import EVAL_SEED_START, CombinedPolicy, evaluate
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.policies.checkpoint import load_policy, save_policy
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, load_residual, save_residual
from robot_rl.envs.vector import env_kwargs_for
from robot_rl.serve import protocol as P
from robot_rl.serve.client import AsyncChunkClient, PolicyClient, RemotePolicy, ServerError, ServerTimeout
from robot_rl.serve.server import weights_digest

KEYS = {"ee_pos": 3, "cube_pos": 3}
TOKEN = "test-token-0123456789"
FIXTURE = Path(__file__).parent / "fixtures" / "place_bc_mujoco"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ROBOT_RL_SERVER_TOKEN": TOKEN}


def _stats(d, lo=-1.0, hi=1.0):
    return {"min": np.full(d, lo, np.float32), "max": np.full(d, hi, np.float32)}


def _residual(seed, **kw):
    torch.manual_seed(seed)
    r = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=kw.pop("obs_dims", KEYS),
                                      action_dim=kw.pop("action_dim", 5),
                                      hidden=(32, 32), **kw))
    with torch.no_grad():
        for p in r.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # a "trained" residual: nonzero corrections
    return r


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    stats = {"ee_pos": _stats(3, -1, 1), "cube_pos": _stats(3, -1, 1), "action": _stats(5, -0.5, 0.8)}
    diff = make_policy(PolicyConfig(kind="diffusion", obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5,
                                    down_dims=[16, 32], diffusion_step_embed_dim=16, num_inference_steps=4,
                                    n_action_steps=4, horizon=8), stats)
    bc = make_policy(PolicyConfig(kind="bc", obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, bc_hidden=[32],
                                  n_action_steps=4, horizon=8),
                     {"ee_pos": _stats(3, 0, 0.8), "cube_pos": _stats(3, 0, 0.8), "action": _stats(5)})
    save_policy(diff, d / "diff")
    save_policy(bc, d / "bc")
    save_residual(_residual(1), d / "res1")
    save_residual(_residual(2), d / "res2")
    save_residual(_residual(3, action_dim=4), d / "res_bad")
    return d


def start_server(*args, port=0, env=ENV):
    """Start ``python -m robot_rl.cli serve ARGS``; returns (process, "127.0.0.1:PORT") once it is listening."""
    return bench_start_server(*args, port=port, env=env)


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def server(ckpts):
    p, addr = start_server("--checkpoint", ckpts / "diff", "--residual", ckpts / "res1", "--batch-window-ms", 30,
                           "--max-batch", 8, "--max-message-mb", 1)
    c = PolicyClient(addr, token=TOKEN, timeout_s=10)
    c.wait_ready(30)
    yield p, addr
    c.close()
    stop(p)
    assert p.returncode == 0, p.stderr.read()[-2000:]  # clean shutdown on SIGTERM, no crash on the way


@pytest.fixture(scope="module")
def models(ckpts):
    base = load_policy(ckpts / "diff")
    return base, load_residual(ckpts / "res1", base), load_residual(ckpts / "res2", base)


def _obs(rng):
    return {k: rng.uniform(-1, 1, size=d).astype(np.float32) for k, d in KEYS.items()}


def _reference(base, res, seed, obs_seq, new_chunk_every_step=False):
    """In-process CombinedPolicy (one env, generator seeded ``seed``): executed actions (S, A) and base (S, A)."""
    ref = CombinedPolicy(base, res, 1, seed=seed)
    one = np.ones(1, bool)
    out, bases = [], []
    for t, o in enumerate(obs_seq):
        ob = {k: v[None] for k, v in o.items()}
        ref.reset(one, ob) if t == 0 else ref.observe(ob, None)
        if new_chunk_every_step:
            ref.drop_chunks()
        bases.append(ref.ex.peek()[0].copy())
        out.append(ref.act(ob)[0])
    return np.stack(out), np.stack(bases), ref


def test_metadata(server, ckpts):
    _, addr = server
    with PolicyClient(addr, token=TOKEN) as c:
        m = c.metadata()
    assert m["protocol"] == P.PROTOCOL_VERSION and m["obs_spec"] == {k: {"dtype": "float32", "shape": [d]}
                                                                     for k, d in KEYS.items()}
    assert m["action_spec"]["shape"] == [5] and m["action_spec"]["low"] == pytest.approx([-0.5] * 5)
    assert (m["n_obs_steps"], m["n_action_steps"], m["horizon"]) == (2, 4, 8)
    assert m["control_rate_hz"] == 10.0 and m["normalization"]["ee_pos"]["max"] == [1.0] * 3
    assert m["residual"]["loaded"] and m["residual"]["version"] == 0 and m["auth_required"]
    assert m["batching"] == {"max_batch": 8, "window_ms": 30.0}


def test_round_trip_equals_in_process(server, models):
    _, addr = server
    base, res1, _ = models
    rng = np.random.default_rng(0)
    obs = [_obs(rng) for _ in range(11)]
    want, want_base, ref = _reference(base, res1, 5, obs)
    with PolicyClient(addr, token=TOKEN) as c:
        got = [c.act("rt", t, o, reset=t == 0, seed=5 if t == 0 else None) for t, o in enumerate(obs)]
    assert np.array_equal(np.stack([r.action for r in got]), want)  # bit-exact, residual included
    assert np.array_equal(np.stack([r.base[0] for r in got]), want_base)
    assert not np.array_equal(want, want_base)  # the residual does change the actions
    assert [r.new_chunk for r in got] == [t % 4 == 0 for t in range(11)]  # a base call every Ta = 4 steps
    assert np.array_equal(got[-1].base[1:], ref.ex.queued(0))  # the rest of the chunk
    assert all(r.residual_version == 0 and r.executed.shape == (4 - t % 4, 5) for t, r in enumerate(got))


def test_local_acts_answer_as_the_server_does(server, models):
    """LocalActs (a robot acting on its copy of the learner's weights, acting:=local) gives the server's act reply
    for every step of an episode, bit-exact: the diffusion base's chunks (its session seed), a new chunk every Ta
    steps, the residual's mean on the step's observation and the executed action; the version it was given."""
    from robot_rl.serve.actor import LocalActs

    _, addr = server
    base, res1, _ = models
    rng = np.random.default_rng(3)
    obs = [_obs(rng) for _ in range(10)]
    local = LocalActs(base, res1, residual_version=7)
    with PolicyClient(addr, token=TOKEN) as c:
        for t, o in enumerate(obs):
            kw = dict(reset=t == 0, seed=11 if t == 0 else None)
            want, got = c.act("la", t, o, **kw), local.act("la", t, o, **kw)
            assert np.array_equal(got.base, want.base[:1]) and np.array_equal(got.residual, want.residual[:1])
            assert np.array_equal(got.executed, want.executed[:1]) and got.new_chunk == want.new_chunk
            assert got.residual_version == 7 and got.base_version == want.base_version
    assert not np.array_equal(got.residual, np.zeros_like(got.residual))  # the residual is in play
    with pytest.raises(RuntimeError, match="reset=True"):
        local.act("other", 11, obs[0])


def test_local_acts_reads_the_residuals_fine_keys(models):
    """A residual with a fine key the base does not read (``place``'s cube_to_target over a base without it): LocalActs
    feeds it from the step's observation, as the server does (it once passed the base's keys only and raised)."""
    from robot_rl.serve.actor import LocalActs

    base = models[0]
    res = _residual(4, obs_dims={**KEYS, "d": 3}, fine_keys={"d": 0.01})
    rng = np.random.default_rng(5)
    o = _obs(rng)
    out = []
    for d in (0.0, 0.02):
        local = LocalActs(base, res, residual_version=1)
        out.append(local.act("f", 0, {**o, "d": np.full(3, d, np.float32)}, reset=True, seed=3).residual)
    assert not np.array_equal(out[0], out[1])  # the fine key moves the residual
    with pytest.raises(ConfigError, match="fine_keys.d"):
        LocalActs(base, res, residual_version=1).act("f", 0, o, reset=True, seed=3)


def test_batching_across_concurrent_clients_equals_unbatched(server, models):
    _, addr = server
    base, res1, _ = models
    n, steps = 6, 6
    rng = np.random.default_rng(1)
    obs = [[_obs(rng) for _ in range(steps)] for _ in range(n)]
    results, errors = [[] for _ in range(n)], []
    barrier = threading.Barrier(n)

    def client(i):
        try:
            with PolicyClient(addr, token=TOKEN, timeout_s=10) as c:
                c.metadata()
                for t in range(steps):
                    barrier.wait()
                    results[i].append(c.act(f"b{i}", t, obs[i][t], reset=t == 0, seed=100 + i if t == 0 else None,
                                            new_chunk=True))
        except Exception as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    sizes = [r.timing["batch_size"] for rs in results for r in rs]
    assert max(sizes) >= 4, sizes  # the server did batch across clients
    # A batched float32 GEMM sums in a different order than a batch of one, and the DDIM loop carries that rounding
    # through every denoising step: CI saw 1.04e-6 once. 1e-5 is still four orders of magnitude below what a mixed-up
    # session (wrong observation, wrong noise stream) produces, which is what this test exists to catch.
    for i in range(n):
        want, want_base, _ = _reference(base, res1, 100 + i, obs[i], new_chunk_every_step=True)
        np.testing.assert_allclose(np.stack([r.action for r in results[i]]), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.stack([r.base[0] for r in results[i]]), want_base, rtol=0, atol=1e-5)


def test_async_chunk_client(server):
    _, addr = server
    rng = np.random.default_rng(2)
    ac = AsyncChunkClient(addr, "async", token=TOKEN, threshold=1, ensemble_decay=0.01, timeout_s=10)
    try:
        acts = [ac.act(_obs(rng), reset=t == 0, seed=3) for t in range(16)]
    finally:
        ac.close()
    a = np.stack(acts)
    assert a.shape == (16, 5) and a.dtype == np.float32 and np.all(np.isfinite(a))
    assert np.all(a >= -0.5 - 1e-6) and np.all(a <= 0.8 + 1e-6)  # blends of in-range actions stay in range
    assert 4 <= ac.requests <= 8  # one request per ~Ta - threshold steps, not one per step


def test_policy_node_sources_recover_after_a_missed_deadline(server):
    """The ROS policy node's server sources: a step whose reply misses its deadline (the server still handles it,
    late) must not wedge the session — the next step is answered (a step index is never sent twice)."""
    from robot_rl.ros.policy_node import AsyncServerSource, ServerSource

    _, addr = server
    rng = np.random.default_rng(5)
    src = ServerSource(addr, TOKEN, "deadline", seed=0, connect_timeout=10)
    try:
        src.start()
        rows = src.act(_obs(rng), 10.0)  # this step's action, then the rest of the chunk (the preview)
        assert rows.ndim == 2 and rows.shape[1] == 5 and 1 <= len(rows) <= 8
        with pytest.raises(TimeoutError):
            src.act(_obs(rng), 1e-6)
        time.sleep(0.3)  # the late reply has been sent and is dropped by the client
        for _ in range(3):
            assert np.all(np.isfinite(src.act(_obs(rng), 10.0)))
        src.start()  # a new episode closes the previous session on the server
        assert np.all(np.isfinite(src.act(_obs(rng), 10.0)))
    finally:
        src.close()
    asrc = AsyncServerSource(addr, TOKEN, "async-node", seed=0, connect_timeout=10, threshold=1)
    try:
        asrc.start()
        acts = [asrc.act(_obs(rng), 10.0) for _ in range(12)]
        assert asrc.client.requests < 12  # chunks, not one request per step
        asrc.drop_chunk()  # after a hold: a fresh chunk from the current observation
        acts.append(asrc.act(_obs(rng), 10.0))
        assert np.all(np.isfinite(np.stack(acts)))
    finally:
        asrc.close()


def test_policy_node_in_process_source_returns_the_planned_chunk(ckpts, models):
    """In-process ``execution: step``: each step returns this step's action (row 0, as CombinedPolicy executes it)
    and the rest of the base's chunk with the residual of this step's observation; without a residual, those preview
    rows are exactly the actions of the steps that follow until the next chunk (Ta = 4: 4, 3, 2, 1 rows)."""
    from robot_rl.ros.policy_node import InProcessSource

    base, res1, _ = models
    rng = np.random.default_rng(11)
    obs = [_obs(rng) for _ in range(9)]
    src = InProcessSource(str(ckpts / "diff"), seed=0)
    src.start()
    rows = [src.act(o, 1.0) for o in obs]
    assert [len(r) for r in rows] == [4, 3, 2, 1, 4, 3, 2, 1, 4]
    for t in (0, 4):
        np.testing.assert_array_equal(rows[t][1:], np.stack([rows[t + i][0] for i in range(1, 4)]))
    want, _, _ = _reference(base, None, 0, obs)
    np.testing.assert_array_equal(np.stack([r[0] for r in rows]), want)
    src = InProcessSource(str(ckpts / "diff"), str(ckpts / "res1"), seed=0)
    src.start()
    rows = [src.act(o, 1.0) for o in obs]
    want, _, _ = _reference(base, res1, 0, obs)
    np.testing.assert_array_equal(np.stack([r[0] for r in rows]), want)  # row 0: base + residual, per step
    assert not np.array_equal(rows[0][1], rows[1][0])  # the preview's residual used step 0's observation


def test_policy_node_in_process_async_uses_an_embedded_server(ckpts, models):
    """In-process ``execution: async``: the checkpoint is served from a server thread of this process (loopback,
    random token, no weight push) and executed with the same async chunk client; its first action equals in-process
    inference, later ones are blended chunks; closing the source stops the thread."""
    from robot_rl.ros.policy_node import AsyncServerSource
    from robot_rl.serve.server import EmbeddedServer

    base, res1, _ = models
    rng = np.random.default_rng(7)
    obs = [_obs(rng) for _ in range(12)]
    emb = EmbeddedServer(str(ckpts / "diff"), str(ckpts / "res1"))
    with PolicyClient(emb.address, timeout_s=5, retries=0) as c:  # the token is required
        with pytest.raises(ServerError, match="token"):
            c.act("intruder", 0, obs[0], reset=True)
    src = AsyncServerSource(emb.address, emb.token, "inproc", seed=0, connect_timeout=10, threshold=1,
                            embedded=emb)
    try:
        src.start()
        acts = np.stack([src.act(o, 10.0)[0] for o in obs])
        assert src.client.requests < len(obs)
    finally:
        src.close()
    want, _, _ = _reference(base, res1, 1, obs[:1])  # episode 1 of seed 0 -> seed 1
    assert np.array_equal(acts[0], want[0])
    assert np.all(np.isfinite(acts)) and not emb.thread.is_alive()


def _raw_socket(addr):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect("tcp://" + addr)
    return s


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256))
def test_fuzz_real_server_process(server, raw):
    """Random frames sent to the running server process over its socket: every one gets an error reply (never
    ``internal``: no exception escapes the decoder), and the server keeps answering."""
    _, addr = server
    s = _raw_socket(addr)
    try:
        m = _raw_call(s, [raw])
        assert m["type"] == "error" and m["code"] != "internal", m
    finally:
        s.close()


def _raw_call(s, frames, timeout_ms=5000):
    s.send_multipart(frames)
    assert s.poll(timeout_ms), "no reply"
    return P.parse_reply(P.unpack(s.recv()))


def test_bad_requests_get_error_replies_and_server_survives(server):
    p, addr = server
    s = _raw_socket(addr)
    act = P.request("act", 1, TOKEN, session="bad", step=0, reset=True,
                    obs={k: np.zeros((1, d), np.float32) for k, d in KEYS.items()})
    wrong_dtype = {**act, "obs": {**act["obs"], "ee_pos": P.encode_array(np.zeros((1, 3), np.float64))}}
    wrong_shape = {**act, "obs": {**act["obs"], "ee_pos": P.encode_array(np.zeros((1, 7), np.float32))}}
    too_many_frames = {**act, "obs": {k: P.encode_array(np.zeros((3, d), np.float32)) for k, d in KEYS.items()}}
    oversized = {**act, "pad": b"\0" * (3 * 2**20 // 2)}  # 1.5 MiB > --max-message-mb 1
    cases = [([b"\xc1\xc1garbage"], "decode"), ([P.pack([1, 2, 3])], "decode"),
             ([P.pack({**act, "v": 99})], "version"), ([P.pack({**act, "token": "nope"})], "auth"),
             ([P.pack({k: v for k, v in act.items() if k != "token"})], "auth"),
             ([P.pack({**act, "type": "explode"})], "schema"), ([P.pack(wrong_dtype)], "dtype"),
             ([P.pack(wrong_shape)], "shape"), ([P.pack(too_many_frames)], "shape"),
             ([P.pack(oversized)], "too_large"), ([P.pack(act), b"second frame"], "decode")]
    for frames, code in cases:
        m = _raw_call(s, frames)
        assert m["type"] == "error" and m["code"] == code, (code, m)
    s.close()
    # far beyond the limit: ZeroMQ drops the connection before reading it into memory; nobody else notices
    s = _raw_socket(addr)
    s.send(b"\0" * (5 * 2**20))
    s.close()
    with PolicyClient(addr) as c:  # no token
        with pytest.raises(ServerError, match="auth"):
            c.metadata()
    with PolicyClient(addr, token=TOKEN) as c:
        with pytest.raises(ConfigError) as e:  # client-side check before sending
            c.act("x", 0, {"ee_pos": np.zeros(4), "cube_pos": np.zeros(3)}, reset=True)
        assert "ee_pos" in e.value.field
        good = {"ee_pos": np.zeros(3), "cube_pos": np.zeros(3)}
        for bad_session in (7, "", "has space", "x" * 200):
            with pytest.raises(ConfigError) as e:
                c.act(bad_session, 0, good, reset=True)
            assert e.value.field == "session"
        assert c.act("ok", 0, {"ee_pos": np.zeros(3), "cube_pos": np.zeros(3)}, reset=True).executed.shape == (4, 5)
        assert c.ping()["stats"]["errors"] >= len(cases)
    assert p.poll() is None


def test_weight_push_changes_version_and_actions_without_dropping_requests(server, models, ckpts):
    _, addr = server
    base, res1, res2 = models
    rng = np.random.default_rng(3)
    obs = [_obs(rng) for _ in range(8)]
    seen, errors, stop_flag = [], [], threading.Event()

    def hammer():  # a client stepping continuously while the learner pushes
        try:
            with PolicyClient(addr, token=TOKEN, timeout_s=10) as c:
                t = 0
                while not stop_flag.is_set() or t < 30:
                    r = c.act("hammer", t, obs[t % 8], reset=t == 0)
                    seen.append(r.residual_version)
                    t += 1
        except Exception as e:
            errors.append(e)

    th = threading.Thread(target=hammer)
    th.start()
    time.sleep(0.2)
    with PolicyClient(addr, token=TOKEN, timeout_s=10) as c:
        assert c.push_weights(res2, version=1) == 1
        time.sleep(0.2)
        stop_flag.set()
        th.join(60)
        assert not errors, errors
        assert seen[0] == 0 and seen[-1] == 1 and seen == sorted(seen)  # every request answered, in order
        with pytest.raises(ServerError, match="push_rejected"):
            c.push_weights(res1, version=1)  # versions must increase
        with pytest.raises(ServerError, match="push_rejected"):
            c.push_weights(_residual(4, action_dim=4), version=2)  # does not fit the base
        with pytest.raises(ServerError, match="push_rejected"):
            c.push_weights(b"not safetensors", version=2)
        got = [c.act("after-push", t, o, reset=t == 0, seed=9 if t == 0 else None) for t, o in enumerate(obs)]
        assert c.metadata(refresh=True)["residual"]["version"] == 1
        version, copy = c.fetch_residual(base)  # the `weights` request: a robot's copy of the served residual
        assert version == 1 and weights_digest(copy) == weights_digest(res2) != weights_digest(res1)
    want2, _, _ = _reference(base, res2, 9, obs)
    want1, _, _ = _reference(base, res1, 9, obs)
    acts = np.stack([r.action for r in got])
    assert all(r.residual_version == 1 for r in got)
    assert np.array_equal(acts, want2) and not np.allclose(acts, want1)


def test_killed_server_times_out_within_deadline_then_reconnects(ckpts):
    p, addr = start_server("--checkpoint", ckpts / "diff", "--residual", ckpts / "res1")
    port = int(addr.rsplit(":", 1)[1])
    rng = np.random.default_rng(4)
    c = PolicyClient(addr, token=TOKEN, timeout_s=1.0, retries=1)
    try:
        c.wait_ready(30)
        c.act("f", 0, _obs(rng), reset=True, seed=1)
        c.act("f", 1, _obs(rng))
        p.send_signal(signal.SIGKILL)
        p.wait()
        t0 = time.monotonic()
        with pytest.raises(ServerTimeout):
            c.act("f", 2, _obs(rng))
        assert time.monotonic() - t0 <= 1.0 + 0.2
        p, _ = start_server("--checkpoint", ckpts / "diff", "--residual", ckpts / "res1", port=port)
        c.wait_ready(30)
        r = c.act("f", 3, _obs(rng))  # the new server lost the session: the client re-creates it transparently
        assert r.recovered and r.step == 3 and r.executed.shape[1] == 5
        assert not c.act("f", 4, _obs(rng)).recovered
    finally:
        c.close()
        stop(p)


def _one_line_error(r, field):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robot-rl: error:") and field in lines[0], r.stderr


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "robot_rl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_cli_bad_input(ckpts, tmp_path):
    _one_line_error(_cli("serve", "--checkpoint", tmp_path / "missing"), "missing")
    _one_line_error(_cli("serve", "--checkpoint", ckpts / "diff", "--residual", ckpts / "res_bad", "--port", 0),
                    "action_dim")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        _one_line_error(_cli("serve", "--checkpoint", ckpts / "diff", "--port", held.getsockname()[1]), "in use")
    _one_line_error(_cli("eval", "--server", "127.0.0.1:1", "--out", tmp_path / "e", "--timeout", 0.3), "server")


def test_eval_through_server_equals_in_process(tmp_path):
    """A trained BC base (tests/fixtures, succeeds on ``place``): through the server every action equals the
    in-process one, and the held-out episodes (successes, lengths) equal in-process evaluation, also via
    ``robot-rl eval --server``."""
    p, addr = start_server("--checkpoint", FIXTURE)
    try:
        base = load_policy(FIXTURE)
        want = evaluate(base, "place", n_episodes=3, n_envs=1, progress=False)
        assert want["successes"] >= 1, want["per_episode"]  # episodes that depend on the actions
        env = make_env("place", **env_kwargs_for(base.config, "place", None, None))
        one = np.ones(1, dtype=bool)
        with PolicyClient(addr, token=TOKEN) as c:
            c.wait_ready(30)
            local, remote = CombinedPolicy(base, None, 1), RemotePolicy(c, 1)
            obs, _ = env.reset(seed=EVAL_SEED_START)
            for pol in (local, remote):
                pol.reset(one, {k: v[None] for k, v in obs.items()})
            moved = 0.0
            for t in range(40):  # every step, not only the episode outcome
                a, b = (pol.act({k: v[None] for k, v in obs.items()}) for pol in (local, remote))
                np.testing.assert_array_equal(a, b, err_msg=f"step {t}")
                obs, _, term, trunc, _ = env.step(a[0])
                moved += float(np.abs(a[0, :3]).sum())
                if term or trunc:
                    break
                for pol in (local, remote):
                    pol.observe({k: v[None] for k, v in obs.items()}, None)
            assert moved > 1.0
            got = evaluate(None, "place", n_episodes=3, n_envs=1, progress=False, policy=RemotePolicy(c, 1))
        env.close()
        assert got["per_episode"] == want["per_episode"]
        r = _cli("eval", "--server", addr, "--out", tmp_path / "ev", "--episodes", 3, "--n-envs", 1, "--videos", 0)
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((tmp_path / "ev" / "eval_per_episode.json").read_text())["server: base"]
        assert rep == want["per_episode"]
    finally:
        stop(p)


def _service(ckpts, residual="res1"):
    from robot_rl.serve.server import PolicyService, ServeConfig

    base = load_policy(ckpts / "diff")
    return PolicyService(base, load_residual(ckpts / residual, base), ServeConfig(port=0))


def _call(svc, type_, id_, **fields):
    return P.parse_reply(P.unpack(svc.process([P.pack(P.request(type_, id_, **fields))])[0]))


def test_a_push_mid_chunk_takes_effect_at_the_next_chunk(ckpts, models):
    """No action chunk mixes two residual versions: a push lands between the steps of a chunk, the rest of that
    chunk is still served by the old residual (bit-identical to it), the next chunk by the new one."""
    base, res1, res2 = models
    svc = _service(ckpts)
    rng = np.random.default_rng(5)
    obs = [_obs(rng) for _ in range(8)]
    Ta = base.config.n_action_steps
    from safetensors.torch import save as st_save

    got = []
    for t, o in enumerate(obs):
        if t == 1:  # mid-chunk
            rep = _call(svc, "push_weights", 100, version=1,
                        weights=st_save({k: v.contiguous() for k, v in res2.state_dict().items()}))
            assert rep["residual_version"] == 1
        got.append(_call(svc, "act", 200 + t, session="s", step=t, reset=t == 0, seed=9 if t == 0 else None,
                         obs={k: v[None] for k, v in o.items()}))
    versions = [r["residual_version"] for r in got]
    assert versions == [0] * Ta + [1] * (len(obs) - Ta)
    assert [r["new_chunk"] for r in got] == [t % Ta == 0 for t in range(len(obs))]
    want1, _, _ = _reference(base, res1, 9, obs)
    want2, _, _ = _reference(base, res2, 9, obs)
    acts = np.stack([r["executed"][0] for r in got])
    assert np.array_equal(acts[:Ta], want1[:Ta]) and np.array_equal(acts[Ta:], want2[Ta:])
    assert not np.allclose(want1[Ta:], want2[Ta:])
    from robot_rl.serve.server import PolicyService, ServeConfig

    bare = PolicyService(base, None, ServeConfig(port=0))  # serves no residual: the `weights` reply says so
    assert _call(bare, "weights", 1) == {**_call(bare, "weights", 1), "residual_version": 0, "weights": None,
                                         "config": None}


def _transitions(k, A=5, **over):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)  # noqa: E731
    msg = {"sessions": [f"a-{i}" for i in range(k)], "steps": np.arange(k, dtype=np.int64),
           "obs": {key: f(k, d) for key, d in KEYS.items()}, "next_obs": {key: f(k, d) for key, d in KEYS.items()},
           "base": f(k, A), "residual": f(k, A), "executed": f(k, A), "next_base": f(k, A),
           "reward": np.zeros(k, np.float32), "terminated": np.zeros(k, bool), "truncated": np.zeros(k, bool),
           "success": np.zeros(k, bool), "residual_version": np.zeros(k, np.int64), "new_chunk": np.ones(k, bool)}
    msg.update(over)
    return msg


def test_transitions_reach_the_learner_once_and_bad_rows_name_their_field(ckpts):
    from robot_rl.rl.td3 import TD3Config
    from robot_rl.serve.learner import TransitionInbox

    svc = _service(ckpts)
    r = _call(svc, "transitions", 1, **_transitions(3))
    assert r["type"] == "error" and r["code"] == "not_learning"
    inbox = TransitionInbox(TD3Config(learning_starts=4))
    svc.learner = inbox
    r = _call(svc, "transitions", 2, **_transitions(3))
    assert r["accepted"] == 3 and r["backlog"] == 3 and r["explore"]["mode"] == "warmup" and not r["stop"]
    assert _call(svc, "transitions", 2, **_transitions(3))["accepted"] == 0  # a retry of request 2: counted once
    r = _call(svc, "transitions", 3, **_transitions(2))
    assert r["accepted"] == 2 and r["explore"]["mode"] == "policy"  # 5 rows >= learning_starts
    got = inbox.drain(0.1)
    assert [len(q["sessions"]) for q in got] == [3, 2] and inbox.received == 5
    np.testing.assert_array_equal(got[0]["obs"]["ee_pos"], _transitions(3)["obs"]["ee_pos"])
    for over, code, field in [({"base": np.zeros((3, 4), np.float32)}, "shape", "base"),
                              ({"reward": np.array([0, np.nan, 0], np.float32)}, "value", "reward"),
                              ({"terminated": np.zeros(3, np.float32)}, "dtype", "terminated"),
                              ({"next_obs": {"ee_pos": np.zeros((3, 3), np.float32)}}, "schema", "next_obs.cube_pos")]:
        r = _call(svc, "transitions", 10, **_transitions(3, **over))
        assert (r["type"], r["code"], r["field"]) == ("error", code, field), r
    assert inbox.received == 5  # nothing of a bad request was counted
    assert _call(svc, "ping", 11)["learner"]["backlog"] == 5
