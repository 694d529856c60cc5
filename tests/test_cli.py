"""The robot-rl CLI end to end (real subprocesses): a tiny pipeline run, store commands, and bad input."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CLI = [sys.executable, "-m", "robot_rl.cli"]


def run(*args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}  # as a user's shell: the CLI picks EGL itself
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def run_here(*args):
    """``robot_rl.cli.main`` in this process (what the ``robot-rl`` script calls), for bad-input checks that end before
    any work: (exit code, stderr) as a CompletedProcess; saves a Python + torch start-up per call. The script
    itself is run as a subprocess by the other tests."""
    import contextlib
    import io

    from robot_rl.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    sets = ["collect.episodes=4", "base.steps=20", "base.batch_size=32", "ppo.total_env_steps=400",
            "ppo.n_envs=2", "ppo.n_steps=100", "ppo.val_episodes=2", "eval.episodes=4", "eval.n_envs=2",
            "eval.videos=1"]
    r = run("pipeline", "--preset", "quick", "--out", out, *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_tiny_pipeline_outputs(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    # quick preset: diffusion base; the last residual is the headline row, the best on validation beside it
    assert set(rep["results"]) == {"base (diffusion)", "base + residual", "base + residual (best on validation)"}
    for v in rep["results"].values():
        assert v["episodes"] == 4 and 0.0 <= v["ci95"][0] <= v["success_rate"] <= v["ci95"][1] <= 1.0
    assert (tiny_run / "report.md").read_text().count("|") > 10
    early = tiny_run / "base_eval.json"  # written before the residual stage starts
    assert early.stat().st_mtime <= (tiny_run / "residual" / "checkpoint" / "model.safetensors").stat().st_mtime
    assert json.loads(early.read_text())["successes"] == rep["results"]["base (diffusion)"]["successes"]
    per = json.loads((tiny_run / "eval_per_episode.json").read_text())
    assert [len(v) for v in per.values()] == [4, 4, 4]
    assert (tiny_run / "learning_curve.png").stat().st_size > 1000
    vids = list((tiny_run / "videos").glob("*.mp4"))
    assert len(vids) == 2 and all(v.stat().st_size > 1000 for v in vids)
    assert (tiny_run / "config.yaml").exists() and list((tiny_run / "tb").iterdir())
    assert (tiny_run / "base" / "checkpoint" / "model.safetensors").exists()
    assert (tiny_run / "residual" / "checkpoint" / "model.safetensors").exists()
    assert (tiny_run / "residual" / "checkpoint_best" / "model.safetensors").exists()
    # the written config reproduces the run: --config of it resolves to the same settings
    r = run("pipeline", "--config", tiny_run / "config.yaml", "--print-config")
    assert r.returncode == 0, r.stderr[-2000:]
    import yaml

    assert yaml.safe_load(r.stdout) == yaml.safe_load((tiny_run / "config.yaml").read_text())


def test_train_residual_td3_with_demos_and_resume(tiny_run, tmp_path):
    """`train-residual --algo td3` end to end on the tiny run's base and demos (real MuJoCo envs), then --resume."""
    out = tmp_path / "td3"
    sets = ["td3.total_env_steps=300", "td3.n_envs=2", "td3.learning_starts=100", "td3.batch_size=32",
            "td3.n_critics=2", "td3.critic_hidden=[16]", "td3.critic_warmup_updates=10", "td3.val_every=200",
            "td3.val_episodes=2", "td3.log_every=100", "td3.utd_ratio=0.1", "eval.n_envs=2", "residual.hidden=[16]",
            "residual.alpha=1.0", "env.max_steps=60"]  # alpha 1: the tiny base's noisy demos are within reach
    args = ["train-residual", "--algo", "td3", "--base", tiny_run / "base" / "checkpoint", "--demos",
            tiny_run / "demos.zarr", "--out", out, *[a for s in sets for a in ("--set", s)]]
    r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [row["env_steps"] for row in curve] == [100, 200, 300]
    assert curve[-1]["demo_size"] > 0 and curve[-1]["updates"] == 20 and "val_success" in curve[1]
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["config"]["head"] == "tanh" and meta["extra"]["algo"] == "td3"
    assert (out / "state" / "model.safetensors").exists() and (out / "checkpoint_best").is_dir()
    r = run(*args[:-2 * len(sets)], *[a for s in sets for a in ("--set", s.replace("=300", "=500"))], "--resume",
            "--compare", tiny_run / "residual")  # the tiny pipeline's PPO curve overlaid in learning_curve.png
    assert r.returncode == 0, r.stderr[-3000:]
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [row["env_steps"] for row in curve] == [100, 200, 300, 400, 500] and curve[-1]["updates"] == 40
    _one_line_error(run("train-residual", "--algo", "ppo", "--base", tiny_run / "base" / "checkpoint", "--out", out,
                        "--resume"), "resume")
    _one_line_error(run(*args, "--compare", tmp_path / "nothing"), "compare")  # checked before anything is trained
    _one_line_error(run("train-residual", "--algo", "td3", "--base", tiny_run / "base" / "checkpoint", "--out",
                        tmp_path / "x", "--set", "residual.head=gaussian"), "residual.head")


