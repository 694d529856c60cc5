"""Real arm (ros2_control already running) + camera + arm bridge + policy node (policy server):
    ros2 launch launch/robot_bringup.launch.py server:=gpu-box:5555 camera_source:=0 urdf:=/path/robot.urdf
    (or checkpoint:=DIR server:='' to run the policy in-process)

Same nodes as `robot-rl bringup launch/robot_bringup.yaml`."""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def generate_launch_description():
    server = LaunchConfiguration("server")
    camera_source = LaunchConfiguration("camera_source")
    calibration = LaunchConfiguration("calibration_file")
    urdf = LaunchConfiguration("urdf")
    checkpoint = LaunchConfiguration("checkpoint")
    task = LaunchConfiguration("task")
    execution = LaunchConfiguration("execution")
    use_sim_time = LaunchConfiguration("use_sim_time")
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint", default_value="", description="base checkpoint (in-process, no server)"),
        DeclareLaunchArgument("task", default_value="place", description="task whose observation keys are built"),
        DeclareLaunchArgument("execution", default_value="step",
                              description="step (server: one request per step; in-process: receding horizon) | "
                                          "async (background chunks, temporal ensembling)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock (e.g. Gazebo)"),
        DeclareLaunchArgument("server", default_value="127.0.0.1:5555", description="policy server host:port"),
        DeclareLaunchArgument("camera_source", default_value="0", description="device index, URL or file"),
        DeclareLaunchArgument("calibration_file", default_value="", description="camera_calibration YAML"),
        DeclareLaunchArgument("urdf", default_value="", description="robot URDF ('' = Panda of pybullet_data)"),
        Node(executable="robot-rl-camera", name="camera", output="screen",
             parameters=[os.path.join(CONFIG, "camera.yaml"),
                         {"source": camera_source, "calibration_file": calibration,
                          "use_sim_time": use_sim_time}]),
        Node(executable="robot-rl-arm-bridge", name="arm_bridge", output="screen",
             parameters=[os.path.join(CONFIG, "arm_bridge_robot.yaml"), {"urdf": urdf, "use_sim_time": use_sim_time}]),
        Node(executable="robot-rl-policy-node", name="policy_node", output="screen",
             parameters=[os.path.join(CONFIG, "policy_node.yaml"),
                         {"server": server, "checkpoint": checkpoint, "urdf": urdf, "task.name": task,
                          "execution": execution, "use_sim_time": use_sim_time}]),
    ])
