"""Simulated arm + arm bridge + policy node:  ros2 launch launch/sim_bringup.launch.py checkpoint:=DIR

Same nodes as `robot-rl bringup launch/sim_bringup.yaml` (for machines without `launch`). The executables are the
console scripts of `pip install -e .[ros]` (no ament package needed: launch_ros runs `executable` from PATH when no
`package` is given)."""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def generate_launch_description():
    backend = LaunchConfiguration("backend")
    checkpoint = LaunchConfiguration("checkpoint")
    server = LaunchConfiguration("server")
    use_sim_time = LaunchConfiguration("use_sim_time")
    task = LaunchConfiguration("task")
    execution = LaunchConfiguration("execution")
    return LaunchDescription([
        DeclareLaunchArgument("task", default_value="place", description="lift | place (scene, observation keys)"),
        DeclareLaunchArgument("backend", default_value="pybullet", description="mujoco | pybullet"),
        DeclareLaunchArgument("checkpoint", default_value="", description="base checkpoint (in-process policy)"),
        DeclareLaunchArgument("server", default_value="", description="policy server host:port (instead)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
        DeclareLaunchArgument("execution", default_value="step",
                              description="step | async (chunks requested in the background, temporally ensembled)"),
        Node(executable="robot-rl-sim-robot", name="sim_robot", output="screen",
             parameters=[os.path.join(CONFIG, "sim_robot.yaml"),
                         {"backend": backend, "task.name": task, "publish_clock": use_sim_time}]),
        Node(executable="robot-rl-arm-bridge", name="arm_bridge", output="screen",
             parameters=[os.path.join(CONFIG, "arm_bridge.yaml"), {"use_sim_time": use_sim_time}]),
        Node(executable="robot-rl-policy-node", name="policy_node", output="screen",
             parameters=[os.path.join(CONFIG, "policy_node.yaml"),
                         {"checkpoint": checkpoint, "server": server, "task.name": task, "execution": execution,
                          "use_sim_time": use_sim_time}]),
    ])
