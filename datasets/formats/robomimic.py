"""robomimic HDF5 datasets <-> the robot_rl store (``--format robomimic``), read and written with h5py.

Layout (robomimic docs, ``docs/datasets/overview.md`` "Dataset Structure"; as written by robomimic's
``scripts/dataset_states_to_obs.py``)::

    data/                 attrs: total (steps of all demos), env_args (JSON {"env_name", "type", "env_kwargs"})
      demo_<i>/           attrs: num_samples (T); demos are ordered by the integer i (demo_2 before demo_10)
        actions           (T, A) float
        rewards           (T,) float64          dones (T,) int64
        states            (T, S) simulator states                       -- ignored
        obs/<key>         (T, ...) low-dim; uint8 (T, H, W, 3) RGB for keys ending in ``_image``
        next_obs/<key>    (T, ...)                                      -- ignored
    mask/<filter key>     demo names as bytes (e.g. ``train``, ``valid``): read option ``filter_key``

Mapping (import; export is the inverse):

| robomimic | store |
|---|---|
| ``actions`` (T, A) | ``action`` float32 (written back as float32) |
| ``obs/<cam>_image`` uint8 (T, H, W, 3) | ``image_<cam>`` |
| ``obs/<k>`` | ``<k>`` (low-dim: name and dtype kept, ``ee_pos`` <-> ``obs/ee_pos``) |
| ``robot_rl_intervention`` bool (T,) | ``intervention`` (written only when some step was taken over) |
| ``robot_rl_human_action`` (T, A) | ``human_action`` (written only when not all NaN) |
| ``rewards`` float64 (T,), ``dones`` int64 (T,) | ``success`` (rule below) |
| demo attr ``robot_rl_meta`` (JSON object) | seed, task, source, success, backend, robot, extra |
| ``data.attrs["env_args"]["env_name"]`` | ``task`` |

Success: on import ``rewards[-1] > 0 or dones[-1] != 0`` (either dataset may be absent; neither: no success given).
Files made with robomimic's ``--done_mode 1`` or ``2`` set ``dones[-1] = 1`` on every demo, so every demo imports as
a success. On export both are 0 except 1 on the last step of a successful episode (robomimic's ``--done_mode 0``).
Metadata: ``robot_rl_meta`` (written on export) wins over what the file says otherwise; without it an episode carries
only task (``env_name``) and success, and ``MetaDefaults`` fills the rest. Export writes ``env_args`` =
{"env_name": the tasks joined by ``,``, "type": 2 (robomimic's gym type), "env_kwargs": {}}: robomimic cannot build
our env, so train on such a file with ``experiment.rollout.enabled = false``. ``states`` and ``next_obs`` are neither
read nor written (both optional in robomimic).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np

from robot_rl.datasets.formats import META_FIELDS, Episode
from robot_rl.datasets.store import is_image
from robot_rl.errors import ConfigError

EXTRA = {"intervention": "robot_rl_intervention", "human_action": "robot_rl_human_action"}  # our key -> dataset
META_ATTR, ENV_TYPE, COMPRESSIONS = "robot_rl_meta", 2, (None, "gzip", "lzf")
_DEMO = re.compile(r"demo_(\d+)")


def _obs_name(key: str) -> str:
    """Our store key -> robomimic obs name (``image_<cam>`` -> ``<cam>_image``)."""
    return f"{key[len('image_'):]}_image" if key.startswith("image_") else key


def _store_key(name: str) -> str:
    """robomimic obs name -> our store key (``<cam>_image`` -> ``image_<cam>``)."""
    return f"image_{name[:-len('_image')]}" if name.endswith("_image") else name


def _check_image(field: str, key: str, arr: np.ndarray) -> None:
    """Store key ``image_<cam>`` must hold uint8 (T, H, W, C) frames (C in 1, 3, 4; robomimic's RGB: 3)."""
    if key.startswith("image_") and not is_image(arr.dtype, arr.shape[1:]):
        raise ConfigError(field, f"an image key needs uint8 (T, H, W, 3) frames, got {arr.dtype} {arr.shape}",
                          "store camera frames as uint8 RGB, and name no low-dim key image_* / *_image")


def _dataset(group: h5py.Group, name: str, field: str, steps: int | None) -> np.ndarray:
    """``group[name]`` as a numeric (T, ...) array with T == ``steps`` (when given). Raises ConfigError."""
    obj = group.get(name)
    if not isinstance(obj, h5py.Dataset) or obj.ndim == 0 or obj.dtype.kind not in "biuf":
        raise ConfigError(field, "is missing or not a numeric (T, ...) dataset", "write it as a per-step array")
    if steps is not None and obj.shape[0] != steps:
        raise ConfigError(field, f"has {obj.shape[0]} steps but actions has {steps}", "give every key one row a step")
    return obj[()]


def _demo_names(f: h5py.File, filter_key: str | None) -> list[str]:
    """Demo group names in robomimic's order (by integer index), optionally only those of ``mask/<filter_key>``."""
    names = list(f["data"].keys())
    if filter_key is not None:
        if f"mask/{filter_key}" not in f:
            raise ConfigError("filter_key", f"{filter_key!r} is not in the file's mask group "
                              f"({sorted(f['mask']) if 'mask' in f else 'none'})", "pass one of the file's filter keys")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][()]]
    for n in names:
        if not _DEMO.fullmatch(n) or not isinstance(f["data"].get(n), h5py.Group):
            raise ConfigError(f"data/{n}", "is not a demo_<i> group", "keep only demo_<i> groups under data/")
    return sorted(names, key=lambda n: int(n[len("demo_"):]))


