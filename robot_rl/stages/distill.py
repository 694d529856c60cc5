"""Distillation of a state teacher into a camera student (ResiP: Ankile et al. 2024, "From Imitation to Refinement —
Residual RL for Precise Assembly", sec. IV-D: the state-based base + residual teacher is distilled into an RGB policy
trained on the teacher's rollouts under visual domain randomization), optionally with DAgger rounds (Ross et al.
2011, "A Reduction of Imitation Learning and Structured Prediction to No-Regret Online Learning").

``robot-rl distill --teacher-base B [--teacher-residual R] --task place --cameras front wrist --out DIR``:

1. **Teacher rollouts.** The teacher (base + optional residual, reading privileged state) runs ``distill.episodes``
   episodes in each simulator of ``distill.rollout_backends`` (each on its own seeds from :data:`DISTILL_SEED_START`)
   under the ``randomization`` section (default: the ``visual`` preset: colours, light, camera pose jitter), with
   the cameras rendered. Rendering the same scenes with two renderers is itself a visual randomization: a student
   that saw only MuJoCo's images fails in PyBullet (README, distillation). Every episode goes into
   ``DIR/rollouts.zarr``: source ``policy``, every observation incl. the images, the teacher's actions, the
   randomization sample, ``extra["dagger_round"] = 0``.
2. **Student.** ``train_base`` on that store with the ``base`` / ``policy`` sections: a BC or Diffusion Policy over
   the camera images plus proprioception. Object poses and the goal (the task's own observation keys:
   ``cube_pos``, ``target_pos``, ``cube_to_target``, ...) are refused as student inputs.
3. **DAgger** (``distill.dagger_rounds``): the student drives ``distill.dagger_episodes`` new episodes (in each
   rollout backend), the teacher
   labels every visited step (:func:`~robot_rl.stages.evaluation.evaluate`'s ``label_policy``), the episodes join
   the store (``dagger_round`` r) and the student trains ``distill.dagger_steps`` more steps on all of it, from the
   previous round's weights and normalization statistics.
4. **Evaluation from pixels** on held-out seeds (``eval`` section, from
   :data:`~robot_rl.envs.vector.EVAL_SEED_START`, disjoint from the rollouts'), in every backend of
   ``distill.eval_backends``, each nominal and randomized; the teacher on the same seeds in the same conditions.
5. ``DIR/report.md`` / ``report.json`` (teacher vs student per condition with Wilson intervals and the student /
   teacher ratio, stage wall times), ``success.png``, student videos, TensorBoard under ``DIR/tb``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from robot_rl.datasets.store import ZarrStore
from robot_rl.envs.env import ROBOT_OBS_DIMS
from robot_rl.envs.tasks import make_task
from robot_rl.envs.vector import all_cores
from robot_rl.errors import ConfigError
from robot_rl.stages.evaluation import CombinedPolicy, EvalConfig, evaluate, record_videos
from robot_rl.stages.train_base import BaseTrainConfig, train_base

DISTILL_SEED_START = 2_000_000  # teacher rollouts, then each DAgger round's episodes; disjoint from the other ranges


@dataclass
class DistillConfig:
    """The ``distill`` config section (``robot-rl distill``).

    episodes: teacher rollouts recorded per rollout backend (seeds ``DISTILL_SEED_START, +1, ...``, each backend on
    the seeds after the previous one's); rollout_backends: the simulators the teacher (and DAgger's student) rolls
    out in; dagger_rounds: rounds of student rollouts relabelled by the teacher (0: plain behaviour cloning of the
    teacher); dagger_episodes: student episodes per round and rollout backend (the seeds after the previous ones);
    dagger_steps: training steps after each round, on all the data so far, starting from the previous round's
    weights and normalization (``base.init_from``, ``base.init_normalizer``; round 0 trains ``base.steps`` from
    scratch); eval_backends: simulators the student and the teacher are evaluated in (each nominal and with the
    ``randomization`` section).
    """

    episodes: int = 200
    dagger_rounds: int = 0
    dagger_episodes: int = 100
    dagger_steps: int = 1000
    eval_backends: list = field(default_factory=lambda: ["mujoco", "pybullet"])
    rollout_backends: list = field(default_factory=lambda: ["mujoco", "pybullet"])

    def validate(self) -> "DistillConfig":
        from robot_rl.sim import BACKENDS

        for k, lo in (("episodes", 1), ("dagger_rounds", 0), ("dagger_episodes", 1), ("dagger_steps", 1)):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= lo):
                raise ConfigError(f"distill.{k}", f"{v!r} < {lo}", f"use an integer >= {lo}")
        for k in ("eval_backends", "rollout_backends"):
            v = getattr(self, k)
            bad = [b for b in v if b not in BACKENDS] or ([] if v else ["(none)"])
            if bad:
                raise ConfigError(f"distill.{k}", f"{bad} are not simulators", f"use some of {list(BACKENDS)}")
        return self


#: the ``distill`` command's defaults on top of the dataclasses' (a config preset; every field can be overridden):
#: two 64x64 cameras, a small image BC trained for 6 000 steps (with rollouts from both simulators, which shade
#: alike: 0.93 of the teacher in MuJoCo, 0.64 in PyBullet; README, distillation; the whole run takes about 33 min
#: on 2 CPU cores), the ``visual`` randomization preset, 200 held-out evaluation episodes per condition
PRESET = {
    "env": {"cameras": ["front", "wrist"], "image_size": [64, 64]},
    "randomization": {"preset": "visual"},
    "base": {"kind": "bc", "obs_keys": ["ee_pos", "ee_quat", "gripper_width"], "steps": 6000, "batch_size": 64,
             "lr": 5e-4},
    "policy": {"image_channels": [16, 32, 64], "image_crop": [58, 58], "bc_hidden": [256, 256]},
    "eval": {"episodes": 200, "n_envs": 2, "videos": 2},
}


def student_config(task: str, base: BaseTrainConfig, cameras) -> BaseTrainConfig:
    """The student's training config: ``base`` with ``image_keys`` = ``image_<camera>`` for every camera when not
    given. Raises ConfigError for an object pose or goal among its inputs (the task's observation keys), an
    unknown key, or image keys that are not among the cameras."""
    cams = list(cameras or [])
    if not cams:
        raise ConfigError("env.cameras", "the student needs at least one camera", "use e.g. --cameras front wrist")
    privileged = set(make_task(task).obs_dims())
    for k in base.obs_keys:
        if k in privileged:
            raise ConfigError("base.obs_keys", f"{k!r} is an object pose or goal, which a robot's student cannot read",
                              "use proprioception only, e.g. --set base.obs_keys=[ee_pos,ee_quat,gripper_width]")
        if k not in ROBOT_OBS_DIMS:
            raise ConfigError("base.obs_keys", f"unknown proprioceptive key {k!r}", f"use some of {list(ROBOT_OBS_DIMS)}")
    images = list(base.image_keys) or [f"image_{c}" for c in cams]
    missing = [k for k in images if k.removeprefix("image_") not in cams]
    if missing:
        raise ConfigError("base.image_keys", f"{missing} are not among the cameras {cams}",
                          "drop base.image_keys (every camera is used) or add the camera")
    return replace(base, image_keys=images, only_success=False, sources=[])


def distill(teacher, task: str, out_dir: str | Path, *, teacher_residual=None, cfg: DistillConfig = DistillConfig(),
            base: BaseTrainConfig | None = None, evaluation: EvalConfig = EvalConfig(), cameras=("front", "wrist"),
            image_size=(64, 64), randomization="visual", task_kwargs: dict | None = None,
            env_kwargs: dict | None = None, seed: int = 0, progress: bool = True, writer_for=None) -> dict:
    """Run the distillation (module doc) into ``out_dir``; returns the report dict (also ``report.json``).

    Args:
        teacher: the frozen state base (``BasePolicy``); teacher_residual: its residual or None.
        base: the student's :class:`BaseTrainConfig` (kind, proprioceptive ``obs_keys``, steps, ...; its
            ``policy`` overrides the architecture); default: :data:`PRESET`'s.
        evaluation: held-out episodes, env workers (also for the rollouts), videos.
        cameras, image_size: the rendered cameras and their (H, W) [px]; randomization: the rollouts' and the
            randomized evaluation conditions' spec (:mod:`robot_rl.envs.randomization`).
        env_kwargs: further EnvConfig fields (and ``ray``); writer_for(name) -> a TensorBoard writer or None.
    Raises ConfigError for a privileged student input, an empty camera list or bad counts, before anything runs.
    """
    cfg.validate()
    evaluation.validate("eval")
    if base is None:
        base = BaseTrainConfig(**PRESET["base"], policy=dict(PRESET["policy"]), seed=seed)
    student_cfg = student_config(task, base, cameras)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env_kw = {**(env_kwargs or {}), "cameras": tuple(cameras), "image_size": tuple(image_size)}
    rollout_kw = {**env_kw, "randomization": randomization}
    store = ZarrStore.create(out / "rollouts.zarr", overwrite=True)
    times, rounds = {}, []
    teacher_info = {"residual": teacher_residual is not None, "kind": teacher.config.kind}

    def rollouts(policy, r, n, first_seed, desc, **kw) -> tuple[list[dict], int]:
        """``n`` recorded episodes of ``policy`` in every rollout backend (round ``r``); the rows and the next seed."""
        done = []
        for backend in cfg.rollout_backends:
            res = evaluate(policy, task, n_episodes=n, n_envs=evaluation.n_envs, seed_start=first_seed,
                           task_kwargs=task_kwargs, env_kwargs={**rollout_kw, "backend": backend}, seed=seed,
                           progress=progress, desc=f"{desc} ({backend})", record=store,
                           record_extra={"teacher": teacher_info, "dagger_round": r}, **kw)
            done.append({"round": r, "driver": "teacher" if r == 0 else "student", "backend": backend,
                         "episodes": n, "seed_start": first_seed, "success_rate": res["success_rate"]})
            first_seed += n
        return done, first_seed

    t = time.time()
    done, next_seed = rollouts(teacher, 0, cfg.episodes, DISTILL_SEED_START, "teacher rollouts",
                               residual=teacher_residual)
    rounds += done
    times["teacher_rollouts_s"] = time.time() - t

    from robot_rl.policies.checkpoint import load_policy

    student = None
    for r in range(cfg.dagger_rounds + 1):
        if r > 0:
            t = time.time()
            labels = CombinedPolicy(teacher, teacher_residual, min(evaluation.n_envs, cfg.dagger_episodes), seed=seed)
            done, next_seed = rollouts(student, r, cfg.dagger_episodes, next_seed, f"DAgger round {r}",
                                       label_policy=labels)
            rounds += done
            times[f"dagger_{r}_rollouts_s"] = time.time() - t
        t = time.time()
        # a DAgger round continues the previous student with its normalization: the teacher's labels at the states
        # the student visits reach far outside the first round's action range (README, distillation)
        round_cfg = student_cfg if r == 0 else replace(student_cfg, steps=cfg.dagger_steps, init_normalizer=True,
                                                         init_from=str(out / f"student_round{r - 1}" / "checkpoint"))
        with all_cores():  # training has the machine to itself (rollouts run torch on one thread)
            summary = train_base(out / "rollouts.zarr", out / f"student_round{r}", round_cfg,
                                 writer=writer_for(f"round{r}") if writer_for else None, progress=progress)
        times[f"train_round{r}_s"] = time.time() - t
        student = load_policy(summary["checkpoint"])
    final = out / f"student_round{cfg.dagger_rounds}" / "checkpoint"

    t = time.time()
    rows = []
    for backend in cfg.eval_backends:
        for rnd in (None, randomization):
            kw = {**env_kw, "randomization": rnd, "backend": backend}
            tag = f"{backend}_{'randomized' if rnd is not None else 'nominal'}"
            te = evaluate(teacher, task, residual=teacher_residual, n_episodes=evaluation.episodes,
                          n_envs=evaluation.n_envs, seed_start=evaluation.seed_start, task_kwargs=task_kwargs,
                          env_kwargs=kw if teacher.config.image_keys else {**kw, "cameras": ()}, seed=seed,
                          progress=progress, desc=f"teacher {tag}")  # a state teacher: nothing to render
            st = evaluate(student, task, n_episodes=evaluation.episodes, n_envs=evaluation.n_envs,
                          seed_start=evaluation.seed_start, task_kwargs=task_kwargs, env_kwargs=kw, seed=seed,
                          progress=progress, desc=f"student {tag}")
            rows.append({"condition": tag, "backend": backend, "randomized": rnd is not None,
                         "teacher": _slim(te), "student": _slim(st),
                         "ratio": st["success_rate"] / te["success_rate"] if te["success_rate"] else None})
    times["evaluation_s"] = time.time() - t
    videos = []
    if evaluation.videos:
        for backend in cfg.eval_backends:
            videos += record_videos(student, task, out / "videos", seeds=range(evaluation.seed_start,
                                    evaluation.seed_start + evaluation.videos), task_kwargs=task_kwargs,
                                    prefix=f"student_{backend}_randomized", backend=backend,
                                    env_kwargs={**env_kw, "randomization": randomization})
    times["total_s"] = sum(v for k, v in times.items())
    report = {"task": task, "task_kwargs": task_kwargs or {}, "cameras": list(cameras), "image_size": list(image_size),
              "randomization": randomization, "student": {"checkpoint": str(final), "obs_keys": student_cfg.obs_keys,
                                                          "image_keys": student_cfg.image_keys,
                                                          "kind": student_cfg.kind, "steps": student_cfg.steps,
                                                          "dagger_steps": cfg.dagger_steps},
              "teacher": teacher_info, "rounds": rounds, "store_episodes": store.n_episodes, "rows": rows,
              "eval_seed_range": [evaluation.seed_start, evaluation.seed_start + evaluation.episodes - 1],
              "wall_s": times, "videos": videos}
    return write_report(out, report)


def _slim(r: dict) -> dict:
    return {k: r[k] for k in ("success_rate", "successes", "episodes", "ci95", "mean_length", "backend")}


def write_report(out: Path, report: dict) -> dict:
    """``report.json``, ``report.md`` and ``success.png`` (teacher vs student per condition) in ``out``."""
    from robot_rl.provenance import provenance

    report = {**report, "provenance": provenance()}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    _plot(report["rows"], out / "success.png")
    w = report["wall_s"]
    lines = ["# robot_rl distillation report", "",
             f"- **task**: {report['task']} {json.dumps(report['task_kwargs']) if report['task_kwargs'] else ''}",
             f"- **student**: {report['student']['kind']} over {', '.join(report['student']['image_keys'])} "
             f"({report['image_size'][0]}x{report['image_size'][1]}) + {', '.join(report['student']['obs_keys'])}; "
             f"no object poses; {report['student']['steps']} steps, then {report['student']['dagger_steps']} per DAgger round",
             f"- **teacher**: state {report['teacher']['kind']}{' + residual' if report['teacher']['residual'] else ''}",
             f"- **rollouts**: {report['store_episodes']} episodes in `rollouts.zarr` under randomization "
             f"`{json.dumps(report['randomization'])}`; rounds: " + "; ".join(
                 f"{r['round']} ({r['driver']} drove {r['episodes']} in {r['backend']}, "
                 f"success {r['success_rate']:.3f})"
                 for r in report["rounds"]),
             f"- **held-out seeds**: {report['eval_seed_range'][0]}–{report['eval_seed_range'][1]} in every row",
             f"- **wall time**: {w['total_s'] / 60:.1f} min (" + ", ".join(
                 f"{k.removesuffix('_s')} {v / 60:.1f}" for k, v in w.items() if k != "total_s") + ")", "",
             "| condition | teacher | 95 % CI | student | 95 % CI | student / teacher |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        te, st = r["teacher"], r["student"]
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['condition']} | {te['success_rate']:.3f} ({te['successes']}/{te['episodes']}) | "
                     f"[{te['ci95'][0]:.3f}, {te['ci95'][1]:.3f}] | {st['success_rate']:.3f} ({st['successes']}/"
                     f"{st['episodes']}) | [{st['ci95'][0]:.3f}, {st['ci95'][1]:.3f}] | {ratio} |")
    lines += ["", "![success](success.png)"]
    if report["videos"]:
        lines += ["", "Videos: " + ", ".join(f"[{Path(v).name}](videos/{Path(v).name})" for v in report["videos"])]
    c = report["provenance"]["git"]
    lines += ["", f"Measured on commit `{(c['commit'] or 'unknown')[:12]}`{' (uncommitted changes)' if c['dirty'] else ''}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {**report, "report_md": str(out / "report.md"), "report_json": str(out / "report.json")}


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.6))
    for j, (who, color) in enumerate((("teacher", "C0"), ("student", "C1"))):
        p = np.array([r[who]["success_rate"] for r in rows])
        lo = p - np.array([r[who]["ci95"][0] for r in rows])
        hi = np.array([r[who]["ci95"][1] for r in rows]) - p
        ax.bar(x + (j - 0.5) * 0.38, p, 0.38, yerr=[lo, hi], capsize=3, color=color,
               label=f"{who} ({'state' if who == 'teacher' else 'cameras + proprioception'})")
    ax.set_xticks(x, [r["condition"].replace("_", "\n") for r in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success (95 % Wilson CI)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
