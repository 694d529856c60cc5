"""Replay a store's recorded ``place`` actions open loop, from the same seeds, on another simulator: does the arm
follow the same path, and where does the cube end up? Separates a control gap (the end effector goes elsewhere) from
a contact gap (the same path, the cube held or set down elsewhere).

    robot-rl eval --base runs/base4/checkpoint --residual RUN/checkpoint --backend mujoco --task place \
        --set task.tolerance=0.004 --episodes 100 --seed-start 500000 --out runs/diag/mj --record runs/diag/mj.zarr
    python scripts/replay_actions.py runs/diag/mj.zarr --backend pybullet --tolerance 0.004 --episodes 30

Replays the first ``--episodes`` successful episodes (each from its stored seed, no randomization, as ``robot-rl
eval`` records them) and compares, step by step, the replay's observations with the stored ones (the observation
before each action): end-effector position, the cube's offset in the gripper while lifted (``ee_pos - cube_pos``
when the cube is > 2 cm above its start in both), and the cube's final position. Prints mm in the base frame.
Replaying on the recording's own simulator reproduces it exactly (the check that the replay is faithful).
"""

from __future__ import annotations

import argparse

import numpy as np

from robot_rl.datasets.store import ZarrStore
from robot_rl.envs.env import make_env

LIFTED = 0.02  # m above the cube's start height: the cube is in the gripper


def replay(store: ZarrStore, backend: str, tolerance: float, n_episodes: int) -> dict:
    """Per replayed episode: success on the replay, and (T, 3) arrays of stored / replayed ``ee_pos`` and
    ``cube_pos`` over the steps both have. Returns {"success": [...], "ee": [(stored, replayed)], "cube": [...]}."""
    env = make_env("place", backend=backend, task_kwargs={"tolerance": tolerance}, render_mode=None)
    out = {"success": [], "ee": [], "cube": []}
    try:
        for i, m in enumerate(store.episodes_meta()):
            if len(out["success"]) >= n_episodes:
                break
            if not m["success"] or m["task"] != "place":
                continue
            ep = store.get_episode(i, keys=["action", "ee_pos", "cube_pos"])
            obs, _ = env.reset(seed=int(m["seed"]))
            ee, cube, info = [], [], {}
            for a in ep["action"]:
                ee.append(obs["ee_pos"])
                cube.append(obs["cube_pos"])
                obs, _, term, trunc, info = env.step(a)
                if term or trunc:
                    break
            t = len(ee)
            out["success"].append(bool(info.get("success", False)))
            out["ee"].append((ep["ee_pos"][:t], np.array(ee)))
            out["cube"].append((ep["cube_pos"][:t], np.array(cube)))
    finally:
        env.close()
    return out


def summary(r: dict) -> dict:
    """mm: ee path difference (mean |replay - stored| per axis), in-hand offset difference (mean, std over
    episodes), final cube xy difference (mean, std over episodes)."""
    path, hand, final = [], [], []
    for (e0, e1), (c0, c1) in zip(r["ee"], r["cube"]):
        path.append(np.abs(e1 - e0).mean(0))
        both = (c0[:, 2] > c0[0, 2] + LIFTED) & (c1[:, 2] > c1[0, 2] + LIFTED)
        if both.any():
            hand.append(((e1 - c1)[both] - (e0 - c0)[both]).mean(0))
        final.append(c1[-1, :2] - c0[-1, :2])
    mm = lambda a: np.round(np.asarray(a, np.float64) * 1000, 1).tolist()  # noqa: E731
    return {"episodes": len(r["success"]), "successes": int(sum(r["success"])),
            "ee_path_mm": mm(np.mean(path, 0)), "in_hand_mm": mm(np.mean(hand, 0)) if hand else None,
            "in_hand_std_mm": mm(np.std(hand, 0)) if hand else None, "final_cube_xy_mm": mm(np.mean(final, 0)),
            "final_cube_xy_std_mm": mm(np.std(final, 0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--backend", default="pybullet")
    p.add_argument("--tolerance", type=float, default=0.004, help="place tolerance [m] of the replay's task")
    p.add_argument("--episodes", type=int, default=30)
    a = p.parse_args()
    s = summary(replay(ZarrStore.open(a.store, mode="r"), a.backend, a.tolerance, a.episodes))
    print(f"replayed {s['episodes']} successful episodes on {a.backend}: {s['successes']} succeed")
    print(f"end-effector path, mean |replay - stored| x y z [mm]: {s['ee_path_mm']}")
    print(f"cube in the gripper (ee - cube while lifted), replay - stored, mean {s['in_hand_mm']} std "
          f"{s['in_hand_std_mm']} [mm]")
    print(f"final cube x y, replay - stored, mean {s['final_cube_xy_mm']} std {s['final_cube_xy_std_mm']} [mm]")


if __name__ == "__main__":
    main()
