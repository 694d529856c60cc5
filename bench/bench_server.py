"""Policy-server latency and throughput over loopback, each beside the in-process call measured in the same run.

A real server process (``python -m robot_rl.cli serve``, 1 torch thread) serves the default diffusion config of
``bench_inference.py`` (state obs dim 30, action dim 5, U-Net 64/128/256, DDIM 10 steps) plus a residual MLP
(256, 256); clients are threads of this process, one :class:`PolicyClient` and one session each.

- ``step`` mode, 1 client: one request per control step (the server runs the base every Ta = 8 steps and the
  residual every step), against ``CombinedPolicy.act`` in-process on the same observations. The p50 difference is
  the loopback overhead (encode, send, decode, session bookkeeping, reply).
- ``chunk`` mode, C = 1, 4, 16 concurrent clients: every request asks for a new chunk (base + residual), all
  clients in lockstep. Against the in-process reference: C single-env calls one after the other (unbatched), and
  one batched call over C envs. Also a second server with ``--max-batch 1`` (no batching) at the largest C.

    python bench/bench_server.py [--requests 30] [--clients 1 4 16] [--window-ms 10] [--kind diffusion|bc]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from robot_rl.stages.evaluation import CombinedPolicy
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.policies.checkpoint import save_policy
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, save_residual
from robot_rl.serve.client import PolicyClient

OBS, ACT = 30, 5


def start_server(base, res, *extra) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", "serve", "--checkpoint", base, "--residual", res,
                          "--port", "0", "--threads", "1", *map(str, extra)], stdout=subprocess.PIPE, text=True,
                         env=env)
    m = re.search(r"listening on tcp://([\d.]+:\d+)", p.stdout.readline())
    if m is None:
        p.kill()
        raise SystemExit("server did not start")
    PolicyClient(m.group(1)).wait_ready(60)
    return p, m.group(1)


def pct(x, q) -> float:
    return float(np.percentile(np.asarray(x), q))


def run_clients(addr: str, n: int, requests: int, rng) -> tuple[list[float], float, list[int]]:
    """n lockstep client threads, each ``requests`` new-chunk acts: (latencies ms, throughput req/s, batch sizes)."""
    lat, sizes, errors = [], [], []
    barrier = threading.Barrier(n + 1)
    obs = rng.uniform(-1, 1, (n, requests + 1, OBS)).astype(np.float32)
    lock = threading.Lock()

    def client(i):
        try:
            with PolicyClient(addr, timeout_s=60) as c:
                c.act(f"c{i}", 0, {"state": obs[i, 0]}, reset=True, seed=i)
                barrier.wait()
                mine, bs = [], []
                for t in range(1, requests + 1):
                    t0 = time.perf_counter()
                    r = c.act(f"c{i}", t, {"state": obs[i, t]}, new_chunk=True)
                    mine.append((time.perf_counter() - t0) * 1e3)
                    bs.append(r.timing["batch_size"])
                with lock:
                    lat.extend(mine)
                    sizes.extend(bs)
        except Exception as e:
            errors.append(e)
            barrier.abort()

    ths = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for th in ths:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return lat, n * requests / wall, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="timed requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--window-ms", type=float, default=10.0, help="server --batch-window-ms")
    ap.add_argument("--kind", default="diffusion", choices=["diffusion", "bc"])
    ap.add_argument("--steps", type=int, default=200, help="control steps of the step-mode run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stats = {"state": {"min": -np.ones(OBS), "max": np.ones(OBS)}, "action": {"min": -np.ones(ACT),
                                                                               "max": np.ones(ACT)}}
    base = make_policy(PolicyConfig(kind=args.kind, obs_keys=["state"], obs_dims={"state": OBS}, action_dim=ACT),
                       stats).freeze()
    res = ResidualPolicy(ResidualConfig(obs_keys=["state"], obs_dims={"state": OBS}, action_dim=ACT))
    with torch.no_grad():
        res.actor.net[-1].weight.normal_(0, 0.1)
    res.eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_server_"))
    save_policy(base, tmp / "base")
    save_residual(res, tmp / "res")
    c = base.config
    print(f"torch {torch.__version__}, 1 torch thread in server and in-process; {args.kind} base "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params (To={c.n_obs_steps}, Ta={c.n_action_steps},"
          f" DDIM {c.num_inference_steps}), residual MLP 256x256; batch window {args.window_ms} ms; "
          f"{args.requests} timed requests per client; {os.cpu_count()} CPU cores (shared machine)")
    rng = np.random.default_rng(0)
    one = np.ones(1, bool)

    # ---- step mode, 1 client ------------------------------------------------------------------------------------
    proc, addr = start_server(tmp / "base", tmp / "res", "--batch-window-ms", args.window_ms)
    try:
        obs = rng.uniform(-1, 1, (args.steps, OBS)).astype(np.float32)
        ref = CombinedPolicy(base, res, 1, seed=0)
        inproc = []
        for t in range(args.steps):
            ob = {"state": obs[t][None]}
            t0 = time.perf_counter()
            ref.reset(one, ob) if t == 0 else ref.observe(ob, None)
            ref.act(ob)
            inproc.append((time.perf_counter() - t0) * 1e3)
        srv = []
        with PolicyClient(addr, timeout_s=60) as cl:
            cl.metadata()
            for t in range(args.steps):
                t0 = time.perf_counter()
                cl.act("step", t, {"state": obs[t]}, reset=t == 0, seed=0 if t == 0 else None)
                srv.append((time.perf_counter() - t0) * 1e3)
            cl.close_session("step")
        ip, sv = np.array(inproc[8:]), np.array(srv[8:])  # after one chunk of warm-up
        print(f"\nstep mode, 1 client, {len(sv)} control steps (a base call every {c.n_action_steps} steps):")
        print(f"{'':>12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        print(f"{'in-process':>12} {pct(ip, 50):>8.3f} {pct(ip, 99):>8.3f} {ip.mean():>8.3f}")
        print(f"{'server':>12} {pct(sv, 50):>8.3f} {pct(sv, 99):>8.3f} {sv.mean():>8.3f}")
        print(f"loopback overhead p50: {pct(sv, 50) - pct(ip, 50):.3f} ms (goal <= 2 ms); "
              f"ratio server/in-process p50 {pct(sv, 50) / pct(ip, 50):.2f}")

        # ---- chunk mode, C clients -------------------------------------------------------------------------------
        print("\nchunk mode (every request runs the base), lockstep clients; in-process = the same work in this "
              "process:")
        print(f"{'clients':>7} | {'server p50':>10} {'p99':>8} {'req/s':>7} {'mean batch':>10} | "
              f"{'in-proc 1-env p50':>17} {'unbatched req/s':>15} | {'in-proc batched p50':>19} {'req/s':>7}")
        rows = {}
        for n in args.clients:
            lat, thr, sizes = run_clients(addr, n, args.requests, rng)
            # in-process: n single-env calls one after the other, and one batched call over n envs
            single, batched = [], []
            pols = [CombinedPolicy(base, res, 1, seed=i) for i in range(n)]
            bpol = CombinedPolicy(base, res, n, seed=0)
            all_mask = np.ones(n, bool)
            for it in range(min(args.requests, 10) + 1):
                ob = {"state": rng.uniform(-1, 1, (n, 1, OBS)).astype(np.float32)[:, 0]}
                for i, pol in enumerate(pols):
                    obi = {"state": ob["state"][i:i + 1]}
                    pol.reset(one, obi) if it == 0 else pol.observe(obi, None)
                    pol.drop_chunks()
                    t0 = time.perf_counter()
                    pol.act(obi)
                    single.append((time.perf_counter() - t0) * 1e3)
                bpol.reset(all_mask, ob) if it == 0 else bpol.observe(ob, None)
                bpol.drop_chunks()
                t0 = time.perf_counter()
                bpol.act(ob)
                batched.append((time.perf_counter() - t0) * 1e3)
            single, batched = single[n:], batched[1:]
            rows[n] = thr
            print(f"{n:>7} | {pct(lat, 50):>10.2f} {pct(lat, 99):>8.2f} {thr:>7.1f} {np.mean(sizes):>10.2f} | "
                  f"{pct(single, 50):>17.2f} {1e3 / np.mean(single):>15.1f} | {pct(batched, 50):>19.2f} "
                  f"{n * 1e3 / np.mean(batched):>7.1f}")
    finally:
        proc.terminate()
        proc.wait()

    # ---- no batching at the largest client count -------------------------------------------------------------------
    n = max(args.clients)
    proc, addr = start_server(tmp / "base", tmp / "res", "--max-batch", 1)
    try:
        lat, thr1, sizes = run_clients(addr, n, args.requests, rng)
    finally:
        proc.terminate()
        proc.wait()
    print(f"{n:>7} | {pct(lat, 50):>10.2f} {pct(lat, 99):>8.2f} {thr1:>7.1f} {np.mean(sizes):>10.2f} | "
          f"server with --max-batch 1 (no batching)")
    print(f"\nbatching raises server throughput at {n} clients by x{rows[n] / thr1:.2f} "
          f"({rows[n]:.1f} vs {thr1:.1f} req/s)")


if __name__ == "__main__":
    main()
