"""Policies: diffusion / BC training and sampling, normalization, safetensors checkpoints, input validation."""

import pathlib
import pickle

import numpy as np
import pytest
import torch

from robot_rl.errors import ConfigError
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.policies.checkpoint import load_module_safetensors, load_policy, save_module_safetensors, save_policy
from robot_rl.policies.diffusion import make_ema
from robot_rl.policies.normalizer import Normalizer

TINY = dict(obs_keys=["pos"], obs_dims={"pos": 4}, action_dim=2, n_obs_steps=2, n_action_steps=4, horizon=8,
            down_dims=[16, 32], n_groups=4, diffusion_step_embed_dim=16, num_inference_steps=5,
            image_channels=[8, 16], image_num_keypoints=8, image_feature_dim=16, bc_hidden=[32, 32])
IMG = dict(TINY, image_keys=["cam"], image_shape=[32, 32, 3], image_crop=[28, 28])
STATS = {"pos": {"min": -np.ones(4), "max": np.ones(4), "mean": np.zeros(4), "std": np.ones(4)},
         "action": {"min": np.array([-2.0, 0.0]), "max": np.array([2.0, 1.0])}}


def make(kind="diffusion", seed=0, **kw):
    torch.manual_seed(seed)
    return make_policy(PolicyConfig(kind=kind, **{**TINY, **kw}), STATS)


def obs_batch(b=4, image=False, seed=0):
    rng = np.random.default_rng(seed)
    o = {"pos": rng.uniform(-1, 1, (b, 2, 4)).astype(np.float32), "unused_key": np.zeros(3)}
    if image:
        o["cam"] = rng.integers(0, 256, (b, 2, 32, 32, 3), dtype=np.uint8)
    return o


def train_batch(b=16, image=False):
    o = obs_batch(b, image, seed=1)
    batch = {k: torch.from_numpy(v) for k, v in o.items() if k != "unused_key"}
    # actions are a smooth function of the observation, so they are learnable
    t = torch.linspace(0, 1, 8)
    p = batch["pos"][:, -1]
    batch["action"] = torch.stack([2 * torch.tanh(p[:, :1] + t), 0.5 + 0.4 * torch.sin(p[:, 1:2] * 3 * t)], -1)
    return batch


def eval_loss(policy, batch, reps=8):
    torch.manual_seed(123)  # same noise / timesteps before and after training
    with torch.no_grad():
        return float(np.mean([policy.compute_loss(batch).item() for _ in range(reps)]))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to OpenMP stalls when other processes load the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def diffusion():
    return make()


@pytest.fixture(scope="module")
def diffusion_img():
    return make(**IMG)


@pytest.mark.parametrize("kind,cfg", [("diffusion", {}), ("diffusion", IMG), ("bc", {}), ("bc", IMG)])
def test_training_reduces_loss(kind, cfg):
    policy = make(kind, **cfg)
    batch = train_batch(image=bool(cfg))
    before = eval_loss(policy, batch)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    ema = make_ema(policy)
    for _ in range(60):
        loss = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(policy.parameters())
    assert eval_loss(policy, batch) < 0.5 * before


@pytest.mark.parametrize("fixture,image", [("diffusion", False), ("diffusion_img", True)])
def test_diffusion_shapes_and_determinism(request, fixture, image):
    policy = request.getfixturevalue(fixture)
    for b in (1, 4):
        out = policy.predict_chunk(obs_batch(b, image))
        assert out.shape == (b, 4, 2) and out.dtype == np.float32
        assert np.all(out[..., 0] >= -2 - 1e-5) and np.all(out[..., 0] <= 2 + 1e-5)  # clip_sample, then unnormalize
    assert policy.predict_chunk(obs_batch(4, image), num_samples=3).shape == (4, 3, 4, 2)
    assert policy.predict_sequence(obs_batch(4, image)).shape == (4, 8, 2)

    def run(seed, **kw):
        return policy.predict_chunk(obs_batch(4, image), generator=torch.Generator().manual_seed(seed), **kw)

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    k = run(0, num_samples=3)
    assert not np.array_equal(k[:, 0], k[:, 1])  # K samples differ
    # init_noise replaces the Gaussian draw: deterministic in the noise, independent of the generator
    n1, n2 = torch.randn(4, 8, 2), torch.randn(4, 8, 2)
    a = run(0, init_noise=n1)
    np.testing.assert_array_equal(a, run(5, init_noise=n1.numpy()))
    assert not np.array_equal(a, run(0, init_noise=n2)) and not np.array_equal(a, run(0))
    # chunk is the executed slice [To-1, To-1+Ta) of the sequence
    seq = policy.predict_sequence(obs_batch(4, image), init_noise=n1)
    np.testing.assert_array_equal(seq[:, 1:5], a)
    with pytest.raises(ConfigError, match="init_noise"):
        run(0, init_noise=torch.randn(4, 7, 2))


