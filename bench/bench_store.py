"""Store and sampler throughput, each against a reference measured in the same run.

    python bench/bench_store.py [--episodes 20] [--steps 100] [--dir /tmp]

1. write: ZarrStore.add_episode of 96x96x3 uint8 frames + low-dim arrays (Blosc-zstd, one frame per chunk, crash-safe
   commit) vs ``np.save`` of the same arrays (uncompressed, one file per key per episode).
2. sample: SequenceSampler windows (T=16, To=2, image + low-dim obs, random order, batches of 256 through a
   DataLoader, num_workers=0) vs the same windows gathered by fancy indexing of in-memory numpy arrays.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robot_rl.datasets.sampler import SequenceSampler, WindowDataset
from robot_rl.datasets.store import ZarrStore


def synthetic_episode(i: int, T: int, hw: int = 96, noise: int = 0) -> dict[str, np.ndarray]:
    """Render-like frames (gradient background, moving square, optional +-noise sensor noise), smooth low-dim data."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:hw, 0:hw]
    bg = np.stack([x * 255 // hw, y * 255 // hw, np.full_like(x, 128)], -1).astype(np.int16)
    frames = np.repeat(bg[None], T, 0)
    for t in range(T):
        c = int(20 + 50 * t / T)
        frames[t, c:c + 16, c:c + 16] = (200, 30, 30)
    frames = np.clip(frames + rng.integers(-noise, noise + 1, frames.shape), 0, 255).astype(np.uint8)
    s = np.linspace(0, 1, T, dtype=np.float32)[:, None]
    return {"image_front": frames, "action": np.sin(s * np.arange(1, 8)).astype(np.float32),
            "joint_pos": np.cos(s * np.arange(1, 10)).astype(np.float32),
            "ee_pos": np.tile(s, 3).astype(np.float32), "cube_pos": np.tile(s, 3).astype(np.float32) * 0.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--windows", type=int, default=256 * 20)
    ap.add_argument("--noise", type=int, default=0, help="per-pixel +-noise (camera-like; 0 = clean render)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads; collate's torch.stack of small uint8 tensors got ~10x slower "
                         "with 2 threads on a shared 2-vCPU box")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_store_"))
    try:
        eps = [synthetic_episode(i, args.steps, noise=args.noise) for i in range(args.episodes)]
        frames = args.episodes * args.steps

        t0 = time.perf_counter()
        for i, ep in enumerate(eps):
            for k, v in ep.items():
                np.save(root / f"ref_{i}_{k}.npy", v)
        t_ref = time.perf_counter() - t0
        ref_bytes = sum(p.stat().st_size for p in root.glob("ref_*.npy"))

        t0 = time.perf_counter()
        store = ZarrStore.create(root / "store")
        for i, ep in enumerate(eps):
            store.add_episode(ep, seed=i, task="lift", source="scripted", success=True, backend="bench")
        t_store = time.perf_counter() - t0
        size = store.info()["size_bytes"]
        print(f"write  {frames} frames (96x96x3 + 4 low-dim keys, noise +-{args.noise}), torch threads "
              f"{torch.get_num_threads()}")
        print(f"  ZarrStore.add_episode : {frames / t_store:9.0f} frames/s  {size / 2**20:7.1f} MiB on disk")
        print(f"  np.save reference     : {frames / t_ref:9.0f} frames/s  {ref_bytes / 2**20:7.1f} MiB on disk")
        print(f"  speed ratio store/ref : {t_ref / t_store:9.3f}   size ratio store/ref: {size / ref_bytes:.3f}")

        keys, obs = ["image_front", "joint_pos", "ee_pos", "action"], ["image_front", "joint_pos", "ee_pos"]
        store = ZarrStore.open(root / "store", "r")
        order = np.random.default_rng(0).permutation(args.windows) % (frames)
        for cache in (False, True):
            sampler = SequenceSampler(store, keys, obs, horizon=16, n_obs_steps=2, cache_images=cache)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(WindowDataset(sampler), order.tolist()),
                                                 batch_size=256, num_workers=0)
            t0 = time.perf_counter()
            n = sum(len(b["action"]) for b in loader)
            t_s = time.perf_counter() - t0
            if not cache:
                t_lazy = t_s
        # reference: the same windows by fancy indexing of in-memory arrays (no per-sample Python, no torch)
        mem = {k: store[k][:] for k in keys}
        idx = np.stack([sampler.indices(int(i)) for i in order])
        t0 = time.perf_counter()
        for b in range(0, len(idx), 256):
            w = idx[b:b + 256]
            batch = {k: mem[k][w[:, :2] if k in obs else w] for k in keys}
            batch = {k: torch.from_numpy(v if v.dtype == np.uint8 else v.astype(np.float32)) for k, v in batch.items()}
        t_ref = time.perf_counter() - t0
        print(f"sample {n} windows (T=16, To=2, 96x96x3 image + 2 low-dim obs, batch 256, random order)")
        print(f"  sampler, images lazy from zarr : {n / t_lazy:9.0f} windows/s  ratio to ref {t_ref / t_lazy:.3f}")
        print(f"  sampler, images cached         : {n / t_s:9.0f} windows/s  ratio to ref {t_ref / t_s:.3f}")
        print(f"  numpy in-memory reference      : {n / t_ref:9.0f} windows/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
