"""Model selection for residual training (PPO and TD3 alike): validate every K env steps on validation seeds,
keep the best residual in ``checkpoint_best`` and the scores in ``validation.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from robot_rl.errors import ConfigError
from robot_rl.rl.residual import ResidualPolicy, save_residual


class Validation:
    """Validation schedule, best-checkpoint keeping and ``validation.json``.

    Args:
        validate: ``validate(residual, n_episodes) -> success rate`` or None (then nothing is ever due).
        every: env steps between validations (0: off); n_episodes: episodes per validation.
        out: the run directory; extra: JSON-able metadata saved with the best checkpoint.

    ``rows`` and ``best`` may be restored from a saved ``validation.json`` (:meth:`restore`) when a run resumes.
    """

    def __init__(self, validate: Callable | None, every: int, n_episodes: int, out: Path, extra: dict | None):
        self.fn, self.every, self.n_episodes = validate, every, n_episodes
        self.out, self.extra = Path(out), dict(extra or {})
        self.rows: list[dict] = []
        self.best: dict | None = None

    def due(self, steps: int, last: bool) -> bool:
        """Whether to validate after ``steps`` env steps (every ``every`` steps, and at the ``last`` one)."""
        if self.fn is None or self.every <= 0:
            return False
        done_at = self.rows[-1]["env_steps"] if self.rows else 0
        if done_at == steps:
            return False
        return last or steps // self.every > done_at // self.every

    def run(self, pol: ResidualPolicy, steps: int) -> float:
        """Validate ``pol`` (under ``torch.random.fork_rng``: training's random stream is untouched), record the
        score, save ``checkpoint_best`` when it beats every earlier one (ties keep the earlier). Raises
        ConfigError when ``validate`` returns something other than a rate in [0, 1]."""
        with torch.random.fork_rng(devices=[]):
            score = float(self.fn(pol, self.n_episodes))
        if not 0.0 <= score <= 1.0:
            raise ConfigError("validate", f"returned {score}, not a success rate in [0, 1]",
                              "return the validation episodes' success rate")
        self.rows.append({"env_steps": steps, "val_success": score})
        if self.best is None or score > self.best["val_success"]:
            self.best = dict(self.rows[-1])
            save_residual(pol, self.out / "checkpoint_best", extra={**self.extra, **self.best})
        (self.out / "validation.json").write_text(json.dumps(
            {"episodes": self.n_episodes, "val_every": self.every, "best": self.best, "rows": self.rows}, indent=1))
        return score

    def restore(self) -> None:
        """Take ``rows`` and ``best`` from the run's ``validation.json`` (a resumed run), if there is one."""
        p = self.out / "validation.json"
        if p.is_file():
            doc = json.loads(p.read_text())
            self.rows, self.best = list(doc.get("rows", [])), doc.get("best")