def test_predict_restores_mode_and_freeze():
    policy = make().train()
    policy.predict_chunk(obs_batch(1))
    assert policy.training
    assert policy.freeze() is policy
    assert not policy.training and not any(p.requires_grad for p in policy.parameters())


def test_bc_deterministic():
    policy = make("bc")
    a = policy.predict_chunk(obs_batch(4))
    np.testing.assert_array_equal(a, policy.predict_chunk(obs_batch(4)))
    k = policy.predict_chunk(obs_batch(4), num_samples=3)
    assert k.shape == (4, 3, 4, 2)
    np.testing.assert_array_equal(k[:, 2], a)
    with pytest.raises(ConfigError, match="init_noise"):
        policy.predict_chunk(obs_batch(4), init_noise=np.zeros((4, 8, 2), np.float32))


@pytest.mark.parametrize("kind,cfg", [("diffusion", {}), ("diffusion", IMG), ("bc", IMG)])
def test_checkpoint_round_trip_bitwise(tmp_path, kind, cfg):
    policy = make(kind, seed=3, **cfg)
    save_policy(policy, tmp_path / "ck", extra={"steps": 7, "dataset": "x.zarr"})
    for path in (tmp_path / "ck", tmp_path / "ck" / "model.safetensors"):
        loaded = load_policy(path)
        assert type(loaded) is type(policy) and loaded.config == policy.config
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        o = obs_batch(4, bool(cfg))
        np.testing.assert_array_equal(policy.predict_chunk(o, generator=torch.Generator().manual_seed(9)),
                                      loaded.predict_chunk(o, generator=torch.Generator().manual_seed(9)))


def test_checkpoint_saves_ema_weights(tmp_path):
    policy = make()
    ema = make_ema(policy)
    batch, opt = train_batch(), torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        policy.compute_loss(batch).backward()
        opt.step()
        ema.step(policy.parameters())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    save_policy(policy, tmp_path, ema=ema)
    loaded = load_policy(tmp_path)
    for (name, p), shadow in zip(loaded.named_parameters(), ema.shadow_params):
        torch.testing.assert_close(p, shadow, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, s) for p, s in zip(policy.parameters(), ema.shadow_params))
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # policy untouched


