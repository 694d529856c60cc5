"""Teleop demonstration collection against the simulated arm (set use_real_robot:=true-like setups by swapping
sim_robot for your ros2_control bringup):
    ros2 launch launch/collect.launch.py store:=runs/demos.zarr
then call /recorder/start, drive with a Twist/Joy source on /teleop/twist or /joy, call /recorder/stop.
Same nodes as `robot-rl bringup launch/collect.yaml`."""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def generate_launch_description():
    backend = LaunchConfiguration("backend")
    store = LaunchConfiguration("store")
    keyboard = LaunchConfiguration("keyboard")
    task = LaunchConfiguration("task")
    use_sim_time = LaunchConfiguration("use_sim_time")
    return LaunchDescription([
        DeclareLaunchArgument("task", default_value="place", description="lift | place (scene, stored keys)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
        DeclareLaunchArgument("backend", default_value="pybullet", description="mujoco | pybullet"),
        DeclareLaunchArgument("store", default_value="runs/ros_demos.zarr", description="zarr store"),
        DeclareLaunchArgument("keyboard", default_value="false", description="read keys from the terminal"),
        Node(executable="robot-rl-sim-robot", name="sim_robot", output="screen",
             parameters=[os.path.join(CONFIG, "sim_robot.yaml"), {"backend": backend, "task.name": task, "publish_clock": use_sim_time}]),
        Node(executable="robot-rl-arm-bridge", name="arm_bridge", output="screen",
             parameters=[os.path.join(CONFIG, "arm_bridge.yaml"), {"use_sim_time": use_sim_time}]),
        Node(executable="robot-rl-teleop", name="teleop", output="screen", emulate_tty=True,
             parameters=[os.path.join(CONFIG, "teleop.yaml"), {"keyboard": keyboard, "use_sim_time": use_sim_time}]),
        Node(executable="robot-rl-recorder", name="recorder", output="screen",
             parameters=[os.path.join(CONFIG, "recorder.yaml"), {"store": store, "task.name": task, "use_sim_time": use_sim_time}]),
    ])
