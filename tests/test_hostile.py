"""Careless and hostile input (issue 21): concurrent writers, damaged chunks, foreign files, an existing run, file
system errors and out-of-range numbers each end in one line ``robot-rl: error: <field>: <problem> -> <fix>`` (exit
2) or are handled, with nothing stored lost. CLI cases run as a user would (subprocesses) where the case needs a
real process (concurrency, capabilities, a full disk); the many number cases run ``robot_rl.cli.main`` in-process to
stay cheap."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robot_rl.cli import main
from robot_rl.datasets import store as store_mod
from robot_rl.datasets.store import ZarrStore, foreign_files, validate_store, writer_lock
from robot_rl.errors import ConfigError

CLI = [sys.executable, "-m", "robot_rl.cli"]
LIFT_KEYS = {"ee_pos": 3, "ee_quat": 4, "gripper_width": 1, "cube_pos": 3, "cube_quat": 4}


def run(*args, prefix=(), timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    return subprocess.run([*prefix, *CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(r, *words):
    """Exit 2 and a single stderr line ``robot-rl: error: ...`` containing every word."""
    err = r.stderr.strip() if hasattr(r, "stderr") else r
    assert getattr(r, "returncode", 2) == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("robot-rl: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def small_store(path, episodes=3, steps=6, seed0=0):
    s = ZarrStore.create(path)
    rng = np.random.default_rng(0)
    for i in range(episodes):
        data = {k: rng.normal(size=(steps, d)).astype(np.float32) for k, d in LIFT_KEYS.items()}
        data["action"] = rng.normal(size=(steps, 4)).astype(np.float32)
        s.add_episode(data, seed=seed0 + i, task="lift", source="scripted", success=False, backend="mujoco")
    return s


# ------------------------------------------------------------------------------------------------ writer lock
def test_two_concurrent_collects_commit_every_episode(tmp_path):
    """Two `robot-rl collect` processes on one (empty, pre-made) directory: one creates the store, both append,
    all episodes are committed and the store validates."""
    store = tmp_path / "x.zarr"
    store.mkdir()  # an empty directory is a store to create, not an error suggesting the command itself
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    procs = [subprocess.Popen([*CLI, "collect", "--store", str(store), "--task", "lift", "--episodes", "3",
                               "--seed", str(seed), "--keep-failures"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for seed in (100, 200)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    s = ZarrStore.open(store)
    assert sorted(m["seed"] for m in s.episodes_meta()) == [100, 101, 102, 200, 201, 202]
    r = run("store", "validate", store)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout


def _open_and_add(args):
    path, seed = args
    s = ZarrStore.open_or_create(path)
    s.add_episode({"action": np.ones((3, 2)), "x": np.ones((3, 1))}, seed=seed, task="t", source="scripted",
                  success=True, backend="b")


def test_many_processes_creating_one_store_at_once(tmp_path):
    """The create race: six processes open_or_create a missing (or empty) store at once; one creates it, all
    append (a store is recognised only once all its arrays exist, and creating re-checks under the lock)."""
    import multiprocessing

    for trial, premade in enumerate((False, True, False)):
        path = tmp_path / f"s{trial}.zarr"
        if premade:
            path.mkdir()
        with multiprocessing.get_context("fork").Pool(6) as pool:
            pool.map(_open_and_add, [(path, i) for i in range(6)])
        assert sorted(m["seed"] for m in ZarrStore.open(path).episodes_meta()) == list(range(6))
        assert validate_store(path) == []


def test_interleaved_writers_in_one_process_keep_every_episode(tmp_path):
    """Two writers opened before either commits (stale views of the store) append in turn: each commit re-reads the
    commit marker under the lock, so nothing is overwritten."""
    small_store(tmp_path / "s.zarr", episodes=1)
    a, b = ZarrStore.open(tmp_path / "s.zarr", "a"), ZarrStore.open(tmp_path / "s.zarr", "a")
    ep = a.get_episode(0)
    for i in range(3):
        for w, base in ((a, 100), (b, 200)):
            w.add_episode(ep, seed=base + i, task="lift", source="scripted", success=False, backend="mujoco")
    s = ZarrStore.open(tmp_path / "s.zarr")
    assert [m["seed"] for m in s.episodes_meta()] == [0, 100, 200, 101, 201, 102, 202]
    assert np.array_equal(s.get_episode(6)["ee_pos"], ep["ee_pos"]) and validate_store(s.path) == []


def test_second_writer_that_cannot_get_the_lock_fails_with_one_line(tmp_path, monkeypatch, capsys):
    s = small_store(tmp_path / "s.zarr", episodes=1)
    monkeypatch.setattr(store_mod, "LOCK_TIMEOUT_S", 0.3)
    ep = s.get_episode(0)
    with writer_lock(s.path):  # another writer (flock is per open file, so this process counts as another)
        with pytest.raises(ConfigError, match="writer lock"):
            s.add_episode(ep, seed=9, task="lift", source="scripted", success=False, backend="mujoco")
        rc = main(["collect", "--store", str(s.path), "--task", "lift", "--episodes", "1"])
    one_line_error(capsys.readouterr().err, "path", "writer lock")
    assert rc == 2 and ZarrStore.open(s.path).n_episodes == 1 and validate_store(s.path) == []
    s.add_episode(ep, seed=9, task="lift", source="scripted", success=False, backend="mujoco")  # lock released
    assert ZarrStore.open(s.path).n_episodes == 2


# ------------------------------------------------------------------------------------------------ damaged chunks
@pytest.mark.parametrize("damage", ["delete data chunk", "delete meta chunk", "directory for chunk"])
def test_missing_or_replaced_chunk_is_reported_and_never_read_as_zeros(tmp_path, damage):
    small_store(tmp_path / "s.zarr")
    root = tmp_path / "s.zarr"
    target, array = {"delete data chunk": ("data/ee_pos/c/0/0", "data/ee_pos"),
                     "delete meta chunk": ("meta/episodes/c/0", "meta/episodes"),
                     "directory for chunk": ("data/cube_pos/c/0/0", "data/cube_pos")}[damage]
    (root / target).unlink()
    if damage == "directory for chunk":
        (root / target).mkdir()
    assert any(array in p and p.startswith("error") for p in validate_store(root))
    s = ZarrStore.open(root)
    with pytest.raises(ConfigError, match=array):
        s[array.split("/")[1]][:] if array.startswith("data") else s.episodes_meta()
    with pytest.raises(ConfigError, match="damaged"):
        ZarrStore.open(root, mode="a")  # never appended to (and never "repaired") while damaged
    if damage == "delete data chunk":  # as a user: validate fails, training refuses
        r = run("store", "validate", root)
        assert r.returncode == 1 and array in r.stdout, r.stdout
        one_line_error(run("train-base", "--store", root, "--out", tmp_path / "run", "--kind", "bc",
                           "--steps", 2), array)
        assert not (tmp_path / "run" / "checkpoint").exists()


def test_store_without_the_chunk_record_still_reads(tmp_path):
    """A store written before chunk verification (no chunks_complete attr, all-fill chunks never written) reads
    and validates; a directory in place of a chunk is still reported."""
    import zarr

    s = small_store(tmp_path / "old.zarr")
    root = zarr.open_group(str(s.path), mode="r+")
    attrs = dict(root.attrs)
    del attrs["chunks_complete"]
    root.attrs.clear()
    root.attrs.update(attrs)
    (s.path / "data/intervention/c/0").unlink()  # all False: an old zarr never wrote it
    assert validate_store(s.path) == []
    assert not ZarrStore.open(s.path)["intervention"][:].any()
    (s.path / "data/intervention/c/0").mkdir()
    assert any("data/intervention" in p for p in validate_store(s.path))


# ------------------------------------------------------------------------------------------------ overwrite / out
def test_overwrite_refuses_foreign_files_and_train_base_refuses_an_existing_run(tmp_path, capsys):
    s = small_store(tmp_path / "x.zarr")
    (s.path / "notes.txt").write_text("hi")
    one_line_error(run("collect", "--store", s.path, "--overwrite", "--episodes", 1), "notes.txt")
    assert (s.path / "notes.txt").read_text() == "hi" and ZarrStore.open(s.path).n_episodes == 3
    (s.path / "notes.txt").unlink()
    assert ZarrStore.create(s.path, overwrite=True).n_episodes == 0  # our files only: replaced
    s = small_store(tmp_path / "y.zarr")

    (tmp_path / "afile").write_text("x")
    assert main(["train-base", "--store", str(s.path), "--out", str(tmp_path / "afile")]) == 2
    one_line_error(capsys.readouterr().err, "out", "afile")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "model.safetensors").write_text("old")
    args = ["train-base", "--store", str(s.path), "--out", str(run_dir), "--kind", "bc", "--steps", "2",
            "--batch-size", "4"]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "out", "--overwrite")
    assert (run_dir / "checkpoint" / "model.safetensors").read_text() == "old"
    assert main(["train-base", "--store", str(s.path), "--out", str(s.path / "run")]) == 2  # a run inside the store
    one_line_error(capsys.readouterr().err, "out", "overlaps the store")
    assert foreign_files(s.path) == []
    assert main([*args, "--overwrite"]) == 0
    assert (run_dir / "checkpoint" / "model.safetensors").stat().st_size > 100


def test_train_residual_refuses_an_existing_run(tmp_path, capsys):
    base = Path(__file__).parent / "fixtures" / "place_bc_mujoco"
    run_dir = tmp_path / "res"
    (run_dir / "checkpoint_best").mkdir(parents=True)
    (run_dir / "checkpoint_best" / "model.safetensors").write_text("old")
    assert main(["train-residual", "--base", str(base), "--out", str(run_dir)]) == 2
    one_line_error(capsys.readouterr().err, "out", "--overwrite")
    assert (run_dir / "checkpoint_best" / "model.safetensors").read_text() == "old"
    (tmp_path / "afile").write_text("x")
    assert main(["train-residual", "--base", str(base), "--out", str(tmp_path / "afile")]) == 2
    one_line_error(capsys.readouterr().err, "out", "afile")


# ------------------------------------------------------------------------------------------------ file system
def test_read_only_store_is_one_line(tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root's setpriv to drop cap_dac_override (root ignores file permissions otherwise)")
    s = small_store(tmp_path / "ro.zarr", episodes=1)
    subprocess.run(["chmod", "-R", "a-w", str(s.path)], check=True)
    try:
        drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                "--bounding-set=-dac_override,-dac_read_search"]
        r = run("collect", "--store", s.path, "--task", "lift", "--episodes", 1, prefix=drop)
        one_line_error(r, str(s.path), "Permission denied", "permissions")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(s.path)], check=True)
    assert validate_store(s.path) == []


def test_full_disk_during_collect_is_one_line_and_keeps_the_store_valid(tmp_path):
    """A real full disk: a 400 KiB tmpfs (root only; elsewhere skipped: the in-process case below still runs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        r = run("collect", "--store", mnt / "s.zarr", "--task", "lift", "--episodes", 20, "--cameras", "front",
                "--image-size", 64, "--keep-failures")
        one_line_error(r, str(mnt / "s.zarr"), "No space left", "validate")
        assert not [p for p in validate_store(mnt / "s.zarr") if p.startswith("error")]
        s = ZarrStore.open(mnt / "s.zarr")
        assert s.n_episodes >= 1 and s["image_front"][:].shape[0] == s.n_steps
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_os_errors_become_one_line_in_process(tmp_path, monkeypatch, capsys):
    small_store(tmp_path / "s.zarr", episodes=1)

    def refuse(path, timeout=None):
        raise PermissionError(13, "Permission denied", str(Path(path) / ".writer.lock"))

    monkeypatch.setattr(store_mod, "writer_lock", refuse)
    assert main(["collect", "--store", str(tmp_path / "s.zarr"), "--task", "lift", "--episodes", "1"]) == 2
    one_line_error(capsys.readouterr().err, ".writer.lock", "Permission denied", "permissions")


# ------------------------------------------------------------------------------------------------ numbers
NUMBER_CASES = [
    (["pipeline", "--out", "{t}/p", "--set", "base.lr=.nan"], "base.lr"),
    (["train-base", "--store", "{t}/none", "--out", "{t}/o", "--lr", "-1"], "base.lr"),
    (["pipeline", "--out", "{t}/p", "--set", "ppo.n_envs=1e12"], "ppo.n_envs"),
    (["pipeline", "--out", "{t}/p", "--set", "residual.hidden=[16000000, 16]"], "residual.hidden"),
    (["collect", "--store", "{t}/s", "--seed", "-1"], "seed"),
    (["eval", "--base", "{t}/b", "--out", "{t}/o", "--seed-start", "-5"], "eval.seed_start"),
    (["collect", "--store", "{t}/s", "--seed", "99999999999999999999"], "seed"),
    (["collect", "--store", "{t}/s", "--cameras", "front", "--image-size", "100000"], "env.image_size"),
    (["serve", "--checkpoint", "{t}/c", "--max-message-mb", "nan"], "serve.max_message_bytes"),
    (["train-residual", "--base", "{t}/b", "--out", "{t}/o", "--n-envs", "1000000000000"], "ppo.n_envs"),
    (["collect", "--store", "{t}/s", "--noise", "nan"], "collect.noise"),
    (["collect", "--store", "{t}/s", "--set", "task.tolerance=.inf"], "task.tolerance"),
    (["collect", "--store", "{t}/s", "--set", "randomization.physics.object_mass=[0.5, .nan]"],
     "randomization.physics.object_mass"),
]


@pytest.mark.parametrize("argv,field", NUMBER_CASES, ids=[" ".join(a[-2:]) for a, _ in NUMBER_CASES])
def test_bad_numbers_are_one_line_naming_the_field_before_anything_is_written(tmp_path, capsys, argv, field):
    rc = main([a.format(t=tmp_path) for a in argv])
    line = one_line_error(capsys.readouterr().err, field)
    assert rc == 2 and line.startswith(f"robot-rl: error: {field}")
    assert list(tmp_path.iterdir()) == []


BOMB = "[&a [1,1,1,1,1,1,1,1,1], " + ", ".join(f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdef", "bcdefg")) + "]"


def test_yaml_alias_bomb_and_recursive_alias_are_one_line(tmp_path, capsys):
    """A 400-byte "billion laughs" value (6 million values once aliases are expanded) used to keep the resolver
    busy for minutes; a recursive alias recursed forever. Both are refused at parse time, in --set and in files."""
    assert main(["collect", "--store", str(tmp_path / "s"), "--set", f"task.cube_x={BOMB}"]) == 2
    line = one_line_error(capsys.readouterr().err, "--set", "expands to")
    assert len(line) < 600
    (tmp_path / "c.yaml").write_text("task: &a {name: lift, x: *a}\n")
    assert main(["collect", "--store", str(tmp_path / "s"), "--config", str(tmp_path / "c.yaml")]) == 2
    one_line_error(capsys.readouterr().err, "config", "recursive")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_bad_number_as_a_user_runs_it(tmp_path):
    one_line_error(run("collect", "--store", tmp_path / "s", "--noise", "nan"), "collect.noise")
    assert not (tmp_path / "s").exists()


def test_every_numeric_field_has_a_limit():
    import dataclasses
    import typing

    from robot_rl.config import LIMITS, _hints, section_classes

    def numeric(hint) -> bool:
        return hint in (int, float) or any(numeric(a) for a in typing.get_args(hint))

    missing = []
    for sec, cls in section_classes().items():
        todo = [(sec, cls)]
        while todo:
            where, c = todo.pop()
            for f in dataclasses.fields(c):
                hint = _hints(c).get(f.name)
                d = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if dataclasses.is_dataclass(d):
                    todo.append((f"{where}.{f.name}", type(d)))
                elif (numeric(hint) or (hint in (tuple, list) and d and isinstance(d[0], (int, float)))) \
                        and f"{where}.{f.name}" not in LIMITS:
                    missing.append(f"{where}.{f.name}")
    assert not missing, f"add these fields to robot_rl.config.LIMITS: {missing}"


# ------------------------------------------------------------------------------------------------ fuzz
def _fields():
    from robot_rl.config import COMMAND_SECTIONS, section_classes

    import dataclasses

    names = ["seed", "task.name", "task.tolerance", "task.max_steps", "randomization.physics.object_mass",
             "randomization.preset", "bogus.field", "env.controller.pos_scale", "ppo", "policy.down_dims.0"]
    for sec, cls in section_classes().items():
        names += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    return sorted(set(names)), sorted(COMMAND_SECTIONS)


FIELDS, COMMANDS = _fields()
VALUES = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "nan", "1e12", "1e400", "-1", "0", "99999999999999999999", "[]", "{}",
                     "[1, 2]", "[.nan]", "null", "true", "'x'", "[32, 1e9]", "{a: 1}", "", "0.5", "-0.0", "[[1]]",
                     "1_000", "0x10", "mujoco", "place", "default", "~", "[16000, 16000]", "&a [*a]", "&a {x: *a}",
                     BOMB]),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from(COMMANDS), key=st.sampled_from(FIELDS), value=VALUES)
def test_resolver_fuzz_raises_only_config_error(command, key, value):
    from robot_rl.config import resolve

    try:
        cfg = resolve(command, sets=[f"{key}={value}"])
    except ConfigError:
        return
    json.dumps(cfg.to_dict(), allow_nan=False)  # what resolves is finite, plain data
