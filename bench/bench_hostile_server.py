"""A hostile peer against a real policy server process, and a well-behaved client beside it (issue 21).

Three processes: the server (``python -m robot_rl.cli serve``, 1 torch thread), the attacker (this script's
``attack`` mode: raw ZeroMQ frames, holding the token, i.e. the worst case of an authenticated but hostile or buggy
peer) and this process, the well-behaved client (:class:`PolicyClient`, one session, one ``act`` per step with a
deadline). The attacker

1. opens ``--sessions`` sessions with ``reset`` (all pipelined on one connection) and abandons them;
2. sends ``step = 2**53`` for the victim's session id (known to it) — must get ``unknown_session``;
3. floods ``--pushes`` oversized weight pushes: half with ``--push-kb`` KiB of weights (more than the served
   residual's), half 1 KiB pushes whose config asks for ``hidden=[16000, 16000]`` (a 1 GB model).

Measured: the server's RSS (VmRSS) when idle (after start-up and one request) and after the attack, printed as
``rss_ratio``; the victim's per-step latency (p50 / max) and deadline misses while the attack runs and after it;
how the attacker's requests were answered (error codes). Acceptance (issue 21): ``rss_ratio <= 1.5``, no missed
deadline, the victim's session never disturbed.

    python bench/bench_hostile_server.py [--sessions 2000] [--pushes 200] [--push-kb 1024] [--deadline 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KEYS = {"ee_pos": 3, "cube_pos": 3}
TOKEN = "bench-hostile-token-0123456789"
VICTIM = "victim"


def make_checkpoints(d: Path) -> tuple[Path, Path]:
    """A small diffusion base (obs ee_pos/cube_pos, action 5, 4 DDIM steps) and a residual MLP (32, 32) under
    ``d``; returns (base dir, residual dir)."""
    import torch

    from robot_rl.policies import make_policy
    from robot_rl.policies.base import PolicyConfig
    from robot_rl.policies.checkpoint import save_policy
    from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, save_residual

    torch.manual_seed(0)
    st = {k: {"min": np.full(n, -1, np.float32), "max": np.full(n, 1, np.float32)} for k, n in
          {**KEYS, "action": 5}.items()}
    base = make_policy(PolicyConfig(kind="diffusion", obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5,
                                    down_dims=[16, 32], diffusion_step_embed_dim=16, num_inference_steps=4,
                                    n_action_steps=4, horizon=8), st)
    save_policy(base, d / "base")
    save_residual(ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, hidden=(32, 32))),
                  d / "res")
    return d / "base", d / "res"


def start_server(*args, port: int = 0, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m robot_rl.cli serve --port PORT --threads 1 ARGS`` (also used by tests/test_server.py);
    (process, "127.0.0.1:PORT") once it is listening. ``env``: default this one, 1 OMP thread and :data:`TOKEN`."""
    p = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", "serve", "--port", str(port), "--threads", "1",
                          *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env or {**os.environ, "OMP_NUM_THREADS": "1", "ROBOT_RL_SERVER_TOKEN": TOKEN})
    line = p.stdout.readline()
    m = re.search(r"listening on tcp://([\d.]+:\d+)", line)
    if m is None:
        p.kill()
        raise RuntimeError(f"server did not start: {line!r} {p.stderr.read()[-2000:]}")
    return p, m.group(1)


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _obs(rng, frames=1) -> dict:
    return {k: rng.uniform(-1, 1, size=(frames, n)).astype(np.float32) for k, n in KEYS.items()}


def attack(addr: str, token: str | None, sessions: int, pushes: int, push_kb: int, timeout_s: float = 60.0) -> dict:
    """The hostile peer (raw ZeroMQ DEALER, one connection): ``sessions`` pipelined ``reset`` requests, a step of
    2**53 on the victim's session id, then ``pushes`` oversized pushes. Returns {phase: {reply code: count}}."""
    import zmq

    from robot_rl.serve import protocol as P

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)  # queue everything: the server's receive high-water mark applies back-pressure
    s.connect("tcp://" + addr)
    rng = np.random.default_rng(0)
    out: dict = {}

    def run(phase, msgs):
        for i, m in enumerate(msgs):
            s.send(P.pack(m))
        codes: dict = {}
        end = time.monotonic() + timeout_s
        for _ in msgs:
            if not s.poll(max(1, int((end - time.monotonic()) * 1e3))):
                codes["no_reply"] = codes.get("no_reply", 0) + 1
                break
            r = P.unpack(s.recv(), 2**30)
            k = r.get("code", r["type"])
            codes[k] = codes.get(k, 0) + 1
        out[phase] = codes

    run("sessions", [P.request("act", i + 1, token, session=f"junk-{i}", step=0, obs=_obs(rng), reset=True)
                     for i in range(sessions)])
    run("hijack", [P.request("act", 10**9, token, session=VICTIM, step=2**53, obs=_obs(rng))])
    big = {"obs_keys": list(KEYS), "obs_dims": KEYS, "fine_keys": {}, "action_dim": 5, "alpha": 0.1,
           "hidden": [16000, 16000], "log_std_init": -1.0, "head": "gaussian"}
    blob = os.urandom(push_kb * 1024)
    run("pushes", [P.request("push_weights", 2 * 10**9 + i, token, version=1 + i,
                             weights=blob if i % 2 else os.urandom(1024), config=None if i % 2 else big)
                   for i in range(pushes)])
    s.close()
    return out


