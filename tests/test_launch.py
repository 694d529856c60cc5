"""launch/: the ROS 2 launch files checked statically (``launch`` has no wheel here), their bringup twins checked
against them, and ``robot-rl bringup`` run for real: nodes up over DDS, Ctrl-C stops every one cleanly."""

import ast
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LAUNCH_FILES = sorted(LAUNCH.glob("*.launch.py"))
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def parse_launch(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    nodes, declared, used = [], set(), set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        fn = getattr(call.func, "id", getattr(call.func, "attr", ""))
        kw = {k.arg: k.value for k in call.keywords}
        if fn == "Node":
            params = [a for a in ast.walk(kw["parameters"]) if isinstance(a, ast.Call)
                      and getattr(a.func, "attr", "") == "join"]
            files = [a.args[-1].value for a in params]
            overrides = [k.value for d in ast.walk(kw["parameters"]) if isinstance(d, ast.Dict) for k in d.keys]
            nodes.append({"executable": kw["executable"].value, "name": kw["name"].value, "params": files,
                          "overrides": overrides})
        elif fn == "DeclareLaunchArgument":
            declared.add(call.args[0].value)
        elif fn == "LaunchConfiguration":
            used.add(call.args[0].value)
    return {"nodes": nodes, "declared": declared, "used": used}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_static(path):
    info = parse_launch(path)
    assert info["nodes"], "no Node actions"
    assert info["declared"] == info["used"], f"declared but unused {info['declared'] - info['used']}, used but " \
                                             f"undeclared {info['used'] - info['declared']}"
    for n in info["nodes"]:
        assert n["executable"] in SCRIPTS, f"{n['executable']} is not a console script in pyproject.toml"
        assert len(n["params"]) == 1, n
        f = LAUNCH / "config" / n["params"][0]
        assert f.is_file(), f
        doc = yaml.safe_load(f.read_text())
        assert list(doc) == [n["name"]] and "ros__parameters" in doc[n["name"]], f"{f}: key must be the node name"
    # the bringup twin (robot-rl bringup) starts exactly the same nodes with the same parameter files
    twin = yaml.safe_load((LAUNCH / path.name.replace(".launch.py", ".yaml")).read_text())
    assert [(n["name"], n["executable"], n["params"]) for n in twin["nodes"]] == \
        [(n["name"], n["executable"], f"config/{n['params'][0]}") for n in info["nodes"]]


NODE_MODULES = {"sim_robot": "robot_rl.hw_drivers.sim_robot", "arm_bridge": "robot_rl.hw_drivers.arm_bridge",
                "camera": "robot_rl.hw_drivers.camera", "teleop": "robot_rl.hw_drivers.teleop",
                "policy_node": "robot_rl.ros.policy_node", "recorder": "robot_rl.ros.recorder",
                "operator": "robot_rl.ros.operator"}


@pytest.mark.parametrize("path", sorted((LAUNCH / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_node_rejects_undeclared_parameters(path, tmp_path):
    """Each node started with its launch/config YAML plus one misspelt parameter exits 2 with a one-line error
    naming only the misspelt one: every parameter in the YAML is declared, and a typo (silently ignored by rclpy)
    is refused with a suggestion."""
    pytest.importorskip("rclpy")
    from ros_helpers import new_domain, ros_env

    (name, body), = yaml.safe_load(path.read_text()).items()
    typo = sorted(body["ros__parameters"])[0] + "x"
    r = subprocess.run([sys.executable, "-m", NODE_MODULES[name], "--ros-args", "-r", f"__node:={name}",
                        "--params-file", str(path), "-p", f"{typo}:=1"], env=ros_env(new_domain()), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert f"has no parameter(s) ['{typo}'] -> did you mean '{typo[:-1]}'?" in errors[0], errors[0]


def test_coerce_parameter_converts_to_the_declared_type():
    """The conversion the nodes apply to every declared parameter (values come from YAML or ``-p``)."""
    from robot_rl.errors import ConfigError
    from robot_rl.ros.common import coerce_parameter

    for value, default, want in [(20, 10.0, 20.0), ([0, 1], [0.5, 0.5], [0.0, 1.0]), (3.0, 0, 3), (True, False, True),
                                 (5, "a", "5"), ((1, 2), [], [1, 2]), ([1.0, 2.0], [0], [1, 2])]:
        got = coerce_parameter("p", value, default)
        assert got == want and [type(v) for v in np.atleast_1d(got).tolist()] == [type(v) for v in
                                                                                   np.atleast_1d(want).tolist()]
        assert type(got) is type(want)
    for value, default in [("abc", 1.0), (1.5, 0), (1, True), (True, 1.0), ([1.5], [0]), (1.0, [1.0]), (None, "a")]:
        with pytest.raises(ConfigError) as e:
            coerce_parameter("p", value, default)
        assert e.value.field == "p"


@pytest.mark.parametrize("arg, error", [
    ("control_rate:=20", None),             # an int where a float is declared (launch args are parsed as YAML)
    ("target_xy:=[0, 1]", None),            # ints in a float list
    ("seed:=3.0", None),                    # an integral float for an int
    ("control_rate:=abc", "control_rate: 'abc' is not float"),
    ("control_rate:=0", "control_rate: 0.0 <= 0"),
    ("seed:=1.5", "seed: 1.5 is not int"),
])
def test_parameter_values_are_converted_or_refused(arg, error, tmp_path):
    """Parameter values of a convertible type are converted to the declared type (no rclpy type exception);
    others, and rates/timeouts <= 0, exit 2 with one line naming the parameter."""
    pytest.importorskip("rclpy")
    from ros_helpers import new_domain, ros_env

    cmd = [sys.executable, "-m", NODE_MODULES["policy_node"], "--ros-args", "-p", arg]
    if error is None:  # still running after start-up: no exception
        p = subprocess.Popen(cmd, env=ros_env(new_domain()), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(6)
        finally:
            p.send_signal(signal.SIGINT)
            err = p.communicate(timeout=20)[1]
        assert "Traceback" not in err and ": error: " not in err, err[-2000:]
        return
    r = subprocess.run(cmd, env=ros_env(new_domain()), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and [ln for ln in r.stderr.splitlines() if ": error: " in ln] == \
        [f"policy_node.py: error: {error} -> " + r.stderr.split(f"{error} -> ", 1)[1].splitlines()[0]], r.stderr


def test_bringup_set_addresses_a_node_parameter_and_nests_dotted_names(tmp_path):
    """`robot-rl bringup --set NODE.PARAM=V` parses V like every --set (robot_rl.config.parse_set) and writes a
    dotted parameter (task.tolerance) nested into the node's parameter file, as ROS 2 reads it."""
    from robot_rl.config import parse_set
    from robot_rl.errors import ConfigError
    from robot_rl.ros.bringup import load_config, node_command

    path, value = parse_set("sim_robot.task.tolerance=0.004")
    nodes = load_config(LAUNCH / "sim_bringup.yaml", [(path[0], ".".join(path[1:]), value),
                                                       ("sim_robot", "cameras", [""])])
    sim = next(n for n in nodes if n["name"] == "sim_robot")
    cmd = node_command(sim, tmp_path)
    assert cmd[-1] == str(tmp_path / "sim_robot.overrides.yaml")
    assert yaml.safe_load(Path(cmd[-1]).read_text()) == \
        {"sim_robot": {"ros__parameters": {"task": {"tolerance": 0.004}, "cameras": [""]}}}
    with pytest.raises(ConfigError, match="nodes"):
        load_config(LAUNCH / "sim_bringup.yaml", [("nobody", "seed", 1)])


@pytest.mark.parametrize("path", sorted((LAUNCH / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_task_parameters_are_the_task_config_fields(path):
    """Nodes take the task as `task.name` + `task.<field>` parameters (the config's task section), no JSON."""
    from robot_rl.config import build_task

    (name, body), = yaml.safe_load(path.read_text()).items()
    params = body["ros__parameters"]
    assert "task_json" not in params
    if "task" in params:
        assert isinstance(params["task"], dict) and "name" in params["task"], path
        build_task(params["task"])  # every key is a field of that task, with a valid value


def test_declare_task_declares_one_parameter_per_task_field():
    rclpy = pytest.importorskip("rclpy")
    from rclpy.node import Node

    from robot_rl.ros.common import declare_task

    ctx = rclpy.Context()
    rclpy.init(args=["probe", "--ros-args", "-p", "task.name:=place", "-p", "task.tolerance:=0.004",
                     "-p", "task.max_steps:=50", "-p", "task.target_x:=[0.45, 0.5]"], context=ctx)
    try:
        node = Node("probe", context=ctx)
        task, kwargs = declare_task(node, "task")
        assert (task.name, task.tolerance, task.max_steps, task.target_x) == ("place", 0.004, 50, (0.45, 0.5))
        assert kwargs["cube_x"] == (0.42, 0.6) and node.has_parameter("task.cube_yaw")
        assert not node.has_parameter("task.lift_height")
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_bringup_starts_nodes_and_stops_cleanly_on_ctrl_c(tmp_path):
    pytest.importorskip("rclpy")
    from ros_helpers import Driver, new_domain, ros_env
    from sensor_msgs.msg import JointState

    from robot_rl.ros.common import COMMAND_QOS

    d = new_domain()
    env = ros_env(d)
    fixture = ROOT / "tests" / "fixtures" / "place_bc_mujoco"
    log = open(tmp_path / "bringup.log", "w+")
    p = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "robot_rl.cli", "bringup",
                          str(LAUNCH / "sim_bringup.yaml"), "--set", f"policy_node.checkpoint={fixture}",
                          "--set", "sim_robot.cameras=['']"], env=env, stdout=log, stderr=subprocess.STDOUT)
    drv = Driver(d)
    try:
        drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
        drv.wait_for(lambda: len(drv.log.get("/arm_bridge/action", [])) >= 5, 90, "policy actions via bringup")
        p.send_signal(signal.SIGINT)  # Ctrl-C
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        drv.close()
    text = (tmp_path / "bringup.log").read_text()
    stopped = re.search(r"\[bringup\] stopped: (\{.*\})", text)
    assert stopped, text[-3000:]
    codes = ast.literal_eval(stopped.group(1))
    assert codes == {"sim_robot": 0, "arm_bridge": 0, "policy_node": 0}, text[-3000:]
    pids = [int(x) for x in re.findall(r"started \w+ \(pid (\d+)\)", text)]
    time.sleep(0.2)
    assert len(pids) == 3 and not any(Path(f"/proc/{pid}").exists() for pid in pids)


_STOP_SCRIPT = """
import os, signal, sys, time
from rclpy.node import Node
from robot_rl.ros.common import run_node

def make():
    node = Node("stop_probe")
    def tick():
        if sys.argv[1] == "after_stop":
            try:  # what pybind11 does when _stop's KeyboardInterrupt fires while it converts call arguments
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)
            except KeyboardInterrupt:
                raise RuntimeError("Unable to convert call argument '0' to Python object") from None
        raise RuntimeError("a genuine bug")
    node.create_timer(0.05, tick)
    return node

sys.exit(run_node(make, ["stop_probe"]))
"""


@pytest.mark.parametrize("mode, code", [("after_stop", 0), ("no_stop", 1)])
def test_run_node_error_while_stopping_is_a_clean_stop_and_a_real_error_is_not(mode, code, tmp_path):
    pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install -e '.[ros]')")
    from ros_helpers import ros_env

    script = tmp_path / "probe.py"
    script.write_text(_STOP_SCRIPT)
    r = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60,
                       env=ros_env(97))
    assert r.returncode == code, r.stderr[-2000:]
    if mode == "after_stop":
        assert "stopped (RuntimeError while stopping" in r.stderr
    else:
        assert "a genuine bug" in r.stderr
