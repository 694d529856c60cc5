"""Distillation (robot_rl.stages.distill): DAgger's relabelling records the labelling policy's actions while the
driving policy's actions move the env; a tiny `robot-rl distill` run end to end (teacher rollouts with two cameras
under visual randomization, an image student whose validation loss falls, a DAgger round, evaluation from pixels,
report); a student input that is an object pose is refused before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from robot_rl.datasets.store import ZarrStore
from robot_rl.stages.evaluation import evaluate

CLI = [sys.executable, "-m", "robot_rl.cli"]
TEACHER = Path(__file__).parent / "fixtures" / "place_bc_mujoco"


class Constant:
    """A policy that always sends ``value`` (CombinedPolicy's interface)."""

    def __init__(self, value, n=1):
        self.value, self.n = np.asarray(value, np.float32), n

    def reset(self, mask, obs):
        pass

    def observe(self, obs, mask):
        pass

    def act(self, obs):
        return np.repeat(self.value[None], len(next(iter(obs.values()))), 0)


def test_label_policy_is_recorded_and_the_driver_acts(tmp_path):
    down, up = [0, 0, -1, 0, 1], [0, 0, 1, 0, -1]
    kw = dict(n_episodes=2, n_envs=1, env_kwargs={"max_steps": 6}, progress=False)
    ref = ZarrStore.create(tmp_path / "ref.zarr")
    evaluate(None, "place", policy=Constant(down), record=ref, **kw)
    store = ZarrStore.create(tmp_path / "labelled.zarr")
    evaluate(None, "place", policy=Constant(down), record=store, label_policy=Constant(up), **kw)
    a, b = ZarrStore.open(tmp_path / "ref.zarr"), ZarrStore.open(tmp_path / "labelled.zarr")
    for e in range(2):
        ea, eb = a.get_episode(e), b.get_episode(e)
        np.testing.assert_array_equal(ea["ee_pos"], eb["ee_pos"])  # the driver's actions moved the arm
        assert (eb["action"] == np.float32(up)).all() and (ea["action"] == np.float32(down)).all()


def _cli(*args):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


def test_tiny_distillation_end_to_end(tmp_path):
    out = tmp_path / "d"
    r = _cli("distill", "--teacher-base", TEACHER, "--out", out, "--task", "place", "--episodes", 3,
             "--dagger-rounds", 1, "--dagger-episodes", 2, "--dagger-steps", 20, "--image-size", 32, "--steps", 80,
             "--eval-episodes", 2,
             "--videos", 1, "--set", "distill.eval_backends=[mujoco, pybullet]", "--set", "base.val_every=10",
             "--set", "base.val_ratio=0.2", "--set", "policy.image_crop=null", "--set", "eval.n_envs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert [x["condition"] for x in rep["rows"]] == ["mujoco_nominal", "mujoco_randomized", "pybullet_nominal",
                                                    "pybullet_randomized"]
    assert rep["student"]["obs_keys"] == ["ee_pos", "ee_quat", "gripper_width"]
    assert rep["student"]["image_keys"] == ["image_front", "image_wrist"]
    # the teacher, then DAgger's student, rolls out in both renderers (the default rollout_backends)
    assert [(x["driver"], x["backend"]) for x in rep["rounds"]] == [
        ("teacher", "mujoco"), ("teacher", "pybullet"), ("student", "mujoco"), ("student", "pybullet")]
    assert rep["store_episodes"] == 10
    store = ZarrStore.open(out / "rollouts.zarr")
    assert tuple(store.schema["image_front"]["shape"]) == (32, 32, 3)
    metas = store.episodes_meta()
    assert [m["extra"]["dagger_round"] for m in metas] == [0] * 6 + [1] * 4
    assert [m["backend"] for m in metas] == ["mujoco"] * 3 + ["pybullet"] * 3 + ["mujoco"] * 2 + ["pybullet"] * 2
    assert len({m["seed"] for m in metas}) == 10  # every backend and round on seeds of its own
    assert all(m["extra"]["randomization"].get("visual") for m in metas)  # the visual preset was on
    assert all(m["seed"] >= 2_000_000 for m in metas)  # rollout seeds are disjoint from the evaluation's
    h0 = json.loads((out / "student_round0" / "train_summary.json").read_text())["history"]
    assert h0[-1]["val_loss"] < h0[0]["val_loss"], h0  # the student learns
    # the DAgger round continues from round 0's weights and keeps its normalization (the teacher's labels at the
    # student's states fall outside round 0's range, so round 1's losses are not comparable with round 0's)
    w0, w1 = (load_file(str(out / f"student_round{r}" / "checkpoint" / "model.safetensors")) for r in (0, 1))
    norm = [k for k in w0 if k.startswith("normalizer.")]
    assert norm and all(torch.equal(w0[k], w1[k]) for k in norm)
    assert json.loads((out / "student_round1" / "train_config.json").read_text())["init_from"].endswith(
        "student_round0/checkpoint")
    # the student reads cameras and proprioception only
    cfg = json.loads((out / "student_round1" / "checkpoint" / "config.json").read_text())["config"]
    assert not {"cube_pos", "target_pos", "cube_to_target", "cube_quat"} & set(cfg["obs_keys"])
    assert (out / "success.png").stat().st_size > 1000 and "student / teacher" in (out / "report.md").read_text()
    assert len(list((out / "videos").glob("*.mp4"))) == 2


def test_a_privileged_student_input_is_refused(tmp_path):
    out = tmp_path / "d"
    r = _cli("distill", "--teacher-base", TEACHER, "--out", out, "--set", "base.obs_keys=[ee_pos, cube_pos]")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("robot-rl: error: base.obs_keys: 'cube_pos' is an object")
    assert not out.exists()