def measure(sessions: int = 2000, pushes: int = 200, push_kb: int = 1024, deadline: float = 2.0,
            after_steps: int = 20) -> dict:
    """Start a server, measure idle RSS, run the attacker process while the victim steps, measure again.
    Returns rss_idle_mb, rss_after_mb, rss_ratio, victim latency stats, misses and the attacker's reply codes."""
    from robot_rl.serve.client import PolicyClient, ServerTimeout

    with tempfile.TemporaryDirectory() as tmp:
        base, res = make_checkpoints(Path(tmp))
        srv, addr = start_server("--checkpoint", base, "--residual", res)
        try:
            rng = np.random.default_rng(1)
            c = PolicyClient(addr, token=TOKEN, timeout_s=deadline, retries=0)
            c.wait_ready(60)
            step = 0
            c.act(VICTIM, step, {k: v[0] for k, v in _obs(rng).items()}, reset=True, seed=1)
            time.sleep(0.5)
            idle = rss_mb(srv.pid)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            att = subprocess.Popen([sys.executable, __file__, "attack", addr, str(sessions), str(pushes), str(push_kb)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            during, misses, peak = [], 0, idle
            while att.poll() is None or step < 5:  # the victim steps while the attacker runs
                step += 1
                t0 = time.perf_counter()
                try:
                    c.act(VICTIM, step, {k: v[0] for k, v in _obs(rng).items()})
                    during.append((time.perf_counter() - t0) * 1e3)
                except ServerTimeout:
                    misses += 1
                peak = max(peak, rss_mb(srv.pid))
                time.sleep(0.02)
            out, err = att.communicate()
            if att.returncode != 0:
                raise RuntimeError(f"attacker failed: {err[-2000:]}")
            codes = json.loads(out.strip().splitlines()[-1])
            after = []
            for _ in range(after_steps):
                step += 1
                t0 = time.perf_counter()
                r = c.act(VICTIM, step, {k: v[0] for k, v in _obs(rng).items()})
                assert r.step == step and not r.recovered, "the victim's session was disturbed"
                after.append((time.perf_counter() - t0) * 1e3)
            # a fresh client can still open a session (nobody is locked out)
            with PolicyClient(addr, token=TOKEN, timeout_s=deadline, retries=0) as c2:
                t0 = time.perf_counter()
                c2.act("newcomer", 0, {k: v[0] for k, v in _obs(rng).items()}, reset=True)
                newcomer_ms = (time.perf_counter() - t0) * 1e3
            time.sleep(0.5)
            rss_after = rss_mb(srv.pid)
            server_sessions = c.ping()["sessions"]
            c.close()
        finally:
            srv.terminate()
            srv.wait(10)
    q = lambda a, p: float(np.percentile(a, p)) if len(a) else float("nan")  # noqa: E731
    return {"rss_idle_mb": idle, "rss_after_mb": rss_after, "rss_peak_mb": peak, "rss_ratio": rss_after / idle,
            "rss_peak_ratio": peak / idle, "victim_steps_during": len(during), "victim_misses": misses,
            "victim_during_p50_ms": q(during, 50), "victim_during_max_ms": max(during, default=float("nan")),
            "victim_after_p50_ms": q(after, 50), "victim_after_max_ms": max(after), "newcomer_ms": newcomer_ms,
            "deadline_ms": deadline * 1e3, "attacker": codes, "server_sessions": server_sessions}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "attack":
        addr, n, k, kb = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(attack(addr, TOKEN, n, k, kb)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--pushes", type=int, default=200)
    ap.add_argument("--push-kb", type=int, default=1024)
    ap.add_argument("--deadline", type=float, default=2.0)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    r = measure(a.sessions, a.pushes, a.push_kb, a.deadline)
    print(f"attacker: {a.sessions} sessions opened and abandoned, {a.pushes} oversized pushes "
          f"({a.push_kb} KiB weights / 1 KiB with hidden=[16000, 16000]); replies: {r['attacker']}")
    print(f"server RSS: idle {r['rss_idle_mb']:.0f} MiB, after {r['rss_after_mb']:.0f} MiB, peak "
          f"{r['rss_peak_mb']:.0f} MiB")
    print(f"victim: {r['victim_steps_during']} steps during the attack, {r['victim_misses']} missed the "
          f"{r['deadline_ms']:.0f} ms deadline, p50 {r['victim_during_p50_ms']:.1f} ms, max "
          f"{r['victim_during_max_ms']:.1f} ms; after: p50 {r['victim_after_p50_ms']:.1f} ms, max "
          f"{r['victim_after_max_ms']:.1f} ms; a new client's first act: {r['newcomer_ms']:.1f} ms")
    print(f"sessions on the server afterwards: {r['server_sessions']}")
    print(f"rss_ratio {r['rss_ratio']:.3f} (peak {r['rss_peak_ratio']:.3f}; acceptance <= 1.5)")


if __name__ == "__main__":
    main()
