"""Store and sampler against a diffusion_policy-style replay buffer written in the same run, with the same data.

    python bench/bench_store.py [--episodes 50] [--data place|synthetic] [--cache place.npz] [--windows 1024] [--v1]

Data: by default 50 scripted ``place`` episodes rendered by MuJoCo (96x96 front camera and every observation key,
as ``robot-rl collect`` records them; rolled out first, ~30 s, or loaded from ``--cache``); ``--data synthetic``:
generated frames (a gradient that per-frame codecs cannot compress, the worst case for ours) and 4 low-dim keys.

The reference is diffusion_policy's ``ReplayBuffer`` + ``SequenceSampler`` (real-stanford/diffusion_policy,
``diffusion_policy/common/replay_buffer.py`` and ``common/sampler.py``), re-implemented here over zarr-python's
format-2 support (no numba, no diffusion_policy import):

- write: ``add_episode`` = per key one ``resize`` and one ``__setitem__``, then ``episode_ends`` (resize + set);
  Blosc lz4 clevel 5 no shuffle; low-dim chunks from its ``get_optimal_chunks`` (the first episode's length);
  images in chunks of one frame ``(1, H, W, C)`` (as its image datasets write them; reference "dp"), and, second
  row, in ``get_optimal_chunks``' chunks too (what ``add_episode`` picks when no chunks are given: 73 frames of
  96x96x3; reference "dp-auto"). Its ``episode_ends`` rechunking is left out (it only slows it down).
- sample: ``create_indices`` (pad_before = To - 1, pad_after = Ta - 1) and ``sample_sequence`` with
  ``key_first_k`` = To for the observation keys, then the dataset's crop of the observations to To; from disk
  (the "dp" zarr), from a compressed ``MemoryStore`` copy of it (``copy_from_path(store=MemoryStore())``) and from
  numpy arrays (its ``copy_from_path`` without a store: "numpy path"). Windows are checked bit-identical to ours.
- both go through the same ``torch`` DataLoader (batch 64, num_workers 0, the same random windows).

Memory: ours = ``SequenceSampler.nbytes`` (low-dim decoded, frames as encoded in the store); theirs = the bytes
of the compressed MemoryStore, and the numpy path's arrays. Disk: bytes of all files, files and directories.
The ratios printed are ours / reference measured in this run (> 1: ours is faster or the reference is larger).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr

from robot_rl.datasets.sampler import SequenceSampler, WindowDataset
from robot_rl.datasets.store import ZarrStore, is_image

TASK = "place"


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


def place_episodes(n: int, cache: str | None) -> list[dict[str, np.ndarray]]:
    """``n`` scripted ``place`` episodes (MuJoCo, 96x96 front camera, every observation key), from ``cache`` (.npz)
    when it holds them, else rolled out (and saved there)."""
    if cache and os.path.exists(cache):
        z = np.load(cache)
        eps = [{k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{i}/")} for i in range(n)]
        if all(eps):
            return eps
    from robot_rl.envs.env import make_env
    from robot_rl.envs.experts import ScriptedExpert
    from robot_rl.stages.collect import rollout_expert

    env = make_env(TASK, "mujoco", cameras=("front",), image_size=(96, 96))
    eps = [rollout_expert(env, ScriptedExpert(TASK, noise=0.3, seed=i), i)[0].arrays() for i in range(n)]
    env.close()
    if cache:
        np.savez(cache, **{f"{i}/{k}": v for i, e in enumerate(eps) for k, v in e.items()})
    return eps


# ---------------------------------------------------------------------------------------------- the reference
def get_optimal_chunks(shape, dtype, target_chunk_bytes=2e6):
    """diffusion_policy's ``get_optimal_chunks`` (common/replay_buffer.py)."""
    itemsize = np.dtype(dtype).itemsize
    rshape = list(shape[::-1])
    split_idx = len(shape) - 1
    for i in range(len(shape) - 1):
        this_chunk_bytes = itemsize * np.prod(rshape[:i])
        next_chunk_bytes = itemsize * np.prod(rshape[:i + 1])
        if this_chunk_bytes <= target_chunk_bytes < next_chunk_bytes:
            split_idx = i
    rchunks = rshape[:split_idx]
    item_chunk_bytes = itemsize * np.prod(rshape[:split_idx])
    next_chunk_length = min(rshape[split_idx], math.ceil(target_chunk_bytes / item_chunk_bytes))
    rchunks.append(next_chunk_length)
    rchunks.extend([1] * (len(shape) - len(rchunks)))
    return tuple(int(c) for c in rchunks[::-1])