class _Payload:
    """Unpickling this runs ``pathlib.Path.touch(marker)`` — stands in for arbitrary code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_refused_and_not_executed(tmp_path):
    control = tmp_path / "control_marker"
    torch.save({"w": _Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()  # the payload really executes when unpickled

    marker = tmp_path / "marker"
    good = save_policy(make(), tmp_path / "ck")
    torch.save({"w": _Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="pickle checkpoints are refused"):
        load_policy(tmp_path / "model.pt")
    (tmp_path / "model.pt").rename(good / "model.pt")
    (good / "model.safetensors").unlink()  # a directory holding only a pickle checkpoint
    with pytest.raises(ConfigError, match="pickle checkpoints are refused"):
        load_policy(good)
    torch.save({"w": _Payload(marker)}, good / "model.safetensors")  # torch.save zip disguised as safetensors
    with pytest.raises(ConfigError, match="pickle checkpoints are refused"):
        load_policy(good)
    (good / "model.safetensors").write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=4))  # raw 0x80 pickle
    with pytest.raises(ConfigError, match="pickle checkpoints are refused"):
        load_policy(good / "model.safetensors")
    assert not marker.exists()


def test_corrupt_or_incomplete_checkpoints(tmp_path):
    ck = save_policy(make(), tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as e:
        load_policy(ck)
    assert e.value.field == "model.safetensors"
    (ck / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + data[20:])
    with pytest.raises(ConfigError, match="corrupt"):
        load_policy(ck)
    (ck / "model.safetensors").write_bytes(data)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_policy(ck)
    (ck / "config.json").unlink()
    with pytest.raises(ConfigError) as e:
        load_policy(ck)
    assert e.value.field == "config.json"
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "nope")
    # weights from another architecture -> names/shapes mismatch
    save_policy(make(down_dims=[8, 16]), tmp_path / "other")
    (ck / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(ConfigError, match="wrong shape"):
        load_policy(ck)


def test_generic_module_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    save_module_safetensors(net, tmp_path, {"in": 3, "out": 2}, format_name="robot_rl.test", extra={"a": 1})
    loaded, meta = load_module_safetensors(tmp_path, lambda c: torch.nn.Linear(c["in"], c["out"]),
                                           format_name="robot_rl.test")
    assert meta["extra"] == {"a": 1} and torch.equal(loaded.weight, net.weight)
    with pytest.raises(ConfigError, match="format"):
        load_policy(tmp_path)
    with pytest.raises(ConfigError, match="JSON"):
        save_module_safetensors(net, tmp_path, {"x": np.float32(1)})


def test_bad_observations(diffusion_img):
    p = diffusion_img
    o = obs_batch(2, image=True)
    cases = [
        ({k: v for k, v in o.items() if k != "pos"}, "obs['pos']", "missing"),
        ({**o, "pos": o["pos"][0]}, "obs['pos']", r"expected shape \(2, 2, 4\), got \(2, 4\)"),
        ({**o, "pos": o["pos"][:, :, :3]}, "obs['pos']", "got"),
        ({**o, "cam": o["cam"][:1]}, "obs['cam']", r"\(2, 2, 32, 32, 3\)"),
        ({**o, "cam": o["cam"].astype(np.float32)}, "obs['cam']", "uint8"),
        ({**o, "pos": np.full((2, 2, 4), np.nan, np.float32)}, "obs['pos']", "finite"),
    ]
    for bad, field, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            p.predict_chunk(bad)
        assert e.value.field == field
    batch = {k: torch.from_numpy(v) for k, v in o.items()}
    with pytest.raises(ConfigError) as e:
        p.compute_loss({**batch, "action": torch.zeros(2, 7, 2)})
    assert e.value.field == "action"


@pytest.mark.parametrize("change,field", [
    (dict(n_obs_steps=0), "n_obs_steps"),
    (dict(n_action_steps=8), "n_action_steps"),  # > T - To + 1 = 7
    (dict(obs_keys=[], obs_dims={}), "obs_keys"),
    (dict(kind="transformer"), "kind"),
    (dict(horizon=9), "horizon"),  # a 2-level U-Net halves T once
    (dict(down_dims=[16, 32, 64], horizon=10), "horizon"),
    (dict(obs_dims={"pos": 4, "vel": 3}), "obs_dims"),
    (dict(down_dims=[10, 32]), "down_dims"),
    (dict(image_keys=["cam"], image_shape=[32, 32]), "image_shape"),
    (dict(image_keys=["cam"], image_shape=[32, 32, 3], image_crop=[40, 40]), "image_crop"),
    (dict(num_inference_steps=1000), "num_inference_steps"),
    (dict(n_groups=0), "n_groups"),  # was a ZeroDivisionError
    (dict(down_dims=64), "down_dims"),
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(clip_sample="no"), "clip_sample"),
    (dict(obs_keys=[{}], obs_dims={}), "obs_keys"),
    (dict(kind="bc", bc_hidden=256), "bc_hidden"),
    (dict(image_keys=["cam"], image_shape=[32, 32, 3], image_channels=32), "image_channels"),
])
def test_impossible_configs(change, field):
    with pytest.raises(ConfigError) as e:
        PolicyConfig(**{**TINY, **change}).validate()
    assert e.value.field == field and "->" in str(e.value)


def test_config_json_round_trip_and_unknown_field():
    cfg = PolicyConfig(**IMG)
    assert PolicyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as e:
        PolicyConfig.from_dict({**cfg.to_dict(), "n_obs_step": 2})
    assert e.value.field == "n_obs_step"


def test_normalizer():
    n = Normalizer({"a": 3}, {"a": {"min": [0.0, -1.0, 5.0], "max": [2.0, 1.0, 5.0]}})
    x = torch.tensor([[0.0, -1.0, 5.0], [2.0, 1.0, 5.0], [1.0, 0.0, 6.0]])
    y = n.normalize("a", x)
    torch.testing.assert_close(y, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(n.unnormalize("a", y), x)
    assert set(n.state_dict()) == {"a_min", "a_max"}
    with pytest.raises(ConfigError, match="action"):
        Normalizer({"action": 2}, {"a": {"min": [0], "max": [1]}})
    with pytest.raises(ConfigError) as e:
        Normalizer({"a": 2}, {"a": {"min": [0, 0, 0], "max": [1, 1, 1]}})
    assert e.value.field == "stats['a']['min']"
