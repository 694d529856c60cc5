"""The robot model, independent of any simulator: scene description (:mod:`~robot_rl.robot.scene`), URDF kinematics
(:mod:`~robot_rl.robot.kinematics`), differential-IK controller (:mod:`~robot_rl.robot.controller`) and safety
limits (:mod:`~robot_rl.robot.safety`)."""
