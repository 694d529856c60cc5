"""``robot-rl bringup CONFIG.yaml``: start the nodes of a launch file as supervised subprocesses, without the ROS
``launch`` package (it has no PyPI wheel). The configs in ``launch/*.yaml`` list the same executables and parameter
files as the matching ``launch/*.launch.py`` (a test checks they agree).

Config::

    nodes:
      - name: sim_robot                  # node name (remapped with -r __node:=NAME)
        executable: robot-rl-sim-robot   # console script on PATH (or python -m module)
        params: config/sim_robot.yaml    # ROS parameter file, relative to the config file
        parameters: {backend: mujoco}    # optional overrides (also robot-rl bringup --set NAME.PARAM=VALUE)
        respawn: false                   # restart it when it exits (default false)

``robot-rl bringup --set NAME.PARAM=VALUE`` addresses a node of the config (``NAME``) and one of its ROS parameters
(``PARAM``, which may itself be dotted: ``sim_robot.task.tolerance=0.004``), not a config section; the value is
parsed as YAML by the same function as every command's ``--set`` (:func:`robot_rl.config.parse_value`). Dotted
parameter names are written nested into the node's parameter file (``task: {tolerance: 0.004}``), as ROS 2 reads
them.

Supervision: every node's output is prefixed with its name; a node that exits is reported (and restarted with
``respawn``, at most once per second); when a node without ``respawn`` exits non-zero everything is stopped.
Ctrl-C (SIGINT) or SIGTERM stops every node: SIGINT in reverse start order (each node holds the arm and shuts down
cleanly), then SIGTERM, then SIGKILL after ``--grace`` seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from robot_rl.errors import ConfigError



def _resolve_executable(exe: str) -> str | None:
    """Path of a node's console script: first beside the running interpreter (the venv's ``bin/``, which need not
    be on PATH, e.g. when ``.venv/bin/python`` is called directly), then on PATH; None when absent."""
    local = Path(sys.executable).parent / exe
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(exe)

def load_config(path: str | os.PathLike, overrides: list[tuple[str, str, object]] | None = None) -> list[dict]:
    """Parse a bringup config, with ``overrides`` [(node name, parameter name, parsed value)] applied (the CLI parses
    ``--set NAME.PARAM=VALUE``). Raises ConfigError for a malformed config or an override of an unknown node."""
    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError("config", f"cannot read {p} ({e.strerror})", "pass a bringup YAML, e.g. "
                          "launch/sim_bringup.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{p} is not valid YAML ({str(e).splitlines()[0]})",
                          "fix the YAML syntax (see launch/sim_bringup.yaml)") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("nodes"), list) or not cfg["nodes"]:
        raise ConfigError("nodes", f"{p} has no 'nodes' list", "see robot_rl/ros/bringup.py for the format")
    nodes, names = [], set()
    for i, n in enumerate(cfg["nodes"]):
        if not isinstance(n, dict) or not n.get("name") or not n.get("executable"):
            raise ConfigError(f"nodes[{i}]", "needs 'name' and 'executable'", "e.g. {name: sim_robot, executable: "
                              "robot-rl-sim-robot}")
        if n["name"] in names:
            raise ConfigError(f"nodes[{i}].name", f"duplicate name {n['name']!r}", "give every node its own name")
        names.add(n["name"])
        unknown = set(n) - {"name", "executable", "params", "parameters", "respawn"}
        if unknown:
            raise ConfigError(f"nodes[{i}]", f"unknown keys {sorted(unknown)}",
                              "use name, executable, params, parameters, respawn")
        params = None
        if n.get("params"):
            params = (p.parent / n["params"]).resolve()
            if not params.is_file():
                raise ConfigError(f"nodes[{i}].params", f"{params} does not exist", "fix the path (relative to "
                                  "the config file)")
        exe = n["executable"]
        if not exe.startswith("python"):
            found = _resolve_executable(exe)
            if found is None:
                raise ConfigError(f"nodes[{i}].executable", f"{exe!r} is neither beside {sys.executable} nor on "
                                  "PATH", "pip install -e '.[ros]' (installs the robot-rl-* node scripts)")
            exe = found
        nodes.append({"name": n["name"], "executable": exe, "params": params,
                      "parameters": dict(n.get("parameters") or {}), "respawn": bool(n.get("respawn", False))})
    by_name = {n["name"]: n for n in nodes}
    for name, param, value in overrides or []:
        if name not in by_name or not param:
            raise ConfigError("--set", f"{name}.{param}: not NODE.PARAM for a node of the config",
                              f"nodes: {sorted(by_name)}")
        by_name[name]["parameters"][param] = value
    return nodes


def nested(params: dict) -> dict:
    """``{"task.tolerance": 0.004, "seed": 1}`` -> ``{"task": {"tolerance": 0.004}, "seed": 1}``: dotted ROS
    parameter names as the nested mappings of a ROS 2 parameter file."""
    out: dict = {}
    for k, v in params.items():
        *head, last = str(k).split(".")
        d = out
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def node_command(node: dict, tmp: Path) -> list[str]:
    exe = node["executable"]
    cmd = [sys.executable, *exe.split()[1:]] if exe.startswith("python") else [exe]
    cmd += ["--ros-args", "-r", f"__node:={node['name']}"]
    if node["params"]:
        cmd += ["--params-file", str(node["params"])]
    if node["parameters"]:
        f = tmp / f"{node['name']}.overrides.yaml"
        f.write_text(yaml.safe_dump({node["name"]: {"ros__parameters": nested(node["parameters"])}}))
        cmd += ["--params-file", str(f)]
    return cmd


class Supervisor:
    def __init__(self, nodes: list[dict], grace: float = 5.0, out=sys.stdout):
        self.nodes, self.grace, self.out = nodes, grace, out
        self.tmp = Path(tempfile.mkdtemp(prefix="robot_rl_bringup_"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.lock = threading.Lock()

    def _pump(self, name, proc):
        for line in proc.stdout:
            with self.lock:
                self.out.write(f"[{name}] {line}")
                self.out.flush()

    def _start(self, node):
        proc = subprocess.Popen(node_command(node, self.tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)  # our signals reach it only via us
        self.procs[node["name"]] = proc
        threading.Thread(target=self._pump, args=(node["name"], proc), daemon=True).start()
        self._say(f"started {node['name']} (pid {proc.pid})")

    def _say(self, msg):
        with self.lock:
            self.out.write(f"[bringup] {msg}\n")
            self.out.flush()

    def run(self) -> int:
        def on_signal(signum, frame):
            self.stopping = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        rc = 0
        try:
            for n in self.nodes:
                self._start(n)
            restarts: dict[str, float] = {}
            while not self.stopping:
                time.sleep(0.1)
                for n in self.nodes:
                    p = self.procs[n["name"]]
                    if p.poll() is None:
                        continue
                    self._say(f"{n['name']} exited with code {p.returncode}")
                    if n["respawn"] and time.monotonic() - restarts.get(n["name"], 0) > 1.0:
                        restarts[n["name"]] = time.monotonic()
                        self._start(n)
                    elif p.returncode != 0:
                        rc = 1
                        self.stopping = True
                        break
                    else:
                        self.procs[n["name"]] = _Done(p.returncode)
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(self.tmp, ignore_errors=True)
        return rc

    def stop(self):
        for n in reversed(self.nodes):
            p = self.procs.get(n["name"])
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
        end = time.monotonic() + self.grace
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for n in reversed(self.nodes):
                p = self.procs.get(n["name"])
                if p is None:
                    continue
                try:
                    p.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._say(f"{n['name']} did not stop in time: {signal.Signals(sig).name}")
                    p.send_signal(sig)
            end = time.monotonic() + 2.0
        codes = {n["name"]: self.procs[n["name"]].poll() for n in self.nodes if n["name"] in self.procs}
        self._say(f"stopped: {codes}")


class _Done:
    def __init__(self, rc):
        self.returncode = rc

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        pass

    def wait(self, timeout=None):
        return self.returncode


def bringup(config: str, overrides: list[tuple[str, str, object]] | None = None, grace: float = 5.0,
            dry_run: bool = False) -> int:
    """Start (or with ``dry_run`` print) the nodes of ``config`` with ``overrides`` (see :func:`load_config`);
    returns the exit code (0 after a clean Ctrl-C stop, 1 when a node failed)."""
    nodes = load_config(config, overrides)
    if dry_run:  # the commands only (their override files are not kept)
        with tempfile.TemporaryDirectory(prefix="robot_rl_bringup_") as tmp:
            for n in nodes:
                print(" ".join(node_command(n, Path(tmp))))
        return 0
    return Supervisor(nodes, grace).run()
