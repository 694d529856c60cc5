"""A camera student on the simulated arm:  ros2 launch launch/sim_student.launch.py checkpoint:=DIR

The student of ``robot-rl distill`` (images + proprioception, no object poses) drives sim_robot through the arm
bridge. sim_robot publishes the student's cameras (``config/sim_robot_student.yaml``: front + wrist, 64x64); the
policy node subscribes to ``/joint_states`` and the camera topics only, because its observation keys hold no pose.
Same nodes as ``robot-rl bringup launch/sim_student.yaml --set policy_node.checkpoint=DIR``."""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def generate_launch_description():
    backend = LaunchConfiguration("backend")
    checkpoint = LaunchConfiguration("checkpoint")
    return LaunchDescription([
        DeclareLaunchArgument("backend", default_value="pybullet", description="mujoco | pybullet"),
        DeclareLaunchArgument("checkpoint", default_value="", description="the student's checkpoint"),
        Node(executable="robot-rl-sim-robot", name="sim_robot", output="screen",
             parameters=[os.path.join(CONFIG, "sim_robot_student.yaml"), {"backend": backend}]),
        Node(executable="robot-rl-arm-bridge", name="arm_bridge", output="screen",
             parameters=[os.path.join(CONFIG, "arm_bridge.yaml")]),
        Node(executable="robot-rl-policy-node", name="policy_node", output="screen",
             parameters=[os.path.join(CONFIG, "policy_node.yaml"), {"checkpoint": checkpoint}]),
    ])
