"""robot_rl: demonstrations -> zarr store -> frozen diffusion/BC base -> residual RL -> evaluation."""

import os as _os

# MuJoCo picks its OpenGL platform when it is first imported (robot_rl.robot.kinematics imports it): headless EGL unless
# the user chose one (osmesa, glfw).
_os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"
