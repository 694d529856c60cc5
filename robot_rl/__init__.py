"""robot_rl: demonstrations -> zarr store -> frozen diffusion/BC base -> residual RL -> evaluation."""

__version__ = "0.1.0"