def read(src: Path, *, filter_key: str | None = None) -> Iterator[Episode]:
    """Episodes of the robomimic HDF5 file ``src``, in demo order (layout and mapping: module doc).

    Options: ``filter_key`` (e.g. ``"train"``): only the demos listed in ``mask/<filter_key>``.
    Yields Episode(data={``action`` float32 (T, A), ``image_<cam>`` uint8 (T, H, W, 3), low-dim ``<k>`` (T, ...),
    ``intervention`` bool (T,) / ``human_action`` (T, A) when present}, meta: task and success as the file gives
    them, updated by ``robot_rl_meta``).
    Raises ConfigError naming the field: not HDF5, no ``data`` group, a bad ``env_args`` / ``robot_rl_meta``, a demo
    without ``actions``, a key whose length differs from ``actions``, an image key that is not uint8 HWC.
    """
    try:
        f = h5py.File(src, "r")
    except OSError as e:
        raise ConfigError("src", f"{src} is not a readable HDF5 file ({e})", "pass a robomimic .hdf5 file") from None
    with f:
        if not isinstance(f.get("data"), h5py.Group):
            raise ConfigError("data", f"{src} has no 'data' group", "pass a robomimic dataset (data/demo_<i>/...)")
        env_name = _json_attr(f["data"], "env_args", "data.attrs['env_args']").get("env_name")
        for name in _demo_names(f, filter_key):
            yield _read_demo(f["data"][name], f"data/{name}", env_name)


def _read_demo(demo: h5py.Group, where: str, env_name: Any) -> Episode:
    """One ``data/demo_<i>`` group (path ``where``) as an Episode. Raises ConfigError naming the bad dataset."""
    if "actions" not in demo:
        raise ConfigError(f"{where}/actions", "is missing", "every robomimic demo needs an actions dataset")
    action = _dataset(demo, "actions", f"{where}/actions", None).astype(np.float32)
    T = len(action)
    if action.ndim != 2 or T == 0 or demo.attrs.get("num_samples", T) != T:
        raise ConfigError(f"{where}/actions", f"shape {action.shape} with num_samples {demo.attrs.get('num_samples')}",
                          "write actions (T, A) with T = num_samples >= 1")
    data = {"action": action}
    obs = demo["obs"] if isinstance(demo.get("obs"), h5py.Group) else {}
    for k in obs:
        key, arr = _store_key(k), _dataset(obs, k, f"{where}/obs/{k}", T)
        _check_image(f"{where}/obs/{k}", key, arr)
        if key in data or key in EXTRA:
            raise ConfigError(f"{where}/obs/{k}", f"would become the store key {key!r}, which is taken",
                              "rename the obs key in the file")
        data[key] = arr
    for key, ds in EXTRA.items():
        if ds in demo:
            data[key] = _dataset(demo, ds, f"{where}/{ds}", T)
    if "intervention" in data:
        data["intervention"] = data["intervention"].astype(bool)
    meta: dict[str, Any] = {"task": env_name} if isinstance(env_name, str) and env_name else {}
    last = {k: _dataset(demo, k, f"{where}/{k}", T)[-1] for k in ("rewards", "dones") if k in demo}
    if last:  # the success rule: a positive last reward or a last done
        meta["success"] = bool(last.get("rewards", 0) > 0 or last.get("dones", 0) != 0)
    stored = _json_attr(demo, META_ATTR, f"{where}.attrs['{META_ATTR}']")
    meta.update({k: stored[k] for k in META_FIELDS if k in stored})
    return Episode(data, meta)


