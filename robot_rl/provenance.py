"""What determines a run's floating-point arithmetic, recorded with every report so a figure can be traced.

Residual PPO turns a difference in the last bits into a different training run within about ten updates, so a
figure reproduces bit for bit only with the same code, seed, library builds and CPU kernels (docs/ARCHITECTURE.md,
"Determinism"). :func:`provenance` collects those: git commit (and whether the tree had uncommitted changes),
Python/torch/numpy/mujoco/gymnasium versions, torch's CPU capability and BLAS, the CPU model and AVX-512
support, the OpenBLAS kernel numpy picked, and the environment variables that steer them. Every lookup is best
effort: a missing piece is reported as None, never raised.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS",
            "ATEN_CPU_CAPABILITY", "MUJOCO_GL", "PYTHONHASHSEED")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu() -> dict:
    info = {"machine": platform.machine(), "model": None, "family": None, "model_number": None, "avx512f": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] is None:
            info["model"] = val.strip()
        elif key == "cpu family" and info["family"] is None:
            info["family"] = val.strip()
        elif key == "model" and info["model_number"] is None:
            info["model_number"] = val.strip()
        elif key == "flags" and info["avx512f"] is None:
            info["avx512f"] = "avx512f" in val.split()
    return info


def _openblas_core() -> str | None:
    """The OpenBLAS kernel numpy's bundled OpenBLAS chose at run time (e.g. SkylakeX, Haswell)."""
    import numpy  # noqa: F401  (loads numpy's OpenBLAS)

    try:
        libs = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "openblas" in line and ".so" in line.split()[-1]}
    except OSError:
        return None
    for so in sorted(libs):
        try:
            lib = ctypes.CDLL(so)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
            f = getattr(lib, name, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return None


def provenance() -> dict:
    """A JSON-able dict: ``git`` {commit, dirty}, ``versions`` {python, torch, numpy, mujoco, gymnasium},
    ``torch_cpu`` {capability, blas}, ``cpu`` {machine, model, family, model_number, avx512f}, ``openblas_core``, ``env`` (the variables
    in :data:`ENV_VARS` that are set)."""
    import gymnasium
    import mujoco
    import numpy
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    build = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in build.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                None)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                     "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__},
        "torch_cpu": {"capability": capability, "blas": blas},
        "cpu": _cpu(),
        "openblas_core": _openblas_core(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
