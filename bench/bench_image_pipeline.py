"""Time per training step and images/s of an image BC student through ``train_base``, against the state-only BC step
measured in the same run on the same store (issue 18: the image pipeline fast enough to be used).

- Store: ``--episodes`` scripted ``place`` episodes with the front and wrist cameras at ``--image-size`` (64x64),
  collected into a temp dir (``robot_rl.stages.collect``, as ``robot-rl collect --cameras front wrist`` does).
- Runs (each a real :func:`robot_rl.stages.train_base.train_base`, ``kind=bc``, batch ``--batch`` 64, no validation
  split): the state-only reference (obs keys ee_pos, ee_quat, gripper_width, cube_pos, cube_quat, target_pos), then
  the image student (obs keys ee_pos, ee_quat, gripper_width + image_front, image_wrist; image_channels [16, 32, 64],
  image_crop [58, 58], bc_hidden [256, 256]) with ``loader_workers`` 0 and ``--workers`` (2), with
  ``shared_image_encoder``, and with ``freeze_image_encoder`` initialised from the first image run's checkpoint
  (``init_from``; loader_workers 0).
- Timing: train_base logs the training loss to its writer every 50 steps; a writer that only reads the clock gives
  the steady-state time per step from step 50 to the last multiple of 50 (start-up, the first batches and worker
  start excluded). images/s = batch x n_obs_steps x cameras / step time (frames decoded and encoded per second).
- Decode alone: windows/s and images/s of the training DataLoader without a model (the same dataset and batch),
  in-process and with ``--workers``, to tell the decoding cost from the encoder's.

The ratios are image step time / state-only step time (how many times dearer a step is) and workers / shared /
frozen step time against the 0-worker image step (> 1: faster), all from this run.

    python bench/bench_image_pipeline.py [--episodes 20] [--steps 150] [--batch 64] [--workers 2] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

STATE_KEYS = ["ee_pos", "ee_quat", "gripper_width", "cube_pos", "cube_quat", "target_pos"]
PROPRIO_KEYS = ["ee_pos", "ee_quat", "gripper_width"]
IMAGE_KEYS = ["image_front", "image_wrist"]
EVERY = 50  # train_base logs base/train_loss every 50 steps


class StepClock:
    """A TensorBoard-writer stand-in that records (step, time) at each ``base/train_loss`` log."""

    def __init__(self):
        self.marks: list[tuple[int, float]] = []

    def add_scalar(self, tag, value, step):
        if tag == "base/train_loss":
            self.marks.append((int(step), time.perf_counter()))

    def step_s(self) -> float:
        """Seconds per step between the first and the last mark (steps 50 ... last multiple of 50)."""
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (s1 - s0)


def run(store, out: Path, a, *, image: bool, workers: int = 0, policy=None, init_from=None) -> dict:
    from robot_rl.stages.train_base import BaseTrainConfig, train_base

    pol = {"bc_hidden": [256, 256], **(policy or {})}
    if image:
        pol.update(image_channels=[16, 32, 64], image_crop=[a.crop, a.crop])
    cfg = BaseTrainConfig(kind="bc", obs_keys=PROPRIO_KEYS if image else STATE_KEYS,
                          image_keys=IMAGE_KEYS if image else [], steps=a.steps, batch_size=a.batch, val_ratio=0.0,
                          warmup_steps=0, seed=0, policy=pol, loader_workers=workers,
                          init_from=None if init_from is None else str(init_from))
    clock = StepClock()
    t0 = time.perf_counter()
    summary = train_base(store, out, cfg, writer=clock, progress=False)
    step_s = clock.step_s()
    frames = a.batch * 2 * (len(IMAGE_KEYS) if image else 0)  # n_obs_steps = 2 (PolicyConfig default)
    return {"step_ms": 1e3 * step_s, "images_per_s": frames / step_s, "windows_per_s": a.batch / step_s,
            "timed_steps": clock.marks[-1][0] - clock.marks[0][0], "wall_s": time.perf_counter() - t0,
            "final_loss": summary["final_loss"], "checkpoint": summary["checkpoint"]}


def decode_rate(store, a, workers: int, batches: int) -> dict:
    """Windows/s and images/s of the training DataLoader alone (the image student's keys, batch ``a.batch``)."""
    from robot_rl.datasets.sampler import SequenceSampler, WindowDataset
    from robot_rl.datasets.store import ZarrStore

    s = ZarrStore.open(store, mode="r")
    keys = [*PROPRIO_KEYS, *IMAGE_KEYS]
    ds = WindowDataset(SequenceSampler(s, [*keys, "action"], keys, 16, 2))
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch, num_workers=workers, persistent_workers=workers > 0,
                                         sampler=torch.utils.data.RandomSampler(ds, replacement=True,
                                                                                num_samples=10**9))
    it = iter(loader)
    for _ in range(max(2, workers * 2)):  # start-up: workers started, prefetch queue filled
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = (time.perf_counter() - t0) / batches
    del it
    return {"batch_ms": 1e3 * dt, "windows_per_s": a.batch / dt, "images_per_s": a.batch * 2 * len(IMAGE_KEYS) / dt}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--steps", type=int, default=150, help="training steps per run (timed: 50 ... last multiple of 50)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader_workers of the worker run")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--crop", type=int, default=None, help="image_crop side (default: image size - 6, i.e. 58)")
    p.add_argument("--decode-batches", type=int, default=50, help="batches timed by the decode-only measurement")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    a = p.parse_args()
    if a.steps < 2 * EVERY:
        p.error(f"--steps must be >= {2 * EVERY} (steps {EVERY} ... {2 * EVERY} at least are timed)")
    a.crop = a.crop or a.image_size - 6
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from robot_rl.stages.collect import collect

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        tmp = Path(tmp)
        store = tmp / "demos.zarr"
        t = time.perf_counter()
        c = collect(store, "place", a.episodes, cameras=("front", "wrist"), image_size=(a.image_size,) * 2,
                    progress=False)
        print(f"store    {c['episodes']} place episodes, {c['n_steps']} steps, front + wrist {a.image_size}x"
              f"{a.image_size} ({time.perf_counter() - t:.0f} s)", flush=True)
        res = {"decode": {}}
        for w in (0, a.workers):
            res["decode"][f"workers_{w}"] = d = decode_rate(store, a, w, a.decode_batches)
            print(f"decode   loader_workers {w}: {d['images_per_s']:8.0f} images/s ({d['batch_ms']:.1f} ms per batch "
                  f"of {a.batch} windows, no model)", flush=True)
        runs = [("state_only", dict(image=False)), ("image_workers_0", dict(image=True)),
                (f"image_workers_{a.workers}", dict(image=True, workers=a.workers)),
                ("image_shared", dict(image=True, policy={"shared_image_encoder": True}))]
        for name, kw in runs:
            res[name] = run(store, tmp / name, a, **kw)
            print(f"train    {name:22s} {res[name]['step_ms']:8.1f} ms/step {res[name]['images_per_s']:8.0f} images/s",
                  flush=True)
        res["image_frozen"] = run(store, tmp / "image_frozen", a, image=True, init_from=res["image_workers_0"]
                                  ["checkpoint"], policy={"freeze_image_encoder": True})
        print(f"train    {'image_frozen':22s} {res['image_frozen']['step_ms']:8.1f} ms/step "
              f"{res['image_frozen']['images_per_s']:8.0f} images/s", flush=True)
    ref, base = res["state_only"]["step_ms"], res["image_workers_0"]["step_ms"]
    images = [k for k in res if k.startswith("image_")]
    res["ratio_step_to_state_only"] = {k: res[k]["step_ms"] / ref for k in images}
    res["speedup_vs_image_workers_0"] = {k: base / res[k]["step_ms"] for k in images if k != "image_workers_0"}
    for k in ("state_only", *images):
        res[k].pop("checkpoint")
    res["setup"] = {"episodes": c["episodes"], "store_steps": c["n_steps"], "batch": a.batch, "steps": a.steps,
                    "image_size": a.image_size, "crop": a.crop, "torch_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load_average_end": os.getloadavg()[0]}
    print(json.dumps(res, indent=1))
    r = res["ratio_step_to_state_only"]
    s = res["speedup_vs_image_workers_0"]
    w = f"image_workers_{a.workers}"
    print(f"summary: state-only {ref:.1f} ms/step; image step x{r['image_workers_0']:.1f} of it "
          f"({res['image_workers_0']['images_per_s']:.0f} images/s); speed vs that: {a.workers} workers "
          f"x{s[w]:.2f} ({res[w]['images_per_s']:.0f} images/s), shared x{s['image_shared']:.2f}, "
          f"frozen x{s['image_frozen']:.2f}")


if __name__ == "__main__":
    main()
