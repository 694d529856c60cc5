"""Helpers for ROS 2 tests: every node runs as its own process (``python -m ...``) and talks over real DDS
(Fast DDS, localhost discovery) on a random ROS domain, so parallel test sessions do not see each other."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install -e '.[ros]')")

from rclpy.node import Node  # noqa: E402


def ros_env(domain: int) -> dict:
    env = os.environ.copy()
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", MUJOCO_GL="egl",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ROS_LOCALHOST_ONLY", None)
    return env


class NodeProcess:
    """One node in its own process with a parameter file; ``stop()`` sends SIGINT and waits."""

    def __init__(self, module: str, params: dict, tmp: Path, env: dict, name: str | None = None, nice: int = 0,
                 cpus: str | None = None):
        self.name = name or module.rsplit(".", 1)[-1]
        pfile = tmp / f"{self.name}.params.yaml"
        pfile.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
        self.log = tmp / f"{self.name}.log"
        args = [sys.executable, "-m", module, "--ros-args", "--params-file", str(pfile)]
        if name:
            args += ["-r", f"__node:={name}"]
        pin = ["taskset", "-c", cpus] if cpus else []  # cpus: a CPU list ("0", "0-1") to run on
        self.proc = subprocess.Popen([*pin, "nice", "-n", str(nice), *args], env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class Driver:
    """The test's own rclpy node: subscriptions that keep the latest message + service/lifecycle calls."""

    def __init__(self, domain: int):
        self.domain = domain
        os.environ["ROS_DOMAIN_ID"] = str(domain)
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.ctx = rclpy.context.Context()
        rclpy.init(context=self.ctx, domain_id=domain)
        self.node = Node("test_driver", context=self.ctx)
        from rclpy.executors import SingleThreadedExecutor

        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self.last: dict = {}
        self.log: dict = {}

    def subscribe(self, msg_type, topic: str, qos=10, keep: bool = False):
        def cb(m):
            t = time.monotonic()
            self.last[topic] = (t, m)
            if keep:
                self.log.setdefault(topic, []).append((t, m))

        self.node.create_subscription(msg_type, topic, cb, qos)

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.ex.spin_once(timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    def wait_for(self, pred, timeout: float, what: str = "condition"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            self.ex.spin_once(timeout_sec=0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def call(self, srv_type, name: str, request=None, timeout: float = 20.0):
        cli = self.node.create_client(srv_type, name)
        self.wait_for(lambda: cli.service_is_ready(), timeout, f"service {name}")
        fut = cli.call_async(request or srv_type.Request())
        self.wait_for(fut.done, timeout, f"reply of {name}")
        self.node.destroy_client(cli)
        return fut.result()

    def lifecycle(self, node: str, transition: str, timeout: float = 30.0) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP}
        req = ChangeState.Request()
        req.transition.id = ids[transition]
        return bool(self.call(ChangeState, f"/{node}/change_state", req, timeout).success)

    def set_params(self, node: str, **values) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request()
        req.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        res = self.call(SetParameters, f"/{node}/set_parameters", req)
        assert all(r.successful for r in res.results), res

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def new_domain() -> int:
    return random.Random(os.getpid() ^ time.time_ns()).randrange(20, 100)


@pytest.fixture()
def ros(tmp_path):
    """(Driver, start(module, params, name=None, nice=0) -> NodeProcess, tmp_path) on a fresh ROS domain; every started
    node is stopped (in reverse order) and the driver closed at teardown, and the tail of each node's log is printed
    (pytest shows it for a failed test). Import it into a test module to use it.

    Nodes run at the default priority (nice 0), as on a robot's computer: at nice 19 beside the suite's other workers
    they starved for seconds at a time (CI: a teleop episode recorded 11 of ~34 steps; under two busy loops they
    could not even finish importing in 30 s), which tests the scheduler, not the nodes."""
    d = new_domain()
    procs = []
    drv = Driver(d)

    def start(module, params, name=None, nice=0):
        p = NodeProcess(module, params, tmp_path, ros_env(d), name, nice=nice)
        procs.append(p)
        return p

    yield drv, start, tmp_path
    for p in reversed(procs):
        p.stop()
    drv.close()
    for p in procs:
        print(f"--- {p.name} (rc {p.proc.returncode}), last lines of {p.log.name}:", *p.text().splitlines()[-15:],
              sep="\n")


def make_video(path: Path, n=30, width=96, height=96):
    """A small MJPG video of a moving red disc (a camera source for the camera node)."""
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    for i in range(n):
        img = np.full((height, width, 3), 40, np.uint8)
        cv2.circle(img, (10 + 2 * i, height // 2), 8, (0, 0, 255), -1)
        w.write(img)
    w.release()
    assert path.stat().st_size > 0
