"""Checkpoints as a directory holding ``model.safetensors`` (weights, normalizer buffers included) and ``config.json``.

Pickle is never read: ``torch.load`` / ``pickle.load`` of an untrusted file executes arbitrary code. Files named
``*.pt/.pth/.ckpt/.pkl/.pickle`` and files whose bytes look like a pickle stream (0x80 protocol marker) or a
``torch.save`` zip archive are refused before anything is parsed.

``config.json``::

    {"format": "robot_rl.policy", "format_version": 1, "robot_rl_version": "0.1.0",
     "config": {...PolicyConfig fields...}, "extra": {...caller metadata, e.g. training info...}}
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import robot_rl
from robot_rl.errors import ConfigError
from robot_rl.policies import make_policy
from robot_rl.policies.base import BasePolicy, PolicyConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT_VERSION = 1
POLICY_FORMAT = "robot_rl.policy"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")
_CONVERT = ("convert it once in a trusted environment: safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'model.safetensors'), then write config.json with robot_rl.policies.checkpoint")


def _refuse_pickle(path: Path) -> None:
    """Raise ConfigError if ``path`` is (named or shaped like) a pickle / torch.save file. Reads 9 bytes only."""
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file starts with an 8-byte little-endian header length followed by '{' (a JSON header)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1
    if path.suffix.lower() in PICKLE_SUFFIXES or (
            not looks_safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04")):
        raise ConfigError("checkpoint", f"pickle checkpoints are refused (executing untrusted code): {path}",
                          _CONVERT)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_module_safetensors(module: nn.Module, path_dir: str | os.PathLike, config: dict, *,
                            format_name: str = "robot_rl.module", extra: dict | None = None,
                            state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``<path_dir>/model.safetensors`` (``state_dict`` or ``module.state_dict()``) and ``config.json``.

    Each file is replaced atomically (written to a temp file, then renamed), weights first.
    Args:
        config: JSON-serializable dict needed to rebuild the module (stored under "config").
        format_name: stored as "format" and checked by :func:`load_module_safetensors`.
        extra: JSON-serializable metadata (stored under "extra").
    Returns the directory. Raises ConfigError if ``config``/``extra`` are not JSON-serializable or the path is a file.
    """
    d = Path(path_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError("path_dir", f"{d} is a file", "pass a directory for the checkpoint")
    meta = {"format": format_name, "format_version": FORMAT_VERSION, "robot_rl_version": robot_rl.__version__,
            "config": config, "extra": extra or {}}
    try:
        text = json.dumps(meta, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError("extra", f"checkpoint metadata is not JSON-serializable ({e})",
                          "pass only str/int/float/bool/list/dict values (convert numpy scalars with .item())")
    sd = module.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(d / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": format_name}))
    _write_atomic(d / CONFIG, lambda p: p.write_text(text))
    return d


def read_checkpoint(path: str | os.PathLike, format_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read (tensors on CPU, metadata dict) from a checkpoint directory (or its ``model.safetensors`` /
    ``config.json``). Raises ConfigError for pickle files, a missing directory/file, corrupt safetensors, bad JSON,
    an unexpected format name, or a newer format version."""
    p = Path(path)
    if p.is_file():
        _refuse_pickle(p)
        if p.name not in (WEIGHTS, CONFIG):
            raise ConfigError("checkpoint", f"{p} is not a {WEIGHTS} or {CONFIG} file",
                              "pass the checkpoint directory written by save_policy / save_module_safetensors")
        p = p.parent
    elif not p.is_dir():
        raise ConfigError("checkpoint", f"{p} does not exist", "pass the checkpoint directory")
    for name in (WEIGHTS, CONFIG):
        if not (p / name).is_file():
            for f in sorted(p.iterdir()) if name == WEIGHTS else ():
                if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES:
                    _refuse_pickle(f)
            raise ConfigError(name, f"missing from checkpoint directory {p}",
                              "save the checkpoint with save_policy / save_module_safetensors (both files)")
    _refuse_pickle(p / WEIGHTS)
    try:
        meta = json.loads((p / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(CONFIG, f"unreadable JSON ({e})", "restore config.json from the saved checkpoint")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ConfigError(CONFIG, "has no 'config' object", "restore config.json from the saved checkpoint")
    if format_name is not None and meta.get("format") != format_name:
        raise ConfigError(CONFIG, f"format is {meta.get('format')!r}, expected {format_name!r}",
                          "load it with the loader for that format")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ConfigError(CONFIG, f"format_version {meta.get('format_version')!r} is not supported "
                                  f"(this robot_rl reads <= {FORMAT_VERSION})", "upgrade robot_rl")
    try:
        tensors = load_file(str(p / WEIGHTS))
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on corrupt input
        raise ConfigError(WEIGHTS, f"corrupt or truncated safetensors file ({type(e).__name__}: {e})",
                          "re-save or re-download the checkpoint")
    return tensors, meta


def load_state_strict(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` into ``module`` strictly; ConfigError naming missing, unexpected or mis-shaped tensors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or shapes:
        raise ConfigError(WEIGHTS, f"tensors do not match config.json: missing {missing[:5]}, unexpected "
                                   f"{unexpected[:5]}, wrong shape {shapes[:5]}",
                          "keep model.safetensors and config.json from the same save")
    module.load_state_dict(tensors, strict=True)


def load_module_safetensors(path: str | os.PathLike, build: Callable[[dict], nn.Module], *,
                            format_name: str | None = None, device: str | torch.device = "cpu"
                            ) -> tuple[nn.Module, dict]:
    """Rebuild a module with ``build(meta["config"])``, load the weights strictly, move it to ``device``.

    Returns (module, metadata dict). Raises ConfigError as :func:`read_checkpoint`, and when tensor names or shapes
    do not match the rebuilt module.
    """
    tensors, meta = read_checkpoint(path, format_name)
    module = build(meta["config"])
    load_state_strict(module, tensors)
    try:
        return module.to(device), meta
    except (RuntimeError, AssertionError, ValueError) as e:  # unknown device string, CUDA not available, ...
        raise ConfigError("device", f"cannot use device {str(device)!r} ({str(e).splitlines()[0]})",
                          "use cpu, or cuda / cuda:N on a machine with a CUDA build of torch and a GPU") from None


def save_policy(policy: BasePolicy, path_dir: str | os.PathLike, extra: dict | None = None, *,
                ema=None) -> Path:
    """Save a policy checkpoint. With ``ema`` (a diffusers ``EMAModel`` from ``make_ema(policy)``) the averaged
    weights are saved as the inference weights; the policy itself is left untouched. Returns the directory."""
    sd = policy.state_dict()
    if ema is not None:
        named = list(policy.named_parameters())
        if [p.shape for _, p in named] != [s.shape for s in ema.shadow_params]:
            raise ConfigError("ema", "its tensors do not match this policy's parameters",
                              "create it with make_ema(policy) for this policy")
        sd.update((n, s) for (n, _), s in zip(named, ema.shadow_params))
    return save_module_safetensors(policy, path_dir, policy.config.to_dict(), format_name=POLICY_FORMAT,
                                   extra=extra, state_dict=sd)


def load_policy(path_dir_or_file: str | os.PathLike, device: str | torch.device = "cpu") -> BasePolicy:
    """Load a frozen policy (eval mode, requires_grad False) from a :func:`save_policy` directory (or a file in it).

    Raises ConfigError for pickle files, missing files, corrupt weights/JSON, an impossible config, or weights that
    do not match the config.
    """
    policy, _ = load_module_safetensors(path_dir_or_file, lambda cfg: make_policy(PolicyConfig.from_dict(cfg)),
                                        format_name=POLICY_FORMAT, device=device)
    return policy.freeze()