def test_train_residual_over_seeds_with_actors(tiny_run, tmp_path):
    """`train-residual --train-seeds 2 --actors 1`: two seeds through the actor-learner split, each evaluated (last
    and best-on-validation checkpoints) with the base on the same held-out seeds; the report holds per-seed paired
    tests and the rliable IQM of each."""
    out = tmp_path / "seeds"
    sets = ["td3.total_env_steps=120", "td3.n_envs=2", "td3.learning_starts=60", "td3.batch_size=16",
            "td3.n_critics=2", "td3.critic_hidden=[16]", "td3.critic_warmup_updates=0", "td3.val_every=60",
            "td3.val_episodes=2",
            "td3.log_every=60", "td3.utd_ratio=0.1", "td3.push_every=1", "eval.n_envs=2", "eval.episodes=4",
            "residual.hidden=[16]", "env.max_steps=40"]
    r = run("train-residual", "--algo", "td3", "--base", tiny_run / "base" / "checkpoint", "--out", out,
            "--train-seeds", "2", "--actors", "1", "--seed", "5", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["training_seeds"] == ["seed 5", "seed 6"] and rep["over_seeds"]["n_seeds"] == 2
    runs = [k for k in rep["results"] if k.startswith("base + residual, ")]
    best = [k for k in rep["results"] if k.startswith("base + residual (best on validation), ")]
    assert len(runs) == 2 and len(best) == 2
    assert all(rep["results"][k]["paired_vs_base"]["episodes"] == 4 for k in runs + best)
    assert [rep["results"][k]["success_rate"] for k in runs] == rep["over_seeds"]["rates"]
    assert [rep["results"][k]["success_rate"] for k in best] == rep["over_seeds_best_on_validation"]["rates"]
    lo, hi = rep["over_seeds"]["iqm_ci95"]
    assert lo <= rep["over_seeds"]["iqm"] <= hi
    assert "best on validation: IQM" in rep["summary"]
    for s in (5, 6):
        curve = json.loads((out / f"seed_{s}" / "learning_curve.json").read_text())
        assert curve[-1]["env_steps"] == 120 and curve[-1]["mixed_version_chunks"] == 0
        assert json.loads((out / f"seed_{s}" / "td3_config.json").read_text())["seed"] == s
    assert (out / "learning_curves.png").stat().st_size > 0 and "IQM" in (out / "report.md").read_text()


def test_presets_resolve_validate_and_merge_overrides():
    from robot_rl.errors import ConfigError
    from robot_rl.pipeline import PRESETS, resolve_config, validate_config

    for name in PRESETS:
        validate_config(resolve_config(name))
    diff = resolve_config("full-diffusion")
    assert diff.base.kind == "diffusion" and "cube_to_target" in diff.base.obs_keys
    assert resolve_config("full").base.kind == "bc"
    cfg = resolve_config("full-diffusion", overrides=["policy.num_inference_steps=3", "ppo.n_envs=4"])
    assert (cfg.policy.down_dims, cfg.policy.num_inference_steps) == ([32, 64, 128], 3)  # the preset's sibling kept
    assert cfg.ppo.n_envs == 4 and cfg.ppo.n_steps == 100 and cfg.ppo.residual_l2 == 0.1
    with pytest.raises(ConfigError, match="collect.nosie"):
        resolve_config("full", overrides=["collect.nosie=0.1"])
    img = resolve_config("full-image-offpolicy")
    assert img.base.image_keys == ["image_front", "image_wrist"] and "cube_pos" not in img.base.obs_keys
    with pytest.raises(ConfigError, match="env.cameras"):  # an image base needs its cameras in the demos
        validate_config(resolve_config("full-image-offpolicy", overrides=["env.cameras=[front]"]))


def test_store_info_and_validate(tiny_run):
    r = run("store", "info", tiny_run / "demos.zarr")
    assert r.returncode == 0 and "episodes" in r.stdout
    r = run("store", "validate", tiny_run / "demos.zarr")
    assert r.returncode == 0 and "OK" in r.stdout


def test_eval_command_with_residual(tiny_run, tmp_path):
    r = run("eval", "--base", tiny_run / "base" / "checkpoint", "--residual", tiny_run / "residual" / "checkpoint",
            "--out", tmp_path / "ev", "--episodes", 2, "--n-envs", 1, "--videos", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "success" in r.stdout and (tmp_path / "ev" / "report.json").exists()
    # the same checkpoint in the other simulator, on a tighter task variant
    r = run("eval", "--base", tiny_run / "base" / "checkpoint", "--out", tmp_path / "ev2", "--episodes", 2,
            "--n-envs", 1, "--videos", 0, "--backend", "pybullet", "--set", "task.tolerance=0.004")
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = json.loads((tmp_path / "ev2" / "report.json").read_text())["results"].values()
    assert res["backend"] == "pybullet" and res["task_config"]["tolerance"] == 0.004  # as the env workers report
    assert "`tolerance=0.004`" in (tmp_path / "ev2" / "report.md").read_text()


def test_eval_records_rollouts_that_train_base_can_select(tiny_run, tmp_path):
    """The rollouts -> store loop: `eval --record` appends every evaluated episode (source policy) to a demo store;
    `train-base --sources policy --only-success` trains on the successful ones only."""
    import shutil

    from robot_rl.datasets.store import ZarrStore

    store = tmp_path / "demos.zarr"
    shutil.copytree(tiny_run / "demos.zarr", store)
    n_demos = ZarrStore.open(store).n_episodes
    fixture = Path(__file__).parent / "fixtures" / "place_bc_mujoco"  # a base that succeeds on place
    r = run("eval", "--base", fixture, "--out", tmp_path / "ev", "--episodes", 3, "--n-envs", 2, "--videos", 0,
            "--record", store)
    assert r.returncode == 0, r.stderr[-2000:]
    st = ZarrStore.open(store)
    assert [p for p in st.validate() if p.startswith("error")] == []
    per = json.loads((tmp_path / "ev" / "eval_per_episode.json").read_text())["base"]
    new = [st.episode_meta(i) for i in range(n_demos, st.n_episodes)]
    assert sorted((m["seed"], m["success"], m["length"]) for m in new) == \
        sorted((e["seed"], e["success"], e["length"]) for e in per)
    assert {m["source"] for m in new} == {"policy"} and new[0]["extra"]["policy"]["base"] == str(fixture)
    ep = st.get_episode(n_demos)
    assert np.abs(ep["action"]).max() > 0.1 and not ep["intervention"].any()
    wins = sum(e["success"] for e in per)
    assert wins >= 2, per
    r = run("train-base", "--store", store, "--out", tmp_path / "b", "--kind", "bc", "--steps", 3, "--batch-size", 8,
            "--sources", "policy", "--only-success")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["train_episodes"] + summary["val_episodes"] == wins
    r = run("train-base", "--store", store, "--out", tmp_path / "b2", "--sources", "robot")
    assert r.returncode == 2 and "sources" in r.stderr and not (tmp_path / "b2").exists()


def test_image_policy_collect_train_eval(tmp_path):
    """Camera demonstrations -> an image BC base -> eval, which takes the cameras and image size from the
    checkpoint; a checkpoint run on a task lacking its observation keys is a one-line error."""
    store = tmp_path / "img.zarr"
    r = run("collect", "--task", "place", "--episodes", 2, "--store", store, "--cameras", "front",
            "--image-size", 32)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train-base", "--store", store, "--out", tmp_path / "b", "--kind", "bc", "--steps", 3, "--batch-size", 8,
            "--obs-keys", "ee_pos", "gripper_width", "target_pos", "--image-keys", "image_front",
            "--set", "policy.image_channels=[8, 8, 8]", "--set", "policy.image_feature_dim=8",
            "--set", "policy.image_num_keypoints=8", "--set", "policy.n_groups=4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("eval", "--base", tmp_path / "b" / "checkpoint", "--out", tmp_path / "ev", "--episodes", 1,
            "--n-envs", 1, "--videos", 1, "--set", "env.max_steps=10")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["results"]["base"]["episodes"] == 1 and len(rep["videos"]) == 1
    _one_line_error(run("eval", "--base", tmp_path / "b" / "checkpoint", "--task", "lift", "--out", tmp_path / "e2",
                        "--episodes", 1, "--videos", 0), "obs_keys.target_pos")


def _one_line_error(r, field):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("robot-rl: error:"), r.stderr
    assert field in lines[0], lines[0]


def test_bad_input_errors(tmp_path, tiny_run):
    store = tiny_run / "demos.zarr"
    before = sorted(p.name for p in store.rglob("*"))
    _one_line_error(run_here("collect", "--task", "stack", "--store", tmp_path / "s", "--episodes", 1), "task")
    _one_line_error(run_here("store", "info", tmp_path / "missing.zarr"), "missing.zarr")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("hi")
    _one_line_error(run_here("train-base", "--store", tmp_path / "notastore", "--out", tmp_path / "o"), "notastore")
    _one_line_error(run_here("train-base", "--store", store, "--out", tmp_path / "o", "--obs-keys", "ee_pos", "nope"), "obs_keys")
    _one_line_error(run_here("train-base", "--store", store, "--out", tmp_path / "o", "--set", "policy.n_action_steps=40"),
                    "n_action_steps")
    # a pickled checkpoint is refused without being executed
    marker = tmp_path / "pwned"
    bad = tmp_path / "ck"
    bad.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    (bad / "config.json").write_text("{}")
    _one_line_error(run_here("eval", "--base", bad, "--out", tmp_path / "e"), "pickle")
    assert not marker.exists()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{corrupt")
    _one_line_error(run_here("eval", "--base", bad, "--out", tmp_path / "e"), "config.json")
    base = tiny_run / "base" / "checkpoint"
    _one_line_error(run_here("eval", "--base", base, "--out", tmp_path / "e", "--backend", "gazebo"), "backend")
    _one_line_error(run_here("eval", "--base", base, "--out", tmp_path / "e", "--set", "task.tol=1"), "tol")
    _one_line_error(run_here("train-residual", "--base", base, "--out", tmp_path / "r", "--set", "env.bogus=1"), "bogus")
    _one_line_error(run_here("train-residual", "--base", base, "--out", tmp_path / "r", "--set",
                        "randomization.physics.object_mass=[2, 1]"), "object_mass")
    _one_line_error(run_here("train-residual", "--base", base, "--out", tmp_path / "r", "--set", "ppo.bogus=1"),
                    "ppo.bogus")
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()
    _one_line_error(run_here("pipeline", "--out", tmp_path / "p", "--set", "ppo.n_minibatches=3"), "n_minibatches")
    _one_line_error(run_here("pipeline", "--out", tmp_path / "p", "--set", "colect.episodes=3"), "colect")
    # creating a store over an existing non-store directory never deletes it
    _one_line_error(run_here("collect", "--store", tmp_path / "notastore", "--episodes", 1, "--overwrite"), "notastore")
    assert (tmp_path / "notastore" / "x.txt").read_text() == "hi"
    assert sorted(p.name for p in store.rglob("*")) == before


def test_more_bad_input_leaves_outputs_alone(tmp_path, tiny_run):
    """Values that used to reach a traceback or write before validating: each is one line, exit 2, and neither an
    existing store (even with --overwrite) nor an existing run's config.yaml is touched."""
    store = tiny_run / "demos.zarr"
    before = sorted(p.name for p in store.rglob("*"))
    _one_line_error(run_here("collect", "--store", store, "--episodes", 1, "--overwrite", "--backend", "gazebo"), "backend")
    _one_line_error(run_here("collect", "--store", store, "--episodes", 1, "--overwrite", "--cameras", "side"), "cameras")
    assert sorted(p.name for p in store.rglob("*")) == before
    out = tmp_path / "old_run"
    out.mkdir()
    (out / "config.yaml").write_text("keep: me\n")
    for policy, field in (("policy.down_dims=[32", "policy"), ("policy=3", "policy"),
                          ("policy.n_action_steps=40", "n_action_steps")):
        _one_line_error(run_here("train-base", "--store", store, "--out", out, "--set", policy), field)
    base = tiny_run / "base" / "checkpoint"
    _one_line_error(run_here("eval", "--base", base, "--out", out, "--n-envs", 0), "eval.n_envs")
    _one_line_error(run_here("transfer", "--checkpoint", base, "--out", out, "--videos", -1), "transfer.videos")
    _one_line_error(run_here("train-residual", "--base", base, "--out", out, "--n-envs", 0), "n_envs")
    _one_line_error(run_here("learn", "--base", base, "--out", out, "--host", "0.0.0.0"), "serve.token")
    _one_line_error(run_here("learn", "--base", base, "--out", out, "--set", "td3.utd_ratio=0"), "td3.utd_ratio")
    assert (out / "config.yaml").read_text() == "keep: me\n" and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    _one_line_error(run_here("pipeline", "--out", out, "--set", "ppo.n_envs=["), "--set")
    _one_line_error(run_here("pipeline", "--out", out, "--set", "collect=5"), "collect")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    _one_line_error(run_here("pipeline", "--out", out, "--config", tmp_path / "list.yaml"), "config")
    _one_line_error(run_here("serve", "--checkpoint", base, "--threads", 0, "--port", 0), "threads")
    _one_line_error(run_here("serve", "--checkpoint", base, "--device", "bogus", "--port", 0), "device")
    (tmp_path / "bad.yaml").write_text("nodes: [\n")
    _one_line_error(run_here("bringup", tmp_path / "bad.yaml"), "config")
    sim = Path(__file__).resolve().parents[1] / "launch" / "sim_bringup.yaml"
    _one_line_error(run_here("bringup", sim, "--set", "policy_node.control_rate=[", "--dry-run"), "set")
