"""Learning on the robot without ROS or real time: ``robot-rl learn``'s learner (:func:`robot_rl.serve.learner.
learn_online`, in a thread) and, as the robot, one simulated env driven through :class:`robot_rl.serve.actor.
EpisodeActor` -- the very object the ROS 2 policy node runs with ``learn:=true`` -- labelled by the task's success
and failure predicates as the scripted operator does, optionally with its takeovers
(:class:`robot_rl.envs.experts.ScriptedIntervention`).

Each episode starts only once the learner has taken every row sent (backlog 0), as at 10 Hz on a robot, where the
updates keep up; the simulator itself runs as fast as it can. Use it to try learner settings in minutes before
spending robot time (the README's "Learning on the robot" section reports what it gave).

    python scripts/learn_episode_actor.py --base runs/base4/checkpoint --init-from runs/td3_decay_s0/seed_0 \
        --out runs/ea_rl --backend pybullet --tolerance 0.004 --env-steps 18000 [--intervene]
    robot-rl eval --base runs/base4/checkpoint --residual runs/ea_rl/checkpoint --backend pybullet --task place \
        --set task.tolerance=0.004 --episodes 100 --out runs/ea_rl/eval
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch

from robot_rl.envs.env import make_env
from robot_rl.envs.experts import ScriptedIntervention
from robot_rl.envs.vector import env_kwargs_for
from robot_rl.policies.checkpoint import load_policy
from robot_rl.rl.td3 import TD3Config
from robot_rl.serve.actor import EpisodeActor
from robot_rl.serve.client import PolicyClient
from robot_rl.serve.learner import learn_online


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--init-from", default="", help="td3.init_from: a trained TD3 run to start from")
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="pybullet")
    p.add_argument("--tolerance", type=float, default=0.004)
    p.add_argument("--env-steps", type=int, default=18_000)
    p.add_argument("--intervene", action="store_true", help="the scripted operator's takeovers")
    p.add_argument("--within-reach", action="store_true", help="with --intervene: execute each takeover step "
                   "projected into the residual's reach (EpisodeActor's human_within_reach)")
    p.add_argument("--seed", type=int, default=0, help="the learner's and the exploration's seed")
    p.add_argument("--seed-start", type=int, default=5_000_000, help="episode i runs on seed SEED_START + i "
                   "(training range: disjoint from validation 500 000+ and evaluation 1 000 000-1 000 999)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                   help="a TD3Config field, e.g. --set utd_ratio 0.5 (defaults: the README's run)")
    a = p.parse_args()
    torch.set_num_threads(1)
    base = load_policy(a.base)
    tk = {"tolerance": a.tolerance}
    fields = {"total_env_steps": a.env_steps, "n_envs": 1, "learning_starts": 2000, "critic_warmup_updates": 500,
              "explore_std": 0.3, "utd_ratio": 0.5, "val_every": 0, "init_from": a.init_from, "log_every": 1000,
              "seed": a.seed}
    for k, v in a.set:
        fields[k] = type(getattr(TD3Config, k))(v)
    td3 = TD3Config(**fields)
    out = Path(a.out)
    stop, endpoint, res = threading.Event(), [], {}
    learner = threading.Thread(target=lambda: res.update(r=learn_online(
        base, "place", td3, out, store=out / "episodes.zarr", task_kwargs=tk, env_kwargs={"backend": a.backend},
        progress=False, stop=stop, ready=endpoint.append)), daemon=True)
    learner.start()
    while not endpoint:
        if not learner.is_alive():
            raise SystemExit("the learner failed to start (its error is above)")
        time.sleep(0.1)
    env = make_env("place", task_kwargs=tk, render_mode=None, **env_kwargs_for(base.config, "place", tk,
                                                                               {"backend": a.backend}))
    client = PolicyClient(endpoint[0], timeout_s=60.0)
    actor = EpisodeActor(client, name="arm", seed=a.seed, human_within_reach=a.within_reach)
    rule = ScriptedIntervention() if a.intervene else None
    log, total, t0 = [], 0, time.time()
    try:
        while total < a.env_steps:
            obs, _ = env.reset(seed=a.seed_start + len(log))
            while client.ping()["learner"]["backlog"] > 0:  # the learner keeps up, as at 10 Hz on a robot
                time.sleep(0.1)
            actor.start(seed=len(log))
            if rule is not None:
                rule.reset()
            info, step = {}, 0
            for step in range(env.unwrapped.task.max_steps):
                human = rule(obs) if rule is not None else None
                obs, _, term, trunc, info = env.step(actor.act({k: v for k, v in obs.items()
                                                                if not k.startswith("image_")}, human=human))
                if term or trunc:
                    break
            final = {k: v for k, v in obs.items() if not k.startswith("image_")}
            actor.end(final, bool(info.get("success", False)))
            total += step + 1
            log.append({"steps": step + 1, "success": bool(info.get("success", False)),
                        "intervention_steps": rule.steps if rule is not None else 0})
            if len(log) % 20 == 0:
                w = log[-20:]
                print(f"{time.time() - t0:.0f} s: {total} env steps, {len(log)} episodes; last 20: success "
                      f"{np.mean([r['success'] for r in w]):.2f}, taken over "
                      f"{np.mean([r['intervention_steps'] > 0 for r in w]):.2f}", flush=True)
    finally:
        stop.set()
        learner.join(600)
        client.close()
        env.close()
    (out / "episodes_log.json").write_text(json.dumps(log))
    print(f"done: {total} env steps in {time.time() - t0:.0f} s; residual in {out / 'checkpoint'}")


if __name__ == "__main__":
    main()
