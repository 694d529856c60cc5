"""Where ``place`` episodes missed: the horizontal cube-to-target error at each episode's last recorded step, split
by the stored success label. A systematic miss (a mean error well away from zero, compared with its spread) is a
bias a residual can learn to cancel; a wide spread with no bias is not.

    robot-rl eval --base runs/base4/checkpoint --residual RUN/checkpoint --backend pybullet --task place \
        --set task.tolerance=0.004 --episodes 100 --seed-start 500000 --out runs/diag --record runs/diag.zarr
    python scripts/placement_errors.py runs/diag.zarr

Input: a store whose episodes carry ``cube_to_target`` (target - cube, m, base frame; the ``place`` task's
observation), e.g. one written by ``robot-rl eval --record`` or ``robot-rl learn``. The last recorded step is the
observation before the episode's last action (stores keep (o_t, a_t) pairs). Errors in mm, x and y of the base
frame; prints one line per label.
"""

from __future__ import annotations

import argparse

import numpy as np

from robot_rl.datasets.store import ZarrStore


def final_errors(store: ZarrStore) -> tuple[np.ndarray, np.ndarray]:
    """(errors (N, 2) float64 m: target - cube in x, y at each episode's last recorded step, success (N,) bool)."""
    if "cube_to_target" not in store.keys:
        raise SystemExit(f"the store has no cube_to_target (keys: {sorted(store.keys)}): record place episodes")
    err = [store.get_episode(i, keys=["cube_to_target"])["cube_to_target"][-1, :2] for i in range(store.n_episodes)]
    ok = [bool(m["success"]) for m in store.episodes_meta()]
    return np.asarray(err, np.float64).reshape(-1, 2), np.asarray(ok, bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    a = p.parse_args()
    err, ok = final_errors(ZarrStore.open(a.store, mode="r"))
    print(f"{len(ok)} episodes, {int(ok.sum())} successes")
    for name, m in (("failed", ~ok), ("succeeded", ok)):
        if not m.any():
            continue
        e = err[m] * 1000
        print(f"{name} ({int(m.sum())}): target - cube [mm] mean x {e[:, 0].mean():+.1f} y {e[:, 1].mean():+.1f}, "
              f"std x {e[:, 0].std():.1f} y {e[:, 1].std():.1f}, median x {np.median(e[:, 0]):+.1f} y "
              f"{np.median(e[:, 1]):+.1f}, median |error| {np.median(np.linalg.norm(e, axis=1)):.1f}")


if __name__ == "__main__":
    main()
