"""Base-policy inference latency per action chunk, against a reference measured in the same run.

For the default diffusion state-obs config (obs dim 30, action dim 5, DDIM 10 steps, U-Net dims 64/128/256) at each
batch size, prints the median / p90 latency of ``predict_chunk`` (numpy in, numpy out) and of one bare U-Net forward
pass at that batch; the ratio chunk / (num_inference_steps x forward) is the overhead factor of everything around
the network (input checks, obs encoding, scheduler steps, transfers). Also prints the MLP BC policy's chunk latency.

    python bench/bench_inference.py [--calls 50] [--batches 1 16] [--threads N] [--device cpu] [--policy YAML]

``--policy '{down_dims: [32, 64, 128], num_inference_steps: 5}'`` times the ``full-diffusion`` preset's base instead.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import yaml

from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig


def timed(fn, calls: int, sync) -> np.ndarray:
    for _ in range(5):
        fn()
    out = []
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3  # ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policy", default="{}", help="YAML dict of PolicyConfig overrides for the diffusion policy")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    obs_dim, act_dim = 30, 5
    stats = {"state": {"min": -np.ones(obs_dim), "max": np.ones(obs_dim)},
             "action": {"min": -np.ones(act_dim), "max": np.ones(act_dim)}}
    torch.manual_seed(0)
    base = dict(obs_keys=["state"], obs_dims={"state": obs_dim}, action_dim=act_dim)
    diff = make_policy(PolicyConfig(kind="diffusion", **base, **(yaml.safe_load(args.policy) or {})),
                       stats).to(dev).freeze()
    bc = make_policy(PolicyConfig(kind="bc", **base), stats).to(dev).freeze()
    c = diff.config
    print(f"torch {torch.__version__}, device {dev}, intra-op threads {torch.get_num_threads()}, "
          f"{args.calls} timed calls after 5 warm-up calls")
    print(f"diffusion: {sum(p.numel() for p in diff.parameters()) / 1e6:.2f} M params, down_dims {c.down_dims}, "
          f"T={c.horizon} To={c.n_obs_steps} Ta={c.n_action_steps}, DDIM {c.num_inference_steps} steps; "
          f"BC MLP {c.bc_hidden}")
    print(f"{'batch':>5} {'chunk med':>10} {'chunk p90':>10} {'1 fwd med':>10} {'ratio':>6} "
          f"{'BC med':>8} {'BC p90':>8}   (ms; ratio = chunk / ({c.num_inference_steps} x fwd))")
    rng = np.random.default_rng(0)
    for b in args.batches:
        obs = {"state": rng.uniform(-1, 1, (b, c.n_obs_steps, obs_dim)).astype(np.float32)}
        x = torch.randn(b, c.horizon, act_dim, device=dev)
        t = torch.tensor(50, device=dev)
        with torch.no_grad():
            cond = diff.obs_encoder(diff._obs_tensors(obs), diff.normalizer)
            fwd = timed(lambda: diff.unet(x, t, cond), args.calls, sync)
        chunk = timed(lambda: diff.predict_chunk(obs), args.calls, sync)
        bcl = timed(lambda: bc.predict_chunk(obs), args.calls, sync)
        f_med, c_med = np.median(fwd), np.median(chunk)
        print(f"{b:>5} {c_med:>10.2f} {np.percentile(chunk, 90):>10.2f} {f_med:>10.3f} "
              f"{c_med / (c.num_inference_steps * f_med):>6.2f} {np.median(bcl):>8.3f} {np.percentile(bcl, 90):>8.3f}")


if __name__ == "__main__":
    main()
