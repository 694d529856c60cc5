"""Stores read over fsspec URLs from a real S3-compatible server (moto's server mode, started on loopback by the
test): ``s3://`` through s3fs and ``http://`` through fsspec's HTTP filesystem, against the same store read from
disk; damage found remotely as it is locally; read-only; and ``robot-rl train-base`` / ``store info`` on an
``s3://`` URL in a separate process configured only by the standard AWS environment variables."""

import json
import logging
import os
import subprocess
import sys

import boto3
import numpy as np
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from robot_rl.datasets.sampler import SequenceSampler
from robot_rl.datasets.store import ZarrStore, format_info, validate_store
from robot_rl.errors import ConfigError

BUCKET = "robot-rl-test"
CLI = [sys.executable, "-m", "robot_rl.cli"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port), a bucket whose objects are public-read (so plain HTTP can GET
    them), the AWS environment variables pointing at it for this process and its children, and an s3fs client."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        fs = s3fs.S3FileSystem(s3_additional_kwargs={"ACL": "public-read"}, skip_instance_cache=True)
        yield type("S3", (), {"endpoint": endpoint, "fs": fs})
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def make_store(path, lengths=(5, 1, 70, 12)):
    """A store with sharded camera frames (two shards: 75 frames of 96x96x3 per shard), low-dim keys and human
    actions; every value a function of the episode index."""
    st = ZarrStore.create(path)
    for i, T in enumerate(lengths):
        rng = np.random.default_rng(i)
        st.add_episode({"action": rng.normal(size=(T, 5)).astype(np.float32),
                        "ee_pos": rng.normal(size=(T, 3)),
                        "image_front": rng.integers(0, 256, size=(T, 96, 96, 3), dtype=np.uint8),
                        "intervention": np.arange(T) % 3 == 0,
                        "human_action": rng.normal(size=(T, 5)).astype(np.float32)},
                       seed=i, task="place", source="teleop", success=i % 2 == 1, backend="mujoco",
                       extra={"note": f"episode {i}"})
    return ZarrStore.open(path)


def upload(s3, local, name):
    s3.fs.put(str(local) + "/", f"{BUCKET}/{name}", recursive=True)
    return f"s3://{BUCKET}/{name}"


def assert_same_store(remote: ZarrStore, local: ZarrStore):
    assert (remote.keys, remote.schema, remote.version) == (local.keys, local.schema, local.version)
    np.testing.assert_array_equal(remote.episode_ends, local.episode_ends)
    assert remote.episodes_meta() == local.episodes_meta()
    for k in local.keys:
        np.testing.assert_array_equal(np.asarray(remote[k]), np.asarray(local[k]))
    rows = np.r_[0:local.n_steps, 3, 3, 80, 2]
    frames = remote.frames("image_front")
    assert frames is not None  # frames come from the shard files themselves, not through zarr
    np.testing.assert_array_equal(frames[rows], local.frames("image_front")[rows])
    np.testing.assert_array_equal(frames.load()[rows], local["image_front"][:][rows])


def test_s3_and_http_stores_read_as_the_local_store(s3, tmp_path):
    local = make_store(tmp_path / "demo.zarr")
    url = upload(s3, tmp_path / "demo.zarr", "demo.zarr")
    remote = ZarrStore.open(url)
    assert remote.path == url and remote.mode == "r"
    assert_same_store(remote, local)
    assert validate_store(url) == [] and remote.validate() == []
    info, want = remote.info(), local.info()
    assert info.pop("path") == url and want.pop("path") == str(local.path)
    assert info == want and info["size_bytes"] > 0  # listed through S3, byte for byte the local size

    # training windows: the same from S3 as from disk, frames cached in memory or read per window
    for cache in (True, False):
        kw = dict(keys=["action", "ee_pos", "image_front"], obs_keys=["ee_pos", "image_front"], horizon=16,
                  n_obs_steps=2, pad_before=1, pad_after=7, cache_images=cache)
        a, b = SequenceSampler(remote, **kw), SequenceSampler(local, **kw)
        assert len(a) == len(b) > 0
        idx = np.arange(len(a))[::-1]
        got, exp = a.batch(idx), b.batch(idx)
        for k in exp:
            np.testing.assert_array_equal(got[k], exp[k])

    # plain HTTP(S): the same objects by URL (ranged GETs for the frames); HTTP cannot list, so no size
    http = ZarrStore.open(f"{s3.endpoint}/{BUCKET}/demo.zarr")
    assert_same_store(http, local)
    assert http.info()["size_bytes"] is None and "size unknown" in format_info(http.info())


def test_remote_store_damage_read_only_and_bad_urls(s3, tmp_path):
    make_store(tmp_path / "d.zarr")
    url = upload(s3, tmp_path / "d.zarr", "damaged.zarr")
    s3.fs.rm(f"{BUCKET}/damaged.zarr/data/image_front/c/1/0/0/0")  # the second image shard (frames 75..)
    problems = validate_store(url)
    assert any("data/image_front" in p and "c/1/0/0/0" in p and "missing" in p for p in problems), problems
    st = ZarrStore.open(url)
    with pytest.raises(ConfigError, match="data/image_front"):
        st.frames("image_front")[[80]]
    with pytest.raises(ConfigError, match="data/image_front"):
        st["image_front"][70:80]
    np.testing.assert_array_equal(st.frames("image_front")[[3]], ZarrStore.open(tmp_path / "d.zarr")
                                  .frames("image_front")[[3]])  # the intact shard still reads

    for call in (lambda: ZarrStore.open(url, mode="a"), lambda: ZarrStore.create(url),
                 lambda: ZarrStore.open_or_create(url)):
        with pytest.raises(ConfigError, match="read-only"):
            call()
    assert s3.fs.exists(f"{BUCKET}/damaged.zarr/zarr.json")  # nothing was touched
    with pytest.raises(ConfigError, match="no store at"):
        ZarrStore.open(f"s3://{BUCKET}/nothing.zarr")
    with pytest.raises(ConfigError, match="install the filesystem"):
        ZarrStore.open("nosuchproto://bucket/store.zarr")


def test_cli_trains_a_base_from_s3(s3, tmp_path):
    """A user's path: collect locally, upload, then `store info` and `train-base` on the s3:// URL, configured by
    the AWS environment variables alone."""
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    run = lambda *a: subprocess.run([*CLI, *map(str, a)], capture_output=True, text=True, env=env,  # noqa: E731
                                    timeout=600)
    r = run("collect", "--task", "place", "--episodes", 3, "--store", tmp_path / "demos.zarr")
    assert r.returncode == 0, r.stderr[-2000:]
    url = upload(s3, tmp_path / "demos.zarr", "cli/demos.zarr")
    r = run("store", "info", url)
    assert r.returncode == 0 and url in r.stdout and "3 episodes" in r.stdout, r.stdout + r.stderr[-2000:]
    r = run("train-base", "--store", url, "--out", tmp_path / "b", "--kind", "bc", "--steps", 3,
            "--batch-size", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["train_episodes"] + summary["val_episodes"] == 3
    assert json.loads((tmp_path / "b" / "checkpoint" / "config.json").read_text())  # a checkpoint was written
    r = run("train-base", "--store", f"s3://{BUCKET}/cli/missing.zarr", "--out", tmp_path / "b2")
    assert r.returncode == 2 and "no store at" in r.stderr and len(r.stderr.strip().splitlines()) == 1
