"""Datasets (``datasets/``, installed as ``robot_rl.datasets`` so that no top-level ``datasets`` package shadows
Hugging Face's): the zarr v3 store (:mod:`robot_rl.datasets.store`), the training-window sampler
(:mod:`robot_rl.datasets.sampler`) and the episode writer (:mod:`robot_rl.datasets.episodes`)."""