class DPReplayBuffer:
    """diffusion_policy's ``ReplayBuffer`` on a zarr format-2 group: ``data/<key>``, ``meta/episode_ends``."""

    def __init__(self, path, frame_chunks: bool, store=None):
        self.root = zarr.open_group(store if store is not None else str(path), mode="w", zarr_format=2)
        self.data, self.meta = self.root.create_group("data"), self.root.create_group("meta")
        self.ends = self.meta.create_array("episode_ends", shape=(0,), dtype=np.int64, chunks=(4096,),
                                           compressor=None, fill_value=0)
        self.frame_chunks, self.n = frame_chunks, 0
        self.compressor = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)

    def add_episode(self, ep: dict[str, np.ndarray]) -> None:
        T = len(next(iter(ep.values())))
        new_len = self.n + T
        for key, value in ep.items():
            if key not in self.data:
                chunks = ((1, *value.shape[1:]) if self.frame_chunks and is_image(value.dtype, value.shape[1:])
                          else get_optimal_chunks(value.shape, value.dtype))
                arr = self.data.create_array(key, shape=(new_len, *value.shape[1:]), chunks=chunks, dtype=value.dtype,
                                             compressor=self.compressor, fill_value=0)
            else:
                arr = self.data[key]
                arr.resize((new_len, *value.shape[1:]))
            arr[-T:] = value
        self.ends.resize((self.ends.shape[0] + 1,))
        self.ends[-1] = new_len
        self.n = new_len


def create_indices(episode_ends, sequence_length, pad_before=0, pad_after=0):
    """diffusion_policy's ``create_indices`` (common/sampler.py, numba there, numpy-free Python here; run once)."""
    pad_before = min(max(pad_before, 0), sequence_length - 1)
    pad_after = min(max(pad_after, 0), sequence_length - 1)
    out = []
    for i in range(len(episode_ends)):
        start_idx = 0 if i == 0 else episode_ends[i - 1]
        episode_length = episode_ends[i] - start_idx
        for idx in range(-pad_before, episode_length - sequence_length + pad_after + 1):
            buffer_start_idx = max(idx, 0) + start_idx
            buffer_end_idx = min(idx + sequence_length, episode_length) + start_idx
            start_offset = buffer_start_idx - (idx + start_idx)
            end_offset = (idx + sequence_length + start_idx) - buffer_end_idx
            out.append([buffer_start_idx, buffer_end_idx, start_offset, sequence_length - end_offset])
    return np.array(out, dtype=np.int64)


class DPDataset(torch.utils.data.Dataset):
    """diffusion_policy's ``SequenceSampler.sample_sequence`` + an image dataset's ``__getitem__`` (observations cut
    to To, everything to float32 tensors except uint8 frames, as our WindowDataset returns them)."""

    def __init__(self, arrays: dict, episode_ends, horizon: int, n_obs: int, pad_after: int, obs_keys):
        self.arrays, self.T, self.To, self.obs = arrays, horizon, n_obs, set(obs_keys)
        self.indices = create_indices(np.asarray(episode_ends), horizon, pad_before=n_obs - 1, pad_after=pad_after)
        self.key_first_k = {k: n_obs for k in obs_keys}

    def __len__(self):
        return len(self.indices)

    def sample_sequence(self, idx):
        buffer_start_idx, buffer_end_idx, sample_start_idx, sample_end_idx = self.indices[idx]
        result = {}
        for key, input_arr in self.arrays.items():
            if key not in self.key_first_k:
                sample = input_arr[buffer_start_idx:buffer_end_idx]
            else:
                n_data = buffer_end_idx - buffer_start_idx
                k_data = min(self.key_first_k[key], n_data)
                sample = np.zeros((n_data,) + input_arr.shape[1:], dtype=input_arr.dtype)  # NaN there (uint8: 0)
                sample[:k_data] = input_arr[buffer_start_idx:buffer_start_idx + k_data]
            data = sample
            if (sample_start_idx > 0) or (sample_end_idx < self.T):
                data = np.zeros(shape=(self.T,) + input_arr.shape[1:], dtype=input_arr.dtype)
                if sample_start_idx > 0:
                    data[:sample_start_idx] = sample[0]
                if sample_end_idx < self.T:
                    data[sample_end_idx:] = sample[-1]
                data[sample_start_idx:sample_end_idx] = sample
            result[key] = data
        return result

    def __getitem__(self, i):
        w = self.sample_sequence(i)
        return {k: torch.from_numpy(v[:self.To] if k in self.obs else v) if v.dtype == np.uint8 else
                torch.from_numpy((v[:self.To] if k in self.obs else v).astype(np.float32)) for k, v in w.items()}


