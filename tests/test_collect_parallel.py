"""Scripted collection on a vector env (``collect(..., n_envs=N)``) writes the store serial collection writes: the same
attempts counted, the same episodes kept, every array and every episode's metadata identical, on real MuJoCo envs
with a noisy expert (failed attempts, episodes of different lengths finishing out of seed order)."""

import numpy as np
import pytest

from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError
from robot_rl.stages.collect import collect

# place with this much noise fails about half its attempts (seeds 0.. include failures before the 6th success)
KW = dict(task="place", n_episodes=6, seed=0, noise=0.5, only_success=True, randomization="default",
          progress=False)


def _content(path) -> tuple:
    """(schema, episode ends, every episode's metadata, {key: (dtype, shape, bytes)}) of a store."""
    s = ZarrStore.open(path)
    arrays = {}
    for k in s.keys:
        a = np.asarray(s[k][:])
        arrays[k] = (a.dtype.str, a.shape, a.tobytes())
    return s.schema, s.episode_ends.tolist(), s.episodes_meta(), arrays


def test_parallel_collection_writes_the_serial_store(tmp_path):
    results, stores = {}, {}
    for n in (1, 2, 3):
        results[n] = collect(tmp_path / f"s{n}", n_envs=n, **KW)
        stores[n] = _content(tmp_path / f"s{n}")
    serial = results[1]
    # failures happen, so seeds are skipped and later seeds finish before earlier ones are decided
    assert serial["episodes"] == 6 and serial["attempts"] > serial["episodes"]
    schema, ends, meta, arrays = stores[1]
    assert [m["seed"] for m in meta] != list(range(6))  # some seeds were dropped
    assert len({m["length"] for m in meta}) > 1  # episodes of different lengths: out-of-order finishes
    assert all(m["success"] and m["extra"]["randomization"] for m in meta)
    for n in (2, 3):
        strip = lambda r: {k: v for k, v in r.items() if k != "store"}  # noqa: E731
        assert strip(results[n]) == strip(serial), n
        s_schema, s_ends, s_meta, s_arrays = stores[n]
        assert s_schema == schema and s_ends == ends, n
        assert s_meta == meta, n
        assert s_arrays.keys() == arrays.keys(), n
        for k in arrays:
            assert s_arrays[k] == arrays[k], (n, k)


@pytest.mark.parametrize("n_envs", [0, -2, 1.5, "2"])
def test_bad_n_envs_fails_before_the_store_is_touched(tmp_path, n_envs):
    path = tmp_path / "s"
    collect(path, "lift", 1, noise=0.0, progress=False)
    before = _content(path)
    with pytest.raises(ConfigError) as e:
        collect(path, "lift", 1, noise=0.0, progress=False, overwrite=True, n_envs=n_envs)
    assert e.value.field == "collect.n_envs"
    assert _content(path) == before
