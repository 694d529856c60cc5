"""The success classifier (robot_rl.stages.success): trained by ``robot-rl success-classifier`` on a store of real
MuJoCo camera episodes with both labels, it ranks held-out positive frames (the last frame of a success) above the
negatives; trained with the loss's sign flipped it must not (proof that the bar can fail)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robot_rl.errors import ConfigError
from robot_rl.stages.collect import collect

SETS = ["success.steps=250", "success.batch_size=32", "success.channels=[8,16]", "success.crop=[56,56]",
        "success.num_keypoints=8", "success.feature_dim=32", "success.val_fraction=0.3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """24 scripted `place` episodes with a 64x64 front camera: 12 on target (most succeed), 12 aimed 3 cm off (all
    fail: the cube set down off the target)."""
    path = tmp_path_factory.mktemp("success") / "episodes.zarr"
    for k, (bias, seed) in enumerate(((0.0, 0), (0.03, 10_000))):
        collect(path, "place", 12, seed=seed, bias=bias, only_success=False, cameras=("front",), image_size=(64, 64),
                overwrite=k == 0, progress=False, n_envs=2)
    return path


def _train(store, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread: the suite runs two test processes on 2 cores
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "success-classifier", "--store", str(store), "--out",
                        str(out), *[a for s in (*SETS, *extra) for a in ("--set", s)]], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture
def flipped_loss(monkeypatch, tmp_path):
    """A sitecustomize on the subprocess's path that flips the sign of the classifier's loss."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import torch.nn.functional as F\n_bce = F.binary_cross_entropy_with_logits\n"
        "F.binary_cross_entropy_with_logits = lambda *a, **k: -_bce(*a, **k)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{Path(__file__).parent.parent}")


def test_classifier_ranks_held_out_success_frames_first(store, tmp_path):
    from robot_rl.stages.success import load_success_classifier

    rep = _train(store, tmp_path / "clf")
    f, e = rep["held_out_frames"], rep["held_out_episodes"]
    assert rep["episodes"]["held_out_successes"] >= 1 and f["tp"] + f["fn"] == rep["episodes"]["held_out_successes"]
    assert f["auroc"] >= 0.85, f  # positives above negatives
    assert e["tp"] + e["fp"] + e["tn"] + e["fn"] == rep["episodes"]["held_out"]
    assert (tmp_path / "clf" / "confusion.png").stat().st_size > 0 and "AUROC" in (tmp_path / "clf" /
                                                                                   "report.md").read_text()
    clf = load_success_classifier(tmp_path / "clf" / "checkpoint")
    p = clf.prob(np.zeros((3, 64, 64, 3), np.uint8))
    assert p.shape == (3,) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    with pytest.raises(ConfigError, match="images"):
        clf.prob(np.zeros((64, 48, 3), np.uint8))


def test_classifier_trained_on_a_flipped_loss_fails_the_bar(store, tmp_path, flipped_loss):
    rep = _train(store, tmp_path / "flipped")
    assert rep["held_out_frames"]["auroc"] < 0.85, rep["held_out_frames"]


def test_bad_input_names_the_field(store, tmp_path):
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "success-classifier", "--store", str(store), "--out",
                        str(tmp_path / "x"), "--camera", "wrist"], capture_output=True, text=True)
    assert r.returncode != 0 and "success.camera" in r.stderr and "front" in r.stderr
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "success-classifier", "--store", str(store), "--out",
                        str(tmp_path / "y"), "--set", "success.crop=[96,96]"], capture_output=True, text=True)
    assert r.returncode != 0 and "success.crop" in r.stderr
