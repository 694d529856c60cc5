"""Simulator backends (installed as ``robot_rl.sim``): the :class:`~robot_rl.sim.backend.Backend` seam and
:func:`~robot_rl.sim.backend.make_backend` in :mod:`robot_rl.sim.backend`, the MuJoCo backend in
:mod:`robot_rl.sim.mujoco_backend`, the PyBullet twin in :mod:`robot_rl.sim.pybullet_backend`."""