# ---------------------------------------------------------------------------------------------- measuring
def disk_usage(path: Path) -> tuple[int, int, int, int]:
    """(bytes of all files, bytes allocated on disk to files and directories (``du``), files, directories)."""
    size = files = dirs = 0
    used = os.stat(path).st_blocks * 512
    for top, dn, fn in os.walk(path):
        dirs += len(dn)
        files += len(fn)
        for name in fn + dn:
            st = os.lstat(os.path.join(top, name))
            used += st.st_blocks * 512
            size += st.st_size if name in fn else 0
    return size, used, files, dirs


class PerItem(torch.utils.data.Dataset):
    """``ds`` without ``__getitems__``: the DataLoader then fetches window by window."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def loader_rate(ds, order, batch: int) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch, num_workers=0)
    t0 = time.perf_counter()
    n = sum(len(b["action"]) for b in loader)
    return n / (time.perf_counter() - t0), n


def mib(b: float) -> str:
    return f"{b / 2**20:8.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--steps", type=int, default=100, help="steps per synthetic episode (place: as rolled out)")
    ap.add_argument("--data", choices=("synthetic", "place"), default="place",
                    help="synthetic frames (fast) or scripted place episodes rendered by MuJoCo (every obs key)")
    ap.add_argument("--cache", default=None, help="npz file caching the place episodes between runs")
    ap.add_argument("--noise", type=int, default=0, help="synthetic: per-pixel +-noise (0 = clean render)")
    ap.add_argument("--windows", type=int, default=1024, help="windows sampled per sampler and round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved write rounds (medians are printed)")
    ap.add_argument("--v1", action="store_true", help="also write the version-1 layout (one file per frame)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads; collate's torch.stack of small uint8 tensors got ~10x slower "
                         "with 2 threads on a shared 2-vCPU box")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_store_"))
    try:
        if args.data == "place":
            eps = place_episodes(args.episodes, args.cache)
        else:
            eps = [synthetic_episode(i, args.steps, noise=args.noise) for i in range(args.episodes)]
        frames = sum(len(e["action"]) for e in eps)
        img = next(k for k, v in eps[0].items() if is_image(v.dtype, v.shape[1:]))
        print(f"data     {args.data}: {len(eps)} episodes, {frames} steps, {len(eps[0])} keys, {img} "
              f"{eps[0][img].shape[1:]}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}, scratch {root}")

        # ------------------------------------------------------------------ write
        def write_ours(path, version):
            t0 = time.perf_counter()
            st = ZarrStore.create(path, version=version)
            for i, ep in enumerate(eps):
                st.add_episode(ep, seed=i, task=TASK, source="scripted", success=True, backend="bench")
            return time.perf_counter() - t0

        def write_dp(path, frame_chunks):
            t0 = time.perf_counter()
            rb = DPReplayBuffer(path, frame_chunks)
            for ep in eps:
                rb.add_episode(ep)
            return time.perf_counter() - t0

        writers = [("ours (v2, sharded)", "ours", lambda p: write_ours(p, 2)),
                   ("dp (1-frame chunks)", "dp", lambda p: write_dp(p, True)),
                   ("dp-auto (its chunks)", "dp_auto", lambda p: write_dp(p, False))]
        if args.v1:
            writers.insert(1, ("ours v1 (before)", "v1", lambda p: write_ours(p, 1)))
        times = {name: [] for name, _, _ in writers}
        for r in range(args.repeat):  # interleaved: a slow moment of a shared machine hits every writer alike
            for name, d, fn in writers:
                shutil.rmtree(root / d, ignore_errors=True)
                times[name].append(fn(root / d))
        t = {name: float(np.median(v)) for name, v in times.items()}
        t_ours = t[writers[0][0]]
        print(f"write    medians of {args.repeat} interleaved rounds {'frames/s':>9s} {'ratio':>7s} "
              f"{'file bytes':>12s} {'du':>12s} {'files':>6s} {'dirs':>6s}   ratio per round")
        for name, d, _ in writers:
            size, used, nf, nd = disk_usage(root / d)
            per = " ".join(f"{a / b:.2f}" for a, b in zip(times[name], times[writers[0][0]]))
            print(f"         {name:36s} {frames / t[name]:9.0f} {t[name] / t_ours:7.2f} {mib(size)} {mib(used)} "
                  f"{nf:6d} {nd:6d}   {per}")
        print("         (ratio: reference time / ours; > 1 = ours faster; du: blocks allocated, directories included)")

        # ------------------------------------------------------------------ sample
        T, To, Ta = 16, 2, 8
        obs = [img, "joint_pos", "ee_pos"]
        keys = [*obs, "action"]
        store = ZarrStore.open(root / "ours", "r")
        dp_root = zarr.open_group(str(root / "dp"), mode="r")
        ends = dp_root["meta/episode_ends"][:]
        order = np.random.default_rng(0).permutation(len(create_indices(ends, T, To - 1, Ta - 1)))
        order = order[:args.windows].tolist()

        def ours(cache):
            return WindowDataset(SequenceSampler(store, keys, obs, horizon=T, n_obs_steps=To, pad_after=Ta - 1,
                                                 cache_images=cache))

        def theirs(arrays):
            return DPDataset(arrays, ends, T, To, Ta - 1, obs)

        ours_disk, dp_disk = ours(False), theirs({k: dp_root["data"][k] for k in keys})
        ours_mem = ours(True)
        dp_numpy = theirs({k: dp_root["data"][k][:] for k in keys})
        mem = zarr.storage.MemoryStore()  # copy_from_path(..., store=MemoryStore()): the same encoded chunks
        mem_root = zarr.open_group(mem, mode="w", zarr_format=2)
        for k in keys:
            src = dp_root["data"][k]
            mem_root.create_array(f"data/{k}", data=src[:], chunks=src.chunks, compressor=src.compressors[0])
        mem_bytes = sum(len(v) for v in mem._store_dict.values())
        dp_mem = theirs({k: mem_root["data"][k] for k in keys})
        for i in order[:64] + [0, len(dp_numpy) - 1]:  # the same windows, bit for bit
            a, b = ours_disk[i], dp_disk[i]
            c = ours_mem[i]
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in keys), i

        samplers = {"ours_disk": ours_disk, "ours_disk_item": PerItem(ours_disk), "dp_disk": dp_disk,
                    "ours_mem": ours_mem, "ours_mem_item": PerItem(ours_mem), "dp_numpy": dp_numpy, "dp_mem": dp_mem}
        runs = {name: [] for name in samplers}
        for r in range(args.repeat):  # interleaved, medians
            for name, ds in samplers.items():
                runs[name].append(loader_rate(ds, order, args.batch)[0])
        res = {name: float(np.median(v)) for name, v in runs.items()}
        raw = sum(dp_numpy.arrays[k].nbytes for k in keys)
        print(f"sample   {len(order)} windows (T={T}, To={To}, pad_after={Ta - 1}, {img} + 2 low-dim obs + action, "
              f"batch {args.batch}, random order), medians of {args.repeat} interleaved rounds; windows bit-identical")
        print(f"         {'':40s} {'windows/s':>9s} {'ratio':>7s} {'memory':>12s}")
        print(f"         {'ours, from disk':40s} {res['ours_disk']:9.0f} {res['ours_disk'] / res['dp_disk']:7.2f}")
        print(f"         {'  (one window per fetch)':40s} {res['ours_disk_item']:9.0f} "
              f"{res['ours_disk_item'] / res['dp_disk']:7.2f}")
        print(f"         {'dp, from disk (zarr)':40s} {res['dp_disk']:9.0f}")
        print(f"         {'ours, in memory (encoded frames)':40s} {res['ours_mem']:9.0f} "
              f"{res['ours_mem'] / res['dp_numpy']:7.2f} {mib(ours_mem.sampler.nbytes)}")
        print(f"         {'  (one window per fetch)':40s} {res['ours_mem_item']:9.0f} "
              f"{res['ours_mem_item'] / res['dp_numpy']:7.2f}")
        print(f"         {'dp, numpy path (decoded)':40s} {res['dp_numpy']:9.0f} {'':7s} {mib(raw)}")
        print(f"         {'dp, compressed MemoryStore':40s} {res['dp_mem']:9.0f} {'':7s} {mib(mem_bytes)}")
        print(f"         (ratio: ours / dp from disk, ours in memory / dp numpy path; ours fetches a DataLoader batch "
              f"in one call, WindowDataset.__getitems__); memory ours / dp MemoryStore "
              f"{ours_mem.sampler.nbytes / mem_bytes:.2f}, / dp numpy {ours_mem.sampler.nbytes / raw:.2f}")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