def _json_attr(obj: h5py.HLObject, name: str, field: str) -> dict:
    """The JSON object in attribute ``name`` ({} when absent). Raises ConfigError when it is not a JSON object."""
    raw = obj.attrs.get(name)
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError as e:
        raise ConfigError(field, f"is not valid JSON ({e})", "write it with json.dumps") from None
    if not isinstance(value, dict):
        raise ConfigError(field, f"is a JSON {type(value).__name__}, not an object", "write a JSON object")
    return value


def write(episodes: Iterable[Episode], dst: Path, *, compression: str | None = None) -> dict:
    """Write ``episodes`` as a new robomimic HDF5 file at ``dst`` (layout and mapping: module doc).

    Episode data: ``action`` (T, A), ``image_<cam>`` uint8 (T, H, W, 3), low-dim keys (T, ...), optional
    ``intervention`` bool (T,) / ``human_action`` (T, A). Options: ``compression`` (None, ``"gzip"``, ``"lzf"``) for
    the obs datasets, like robomimic's ``--compress``. The file is written beside ``dst`` and renamed into place, so
    a failure leaves nothing at ``dst``. Returns {path, episodes, steps, obs_keys}. Raises ConfigError: no episodes,
    a bad option, keys of different lengths, an image key that is not uint8 HWC, a low-dim key that robomimic would
    read as an image (``*_image``).
    """
    if compression not in COMPRESSIONS:
        raise ConfigError("compression", f"{compression!r} is not an h5py filter here", f"use one of {COMPRESSIONS}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    n = steps = 0
    tasks: list[str] = []
    obs_keys: set[str] = set()
    try:
        with h5py.File(tmp, "w") as f:
            data_grp = f.create_group("data")
            for n, ep in enumerate(episodes, start=1):
                steps += _write_demo(data_grp.create_group(f"demo_{n - 1}"), n - 1, ep, compression, obs_keys)
                if ep.meta.get("task") and str(ep.meta["task"]) not in tasks:
                    tasks.append(str(ep.meta["task"]))
            if n == 0:
                raise ConfigError("episodes", "there is nothing to export", "export a store with episodes")
            data_grp.attrs["total"] = steps
            data_grp.attrs["env_args"] = json.dumps({"env_name": ",".join(tasks), "type": ENV_TYPE, "env_kwargs": {}})
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(dst), "episodes": n, "steps": steps, "obs_keys": sorted(obs_keys)}


def _write_demo(grp: h5py.Group, index: int, ep: Episode, compression: str | None, obs_keys: set[str]) -> int:
    """Fill the ``data/demo_<index>`` group ``grp`` from ``ep`` (adding its obs names to ``obs_keys``); return T."""
    data = {k: np.asarray(v) for k, v in ep.data.items()}
    action = data.pop("action", np.empty(0))
    if action.ndim != 2 or len(action) == 0:
        raise ConfigError("data['action']", f"episode {index}: missing or not (T, A) with T >= 1 (shape "
                          f"{action.shape})", "export episodes with actions (T, A)")
    T = len(action)
    grp.create_dataset("actions", data=action)
    for key, arr in data.items():
        field = f"data[{key!r}]"
        if arr.ndim == 0 or len(arr) != T:
            raise ConfigError(field, f"episode {index}: shape {arr.shape} for {T} actions", "give every key T rows")
        if key in EXTRA:  # written only when it carries something (the store reads absent as all False / NaN)
            if arr.any() if key == "intervention" else not np.all(np.isnan(arr)):
                grp.create_dataset(EXTRA[key], data=arr)
            continue
        name = _obs_name(key)
        _check_image(field, key, arr)
        if _store_key(name) != key:
            raise ConfigError(field, f"would be read back from robomimic as the image key {_store_key(name)!r}",
                              f"rename it (--map {key}=NAME) to a name not ending in _image")
        grp.create_dataset(f"obs/{name}", data=arr, compression=compression)
        obs_keys.add(name)
    last = np.zeros(T)
    last[-1] = bool(ep.meta.get("success", False))
    grp.create_dataset("rewards", data=last.astype(np.float64))
    grp.create_dataset("dones", data=last.astype(np.int64))
    grp.attrs["num_samples"] = T
    meta = {k: ep.meta[k] for k in META_FIELDS if k in ep.meta}
    grp.attrs[META_ATTR] = json.dumps(meta, sort_keys=True, default=_plain)
    return T


def _plain(value: Any) -> Any:
    """json.dumps fallback: numpy scalars as Python numbers. Raises ConfigError for anything else."""
    if isinstance(value, np.generic):
        return value.item()
    raise ConfigError("extra", f"{type(value).__name__} is not JSON-serialisable", "keep episode metadata JSON-able")
