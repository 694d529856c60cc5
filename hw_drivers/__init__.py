"""ROS 2 nodes that touch hardware or stand in for it (installed as ``robot_rl.hw_drivers``):

- :mod:`~robot_rl.hw_drivers.sim_robot` — a MuJoCo / PyBullet arm exposed like a ros2_control arm.
- :mod:`~robot_rl.hw_drivers.arm_bridge` — end-effector delta actions -> joint targets (DiffIKController + safety).
- :mod:`~robot_rl.hw_drivers.camera` — OpenCV camera / stream / video file -> Image, CompressedImage, CameraInfo.
- :mod:`~robot_rl.hw_drivers.teleop` — keyboard / Twist / Joy -> actions, with a policy takeover mux.
"""
