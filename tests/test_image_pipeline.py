"""The image training pipeline on a real store of MuJoCo camera episodes: DataLoader workers that decode the frames
(same run as in-process), one image encoder shared by the cameras, and a frozen encoder initialised from a
checkpoint (``base.init_from``)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robot_rl.errors import ConfigError
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.policies.checkpoint import load_policy
from robot_rl.policies.encoders import ImageEncoder
from robot_rl.stages.collect import collect
from robot_rl.stages.train_base import BaseTrainConfig, train_base

CAMS = ["image_front", "image_wrist"]
TINY = dict(image_channels=[8, 16], image_num_keypoints=8, image_feature_dim=16, image_crop=[28, 28],
            bc_hidden=[32, 32], horizon=8, n_action_steps=4)
FIXTURE = Path(__file__).parent / "fixtures" / "place_bc_mujoco"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("image_pipeline") / "demos.zarr"
    collect(path, "place", 3, cameras=("front", "wrist"), image_size=(32, 32), progress=False)
    return path


def cfg(**kw) -> BaseTrainConfig:
    policy = dict(TINY, **kw.pop("policy", {}))
    base = dict(kind="bc", obs_keys=["ee_pos", "gripper_width"], image_keys=list(CAMS), steps=6, batch_size=16,
                val_ratio=0.34, val_every=1000, warmup_steps=0, lr=1e-3, policy=policy)
    return BaseTrainConfig(**{**base, **kw})


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "checkpoint" / "model.safetensors"))


def test_loader_workers_give_the_same_run(store, tmp_path):
    """Two worker processes decoding the frames give the in-process run exactly, over more than one epoch (the
    shuffle and the crops' RNG must not depend on the workers, persistent ones included)."""
    runs = {w: train_base(store, tmp_path / f"w{w}", cfg(steps=20, val_every=5, loader_workers=w), progress=False)
            for w in (0, 2)}
    assert runs[0]["windows"] // 16 < 20  # the run reshuffles at least once
    losses = {w: [(h["train_loss"], h["val_loss"]) for h in r["history"]] for w, r in runs.items()}
    assert len(losses[0]) == 4 and losses[2] == losses[0]
    assert runs[2]["final_loss"] == runs[0]["final_loss"]
    a, b = weights(tmp_path / "w0"), weights(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "w2" / "train_config.json").read_text().count('"loader_workers": 2') == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_loader_workers_must_be_a_count(store, tmp_path, bad):
    with pytest.raises(ConfigError) as e:
        train_base(store, tmp_path / "r", cfg(loader_workers=bad), progress=False)
    assert e.value.field == "base.loader_workers" and not (tmp_path / "r").exists()


def _policy_config(**kw) -> PolicyConfig:
    return PolicyConfig.from_dict(dict(TINY, kind="bc", obs_keys=["ee_pos", "gripper_width"],
                                       obs_dims={"ee_pos": 3, "gripper_width": 1},
                                       image_keys=list(CAMS), image_shape=[32, 32, 3], action_dim=5, **kw))


def _obs(b=4, seed=0):
    g = np.random.default_rng(seed)
    return {"ee_pos": g.normal(size=(b, 2, 3)).astype(np.float32),
            "gripper_width": g.uniform(0, 0.08, size=(b, 2, 1)).astype(np.float32),
            **{k: g.integers(0, 256, (b, 2, 32, 32, 3), dtype=np.uint8) for k in CAMS}}


def test_shared_encoder_is_one_module_for_every_camera(store, tmp_path):
    torch.manual_seed(0)
    per_cam = make_policy(_policy_config())
    shared = make_policy(_policy_config(shared_image_encoder=True))
    n_enc = lambda p: sum(isinstance(m, ImageEncoder) for m in p.modules())  # noqa: E731
    assert (n_enc(per_cam), n_enc(shared)) == (2, 1) and len(shared.obs_encoder.image_encoders()) == 1
    enc_params = lambda p: sum(x.numel() for x in p.obs_encoder.parameters())  # noqa: E731
    assert enc_params(per_cam) == 2 * enc_params(shared)
    assert shared.config.cond_dim == per_cam.config.cond_dim
    # features: [low-dim | front | wrist] per step, the cameras through the one encoder, in image_keys order
    shared.eval()
    o = shared._obs_tensors(_obs())
    cond = shared.obs_encoder(o, shared.normalizer)
    assert cond.shape == (4, shared.config.cond_dim) and cond.dtype == torch.float32
    enc = shared.obs_encoder.shared_image
    per_step = torch.cat([*[shared.normalizer.normalize(k, o[k]) for k in ("ee_pos", "gripper_width")],
                          *[enc(o[k].flatten(0, 1)).reshape(4, 2, -1) for k in CAMS]], -1)
    torch.testing.assert_close(cond, per_step.flatten(1))
    assert shared.predict_chunk(_obs()).shape == (4, 4, 5)
    # train-base with it: a few steps, a checkpoint that loads back with one encoder
    r = train_base(store, tmp_path / "shared", cfg(policy={"shared_image_encoder": True}), progress=False)
    assert np.isfinite(r["final_loss"]) and r["history"][-1]["step"] == 6
    loaded = load_policy(tmp_path / "shared" / "checkpoint")
    assert loaded.config.shared_image_encoder and n_enc(loaded) == 1
    assert loaded.predict_chunk(_obs()).shape == (4, 4, 5)


def test_frozen_encoder_is_not_trained():
    policy = make_policy(_policy_config(freeze_image_encoder=True))
    encs = policy.obs_encoder.image_encoders()
    policy.train()
    assert len(encs) == 2 and policy.mlp.training
    assert not any(m.training for e in encs for m in e.modules())
    assert not any(p.requires_grad for e in encs for p in e.parameters())
    b = {**_obs(16), "action": np.random.default_rng(1).normal(size=(16, 8, 5)).astype(np.float32)}
    policy.compute_loss(b).backward()
    assert all(p.grad is None for e in encs for p in e.parameters())
    assert all(p.grad is not None for p in policy.mlp.parameters())


def test_init_from_and_frozen_encoder(store, tmp_path):
    first = tmp_path / "first"
    train_base(store, first, cfg(), progress=False)
    frozen = tmp_path / "frozen"
    train_base(store, frozen, cfg(steps=8, init_from=str(first / "checkpoint"),
                                  policy={"freeze_image_encoder": True}), progress=False)
    a, b = weights(first), weights(frozen)
    enc = [k for k in a if k.startswith("obs_encoder.images.")]
    head = [k for k in a if k.startswith("mlp.")]
    assert len(enc) > 20 and len(head) == 6
    assert all(torch.equal(a[k], b[k]) for k in enc)  # copied from the checkpoint, then left alone
    assert all(not torch.equal(a[k], b[k]) for k in head)  # initialised from it too, then trained
    assert load_policy(frozen / "checkpoint").config.freeze_image_encoder
    # init_from without freezing: every weight starts from the checkpoint and is trained
    tuned = tmp_path / "tuned"
    train_base(store, tuned, cfg(steps=2, lr=1e-5, init_from=str(first / "checkpoint")), progress=False)
    c = weights(tuned)
    assert all(not torch.equal(a[k], c[k]) for k in head)
    assert max(float((a[k] - c[k]).abs().max()) for k in a if not k.startswith("normalizer.")) < 1e-3


def test_init_normalizer_keeps_the_checkpoints_statistics(store, tmp_path):
    """DAgger's fine-tuning keeps the previous round's normalization (init_normalizer); plain init_from recomputes it
    from this run's episodes (here another split of the episodes, so other statistics)."""
    first = tmp_path / "first"
    train_base(store, first, cfg(val_ratio=0.6), progress=False)
    kept, fresh = tmp_path / "kept", tmp_path / "fresh"
    for out, keep in ((kept, True), (fresh, False)):
        train_base(store, out, cfg(steps=2, init_from=str(first / "checkpoint"), init_normalizer=keep), progress=False)
    a, k, f = weights(first), weights(kept), weights(fresh)
    norm = [n for n in a if n.startswith("normalizer.")]
    assert norm and all(torch.equal(a[n], k[n]) for n in norm)
    assert any(not torch.equal(a[n], f[n]) for n in norm)


def test_init_from_errors(store, tmp_path):
    first = tmp_path / "first"
    train_base(store, first, cfg(steps=1), progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "model.pt").write_bytes(b"\x80\x04K\x01.")
    freeze = {"freeze_image_encoder": True}
    cases = [
        (cfg(policy=freeze), "no checkpoint gives the frozen image encoder"),
        (cfg(init_from=str(tmp_path / "nowhere")), "does not exist"),
        (cfg(init_from=str(pickled)), "pickle checkpoints are refused"),
        (cfg(init_from=str(FIXTURE)), "no tensor of"),  # a state-only BC policy of other sizes
        (cfg(init_from=str(FIXTURE), policy=dict(freeze, bc_hidden=[128, 128])), "frozen image-encoder tensors"),
        (cfg(init_from=str(first / "checkpoint"), policy=dict(freeze, shared_image_encoder=True)),
         "frozen image-encoder tensors"),  # per-camera encoders do not initialise a shared one
    ]
    for c, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            train_base(store, tmp_path / "r", c, progress=False)
        assert e.value.field == "base.init_from" and not (tmp_path / "r").exists(), match


def test_policy_config_fields_and_old_checkpoints():
    for name in ("shared_image_encoder", "freeze_image_encoder"):
        with pytest.raises(ConfigError) as e:
            _policy_config(**{name: "yes"})
        assert e.value.field == name
    old = load_policy(FIXTURE)  # its config.json predates both fields: they load with their defaults
    assert not old.config.shared_image_encoder and not old.config.freeze_image_encoder
    assert dataclasses.asdict(PolicyConfig())["freeze_image_encoder"] is False
