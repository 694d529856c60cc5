"""What one residual-TD3 learner can take: transitions/s its policy server ingests, and the cost of one weight push,
against the env steps/s one actor produces, measured in the same run (the numbers behind scaling the
actor-learner split, issue 20).

- Ingest: a learner-side :class:`robot_rl.serve.server.PolicyServer` thread with a
  :class:`robot_rl.serve.learner.TransitionInbox` attached, drained by a consumer thread that only counts (no
  features, no updates: the transport's ceiling); ``--clients`` processes each send ``transitions`` requests of
  ``--rows`` rows (the fields and shapes of the shipped base's observations) as fast as replies come.
- Weight push: ``push_weights`` of the residual TD3 trains for that base (its real size), median and p95 over
  ``--pushes`` pushes, and the time until a session acting through the server sees the new version.
- Reference: env steps/s of one actor (a 2-env MuJoCo vector env stepping the base + residual, one batched call per
  step), so ``ingest / actor`` is how many such actors one learner's transport could absorb.

    python bench/bench_learner.py [--clients 2] [--rows 64] [--seconds 10] [--pushes 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "place_bc_mujoco"


def _rows(k: int, obs_dims: dict, A: int = 5) -> dict:
    rng = np.random.default_rng(0)
    f = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)  # noqa: E731
    return {"sessions": [f"bench-{i}" for i in range(k)], "steps": np.arange(k, dtype=np.int64),
            "obs": {key: f(k, d) for key, d in obs_dims.items()},
            "next_obs": {key: f(k, d) for key, d in obs_dims.items()},
            "base": f(k, A), "residual": f(k, A), "executed": f(k, A), "next_base": f(k, A),
            "reward": np.zeros(k, np.float32), "terminated": np.zeros(k, bool), "truncated": np.zeros(k, bool),
            "success": np.zeros(k, bool), "residual_version": np.zeros(k, np.int64), "new_chunk": np.ones(k, bool)}


def _sender(endpoint: str, k: int, obs_dims: dict, seconds: float, out) -> None:
    from robot_rl.serve.client import PolicyClient

    rows, sent, t_end = _rows(k, obs_dims), 0, time.perf_counter() + seconds
    with PolicyClient(endpoint, timeout_s=30.0) as c:
        while time.perf_counter() < t_end:
            sent += c.send_transitions(rows)["accepted"]
    out.put(sent)


def actor_steps_per_s(base, residual, task: str, steps: int) -> float:
    from robot_rl.envs.vector import make_vector_env
    from robot_rl.stages.evaluation import CombinedPolicy

    venv, rng = make_vector_env(task, 2), np.random.default_rng(0)
    try:
        obs, _ = venv.reset(seed=[0, 1])
        pol = CombinedPolicy(base, residual, 2, seed=0)
        pol.reset(np.ones(2, bool), obs)
        t0 = time.perf_counter()
        for _ in range(steps):
            obs, _, term, trunc, _ = venv.step(pol.act(obs))
            if (term | trunc).any():  # new episodes for both envs (seeded), as an actor starts them
                obs, _ = venv.reset(seed=[int(s) for s in rng.integers(0, 10**6, 2)])
                pol.reset(np.ones(2, bool), obs)
            else:
                pol.observe(obs, None)
        return 2 * steps / (time.perf_counter() - t0)
    finally:
        venv.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(FIXTURE))
    p.add_argument("--task", default="place")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rows", type=int, default=64, help="rows per transitions request")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--pushes", type=int, default=30)
    p.add_argument("--env-steps", type=int, default=200, help="reference: steps of the 2-env actor")
    a = p.parse_args()

    import torch

    from robot_rl.envs.vector import make_vector_env
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.collector import env_obs_dims
    from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, freeze
    from robot_rl.rl.td3 import TD3Config
    from robot_rl.serve.client import PolicyClient
    from robot_rl.serve.learner import TransitionInbox
    from robot_rl.serve.server import PolicyServer, PolicyService, ServeConfig

    torch.set_num_threads(1)
    base = load_policy(a.base)
    base.freeze()
    probe = make_vector_env(a.task, 1)
    dims = env_obs_dims(probe)
    probe.close()
    residual = ResidualPolicy(ResidualConfig(head="tanh").derive(base.config, a.task, dims))
    with torch.no_grad():  # non-zero weights, so a push really changes what is served
        for prm in residual.parameters():
            prm.add_(0.01)
    obs_dims = {k: int(base.config.obs_dims[k]) for k in base.config.obs_keys}

    service = PolicyService(base, residual=freeze(residual), config=ServeConfig(port=0, allow_push=True))
    inbox = TransitionInbox(TD3Config(learning_starts=10**12))
    service.learner = inbox
    server = PolicyServer(service)
    endpoint = server.bind()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    drained = [0]

    def consume():
        while not inbox.stop:
            for req in inbox.drain(0.2):
                drained[0] += len(req["sessions"])
                inbox.consumed += len(req["sessions"])

    threading.Thread(target=consume, daemon=True).start()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(endpoint, a.rows, obs_dims, a.seconds, q)) for _ in range(a.clients)]
    t0 = time.perf_counter()
    for pr in procs:
        pr.start()
    sent = sum(q.get(timeout=a.seconds + 120) for _ in procs)
    for pr in procs:
        pr.join()
    wall = time.perf_counter() - t0
    time.sleep(0.5)
    ingest = sent / wall
    print(f"ingest: {sent} rows from {a.clients} clients in {wall:.1f} s (incl. process start) = {ingest:.0f} rows/s; "
          f"drained {drained[0]}", flush=True)

    from safetensors.torch import save as st_save

    nbytes = len(st_save({k: v.contiguous() for k, v in residual.state_dict().items()}))
    push_ms, seen_ms = [], []
    obs0 = {k: np.zeros(d, np.float32) for k, d in obs_dims.items()}
    with PolicyClient(endpoint, timeout_s=30.0) as pusher, PolicyClient(endpoint, timeout_s=30.0) as actor:
        for v in range(1, a.pushes + 1):
            t = time.perf_counter()
            pusher.push_weights(residual, version=v)
            push_ms.append(1e3 * (time.perf_counter() - t))
            step = 0
            while True:  # a new session plans a fresh chunk: the first reply after the push shows the version
                r = actor.act(f"probe-{v}", step, obs0, reset=True, seed=v)
                if r.residual_version == v:
                    break
                step += 1
            seen_ms.append(1e3 * (time.perf_counter() - t))
    inbox.stop = True
    server.stop()
    print(f"weight push: {nbytes} bytes, median {np.median(push_ms):.1f} ms (p95 {np.percentile(push_ms, 95):.1f}); "
          f"seen by an acting session after median {np.median(seen_ms):.1f} ms", flush=True)

    ref = actor_steps_per_s(base, residual, a.task, a.env_steps)
    print(f"reference: one 2-env actor steps {ref:.0f} env steps/s", flush=True)
    print(json.dumps({"ingest_rows_per_s": ingest, "rows_per_request": a.rows, "clients": a.clients,
                      "push_bytes": nbytes, "push_ms_median": float(np.median(push_ms)),
                      "push_ms_p95": float(np.percentile(push_ms, 95)),
                      "push_seen_ms_median": float(np.median(seen_ms)),
                      "actor_env_steps_per_s": ref, "ratio_ingest_to_actor": ingest / ref}, indent=1))


if __name__ == "__main__":
    main()
