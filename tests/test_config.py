"""robot_rl.config: one resolver for every command (dataclass defaults <- preset <- YAML files <- flags <- --set),
typed sections, one-line errors, the written config.yaml reproducing the run, the CLI's flags and presets."""

import dataclasses

import pytest
import yaml

from robot_rl.cli import build_parser, main
from robot_rl.config import COMMAND_SECTIONS, parse_set, parse_value, resolve, write_config
from robot_rl.errors import ConfigError


def printed(capsys, *argv) -> dict:
    """The config a command line resolves to (``--print-config``, in-process)."""
    assert main([*map(str, argv), "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_resolution_order_defaults_preset_file_flags_set(tmp_path):
    from robot_rl.rl.ppo import PPOConfig

    f1, f2 = tmp_path / "a.yaml", tmp_path / "b.yaml"
    f1.write_text("ppo: {n_steps: 50, gamma: 0.9}\neval: {episodes: 7}\n")
    f2.write_text("ppo: {gamma: 0.95}\n")
    preset = {"ppo": {"n_steps": 10, "n_envs": 2, "total_env_steps": 1000}, "seed": 3}
    cfg = resolve("train-residual", preset=preset, files=[f1, f2], flags={"ppo.n_envs": 4, "ppo.lr_actor": None},
                  sets=["ppo.n_envs=6", "eval.episodes=9"])
    p = cfg.ppo_config()
    assert p.total_env_steps == 1000  # preset
    assert p.n_steps == 50  # file over preset
    assert p.gamma == 0.95  # later file over earlier
    assert p.n_envs == 6  # --set over flag over preset
    assert p.lr_actor == PPOConfig.lr_actor  # a flag of None is "not given": the dataclass default stays
    assert p.seed == 3 and cfg.eval.episodes == 9
    assert {"ppo.n_steps", "ppo.n_envs", "seed", "eval.episodes"} <= cfg.given and "ppo.lr_actor" not in cfg.given


def test_every_ppo_field_is_settable_from_the_command_line(capsys):
    """Acceptance: every PPOConfig field (seed: the run's --seed) reaches PPOConfig through `--set ppo.<field>`."""
    from robot_rl.rl.ppo import PPOConfig

    for f in dataclasses.fields(PPOConfig):
        d = getattr(PPOConfig, f.name)
        v = (not d) if isinstance(d, bool) else d + 1 if isinstance(d, int) else (d / 2 if d else 0.1)
        key = "seed" if f.name == "seed" else f"ppo.{f.name}"
        got = printed(capsys, "train-residual", "--base", "b", "--out", "o", "--set", f"{key}={v}")
        assert (got["seed"] if f.name == "seed" else got["ppo"][f.name]) == v, f.name
        sets = [f"{key}={v}"]
        assert getattr(resolve("train-residual", sets=sets).ppo_config(), f.name) == v
    # the acceptance command, and the flag shorthands
    got = printed(capsys, "train-residual", "--base", "b", "--out", "o", "--set", "ppo.residual_l2=0.1",
                  "--env-steps", 1000, "--alpha", 0.2)
    assert got["ppo"]["residual_l2"] == 0.1 and got["ppo"]["total_env_steps"] == 1000
    assert got["residual"]["alpha"] == 0.2


def test_nested_and_typed_values():
    cfg = resolve("pipeline", sets=["policy.down_dims=[32,64,128]", "task.tolerance=0.004",
                                    "randomization.physics.object_mass=[0.7,1.3]", "env.controller.pos_scale=0.01",
                                    "ppo.total_env_steps=1e6", "residual.hidden=[64, 64]", "base.lr=1"])
    assert cfg.policy.down_dims == [32, 64, 128] and cfg.base_config().policy["down_dims"] == [32, 64, 128]
    assert cfg.task.kwargs["tolerance"] == 0.004 and cfg.task.name == "place"
    assert cfg.randomization.spec() == {"preset": "none", "physics": {"object_mass": [0.7, 1.3]}}
    assert cfg.env.controller.pos_scale == 0.01 and cfg.env.controller.yaw_scale == 0.15  # siblings kept
    assert cfg.ppo.total_env_steps == 1_000_000 and type(cfg.ppo.total_env_steps) is int  # YAML 1.1 reads 1e6 as str
    assert cfg.residual_config().hidden == (64, 64)
    assert cfg.base.lr == 1.0 and type(cfg.base.lr) is float
    kw = cfg.env_kwargs(backend=True)
    assert "cameras" not in kw and "image_size" not in kw  # unset: taken from the checkpoint / EnvConfig
    assert kw["backend"] == "mujoco" and kw["randomization"]["physics"]["object_mass"] == [0.7, 1.3]
    assert resolve("eval", sets=["randomization.preset=default"]).env_kwargs()["randomization"] == "default"
    assert "randomization" not in resolve("eval").env_kwargs()


@pytest.mark.parametrize("command, sets, field, words", [
    ("train-residual", ["ppo.bogus=1"], "ppo.bogus", ["total_env_steps", "residual_l2", "val_every"]),
    ("train-residual", ["colect.episodes=1"], "colect", ["ppo", "residual"]),
    ("train-residual", ["collect.episodes=1"], "collect", ["does not use"]),
    ("train-residual", ["ppo.n_envs=abc"], "ppo.n_envs", ["not an integer"]),
    ("train-residual", ["ppo.n_envs=1.5"], "ppo.n_envs", ["not an integer"]),
    ("train-residual", ["ppo.anneal_lr=1"], "ppo.anneal_lr", ["true/false"]),
    ("train-residual", ["ppo.n_minibatches=3"], "ppo.n_minibatches", ["divide"]),
    ("train-residual", ["residual.obs_keys=[a]"], "residual.obs_keys", ["trainer"]),
    ("train-residual", ["ppo.seed=1"], "ppo.seed", ["--set seed="]),
    ("train-residual", ["sac.init_temperature=0"], "sac.init_temperature", ["> 0"]),
    ("train-residual", ["sac.explore_std=0.2"], "sac.explore_std", ["init_temperature"]),  # a TD3-only field
    ("train-residual", ["sac.n_target_critics=5", "sac.n_critics=2"], "sac.n_target_critics", ["n_critics"]),
    ("train-residual", ["algo=sac", "residual.head=tanh"], "residual.head", ["tanh_gaussian"]),
    ("train-residual", ["task.tol=1"], "task.tol", ["tolerance"]),
    ("train-residual", ["task.name=stack"], "task", ["place"]),
    ("train-residual", ["env.bogus=1"], "env.bogus", ["control_dt"]),
    ("train-residual", ["env.randomization=default"], "env.randomization", ["randomization.preset"]),
    ("eval", ["randomization.physics.object_mass=[2,1]"], "randomization.physics.object_mass", []),
    ("eval", ["eval.n_envs=0"], "eval.n_envs", []),
    ("eval", ["env.backend=gazebo"], "backend", ["mujoco"]),
    ("train-base", ["policy.kind=bc"], "policy.kind", ["base.kind"]),
    ("train-base", ["policy=3"], "policy", ["mapping"]),
    ("pipeline", ["collect=5"], "collect", ["mapping"]),
    ("pipeline", ["ppo.n_envs=["], "--set", ["YAML"]),
    ("pipeline", ["ppo.n_envs"], "--set", ["section.field=value"]),
    ("pipeline", ["seed=x"], "seed", ["integer"]),
])
def test_bad_input_is_one_config_error_naming_the_field(command, sets, field, words):
    with pytest.raises(ConfigError) as e:
        resolve(command, sets=sets)
    assert e.value.field == field or e.value.field.startswith(field), str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_files_skip_sections_the_command_does_not_use_but_not_unknown_ones(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("collect: {episodes: 3}\neval: {episodes: 5}\n")
    assert resolve("eval", files=[f]).eval.episodes == 5  # collect skipped: a pipeline's config.yaml serves eval
    f.write_text("evall: {episodes: 5}\n")
    with pytest.raises(ConfigError, match="evall"):
        resolve("eval", files=[f])
    f.write_text("- 1\n")
    with pytest.raises(ConfigError, match="config"):
        resolve("eval", files=[f])
    with pytest.raises(ConfigError, match="not found"):
        resolve("eval", files=[tmp_path / "missing.yaml"])


@pytest.mark.parametrize("command, preset", [("pipeline", "full-diffusion"), ("train-residual", None),
                                             ("collect", None), ("transfer", None),
                                             ("pipeline", "full-image-offpolicy"), ("learn", None),
                                             ("train-residual", "sac")])
def test_written_config_round_trips(command, preset, tmp_path):
    from robot_rl.pipeline import PRESETS

    cfg = resolve(command, preset={"algo": "sac"} if preset == "sac" else PRESETS[preset] if preset else None,
                  sets={"pipeline": ["env.controller.damping=0.03"], "learn": ["task.tolerance=0.004"]}.get(
                      command, ["task.tolerance=0.004", "randomization.physics.object_mass=[0.8,1.2]"]))
    path = write_config(cfg, tmp_path / "run", ["robot-rl", command])
    again = resolve(command, files=[path])
    assert again.to_dict() == cfg.to_dict()
    if command == "pipeline":  # the preset layer underneath does not matter: the file is complete
        assert resolve(command, preset=PRESETS["quick"], files=[path]).to_dict() == cfg.to_dict()
        assert again.ppo_config() == cfg.ppo_config() and again.base_config() == cfg.base_config()
    if "residual" in cfg.sections:  # the head the algo trains is written, and reading it back is no override
        assert again.residual_config() == cfg.residual_config()
    if preset == "sac":
        assert again.sac_config() == cfg.sac_config() == again.offpolicy_config()
        assert again.residual_config().head == "tanh_gaussian"


def test_full_presets_resolve_to_the_settings_they_had():
    """The presets moved from hand-merged dicts to the resolver (old `residual:` -> `ppo:`); the effective settings
    are the ones the README's figures were measured with."""
    from robot_rl.envs.tasks import make_task
    from robot_rl.pipeline import PRESETS, collect_args, resolve_config
    from robot_rl.policies.base import PolicyConfig
    from robot_rl.rl.ppo import PPOConfig
    from robot_rl.rl.residual import ResidualConfig
    from robot_rl.stages.evaluation import EvalConfig
    from robot_rl.stages.train_base import DEFAULT_OBS_KEYS, BaseTrainConfig

    keys = DEFAULT_OBS_KEYS["place"]

    def policy(overrides):  # the PolicyConfig train_base builds from BaseTrainConfig.policy
        return PolicyConfig.from_dict({**overrides, "kind": "bc", "obs_keys": ["ee_pos"], "obs_dims": {"ee_pos": 3},
                                       "action_dim": 5})

    old = {
        "full": (dict(kind="bc", steps=4000, batch_size=256, lr=1e-3, obs_keys=list(keys)), {},
                 dict(total_env_steps=600_000, n_envs=8, n_steps=100, align_chunks=False), (0.3, 0.0, 100),
                 {"tolerance": 0.004}, EvalConfig(200, 4, 1_000_000, 3)),
        "full-diffusion": (dict(kind="diffusion", steps=6000, batch_size=256, lr=1e-3,
                                obs_keys=[*keys, "cube_to_target"]),
                           {"down_dims": [32, 64, 128], "num_inference_steps": 5},
                           dict(total_env_steps=1_100_000, n_envs=8, n_steps=100, residual_l2=0.1),
                           (0.05, 0.003, 100), {"tolerance": 0.004}, EvalConfig(200, 4, 1_000_000, 3)),
        "quick": (dict(kind="diffusion", steps=300, batch_size=64), {"down_dims": [32, 64, 128]},
                  dict(total_env_steps=8_000, n_envs=4, n_steps=100), (0.3, 0.0, 20), {},
                  EvalConfig(20, 4, 1_000_000, 1)),
    }
    assert set(old) | {"full-offpolicy", "full-diffusion-offpolicy", "full-image-offpolicy"} == set(PRESETS)
    for name, (base, pol, ppo, (noise, bias, episodes), task_kwargs, ev) in old.items():
        cfg = resolve_config(name)
        b = cfg.base_config()
        assert dataclasses.replace(b, policy={}) == BaseTrainConfig(**base, seed=0), name
        assert policy(b.policy) == policy(pol), name
        assert dataclasses.replace(cfg.ppo_config(), val_every=PPOConfig.val_every) == PPOConfig(**ppo, seed=0), name
        assert cfg.residual_config() == ResidualConfig(), name
        assert make_task("place", **cfg.task.kwargs) == make_task("place", **task_kwargs), name
        assert cfg.eval == ev, name
        c = collect_args(cfg)  # demonstrations on the nominal task, as before
        assert (c["noise"], c["bias"], c["n_episodes"], c["seed"], c["task_kwargs"]) == (noise, bias, episodes, 0, None)
        assert c["randomization"] is None and c["backend"] == "mujoco" and c["only_success"] and "cameras" not in c
        assert cfg.env_kwargs() == resolve("eval").env_kwargs()  # the nominal env everywhere


def test_cli_flags_are_shorthands_for_fields_and_restate_no_default(capsys):
    """Every config flag defaults to "not given" and maps onto a field of one of its command's sections."""
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    n = 0
    for name, p in sub.choices.items():
        flags = p.get_default("_flags")
        for act in p._actions:
            if act.dest in flags:
                n += 1
                assert act.default is None, (name, act.option_strings)
                for f in flags[act.dest].split("|"):  # a flag may set one field in several sections
                    assert f.split(".")[0] in COMMAND_SECTIONS[name], (name, f)
    assert n > 40
    got = printed(capsys, "collect", "--store", "s", "--task", "lift", "--episodes", 3, "--image-size", 32,
                  "--cameras", "front", "--keep-failures", "--randomization", "default", "--seed", 4)
    assert got["task"]["name"] == "lift" and got["collect"]["episodes"] == 3 and got["seed"] == 4
    assert got["env"]["image_size"] == [32, 32] and got["env"]["cameras"] == ["front"]
    assert got["collect"]["only_success"] is False and got["randomization"]["preset"] == "default"
    got = printed(capsys, "collect", "--store", "s")
    assert got["collect"]["only_success"] is True and got["task"]["name"] == "place"


def test_one_value_parser_for_set_and_bringup():
    assert parse_set("policy.down_dims=[32, 64]") == (["policy", "down_dims"], [32, 64])
    assert parse_set("a.b=") == (["a", "b"], "")
    assert parse_value("0.004") == 0.004 and parse_value("{a: 1}") == {"a": 1} and parse_value("null") is None
    with pytest.raises(ConfigError, match="--set"):
        parse_set("a..b=1")
