"""Learning in simulation through the learner:  robot-rl learn ... (first), then
ros2 launch launch/learn_bringup.launch.py server:=127.0.0.1:5555

Same nodes as `robot-rl bringup launch/learn_bringup.yaml`: the simulated arm, the arm bridge, the policy node as an
actor of `robot-rl learn` (learn:=true) and the scripted operator that resets, starts and labels episodes. On a real
arm, leave out sim_robot and operator: the robot's driver publishes /joint_states, a person labels the episodes."""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def generate_launch_description():
    backend = LaunchConfiguration("backend")
    server = LaunchConfiguration("server")
    task = LaunchConfiguration("task")
    episode_steps = LaunchConfiguration("episode_steps")
    checkpoint = LaunchConfiguration("checkpoint")
    return LaunchDescription([
        DeclareLaunchArgument("task", default_value="place", description="lift | place (scene, observation keys)"),
        DeclareLaunchArgument("backend", default_value="pybullet", description="mujoco | pybullet"),
        DeclareLaunchArgument("server", default_value="127.0.0.1:5555", description="robot-rl learn host:port"),
        DeclareLaunchArgument("episode_steps", default_value="100", description="time limit (control steps)"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="the learner's base here: keep its last weights (offline episodes)"),
        Node(executable="robot-rl-sim-robot", name="sim_robot", output="screen",
             parameters=[os.path.join(CONFIG, "sim_robot.yaml"), {"backend": backend, "task.name": task}]),
        Node(executable="robot-rl-arm-bridge", name="arm_bridge", output="screen",
             parameters=[os.path.join(CONFIG, "arm_bridge.yaml")]),
        Node(executable="robot-rl-policy-node", name="policy_node", output="screen",
             parameters=[os.path.join(CONFIG, "policy_node_learn.yaml"),
                         {"server": server, "task.name": task, "episode_steps": episode_steps,
                          "checkpoint": checkpoint}]),
        Node(executable="robot-rl-operator", name="operator", output="screen",
             parameters=[os.path.join(CONFIG, "operator.yaml")]),
    ])
