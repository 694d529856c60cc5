"""Success classifier: one camera frame -> the probability that the task is done, trained from labelled episodes in a
store, usable as the reward when learning on the robot (SERL, Luo et al. 2024, and HIL-SERL, Luo et al. 2024:
a binary classifier on the wrist/front images stands in for the person's success label).

Labels come from the store's episodes (``meta/episodes`` ``success``; the env, the policy node and the recorder
end a successful episode on the step the task is done): the **last frame of a successful episode is positive**,
every other frame negative (the frames before it are states where the task was not yet done, and a failed
episode never got there). Episodes are split into training and held-out sets (``success.val_fraction``, by episode,
seeded), so no frame of a held-out episode is trained on. Training samples positives and negatives 50/50 (the
positives are one frame per successful episode) with random-crop augmentation, binary cross-entropy, AdamW.

The report gives the held-out **confusion matrices** at ``success.threshold``:
- ``frames``: every held-out frame against its label;
- ``episodes``: the classifier used as the reward, i.e. "fires" on an episode when any of its frames reaches the
  threshold (the episode would have been labelled a success there), against the episode's true label.

Command: ``robot-rl success-classifier --store STORE --out DIR [--camera front] [--set success.FIELD=V]``; record
such a store with ``robot-rl collect --keep-failures --cameras front`` (scripted, noisy: both labels) or ``robot-rl
eval --record`` with cameras (a policy's own episodes).

Model: :class:`robot_rl.policies.encoders.ImageEncoder` (GroupNorm ResNet + spatial softmax, the base policies'
image encoder) + a linear logit. Checkpoint: safetensors + config.json (format ``robot_rl.success_classifier``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robot_rl.errors import ConfigError

FORMAT = "robot_rl.success_classifier"


@dataclass
class SuccessConfig:
    """The ``success`` config section (``robot-rl success-classifier``).

    camera: the store's ``image_<camera>`` key the classifier reads; steps / batch_size / lr / weight_decay: AdamW
    training (half of each batch positives); val_fraction: share of the episodes held out (by episode); threshold:
    probability at which it says "success" (the confusion matrices, and the operator's label); channels /
    num_keypoints / feature_dim: the image encoder (as the base policies'); crop: random-crop size (h, w) in
    training, center crop otherwise (null: none).
    """

    camera: str = "front"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    threshold: float = 0.5
    channels: list = field(default_factory=lambda: [16, 32, 64])
    num_keypoints: int = 16
    feature_dim: int = 64
    crop: list | None = field(default_factory=lambda: [88, 88])

    def validate(self) -> "SuccessConfig":
        for k, lo in (("steps", 1), ("batch_size", 2), ("num_keypoints", 1), ("feature_dim", 1)):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= lo):
                raise ConfigError(f"success.{k}", f"{v!r} < {lo}", f"use an integer >= {lo}")
        for k, lo, hi in (("val_fraction", 0.0, 1.0), ("threshold", 0.0, 1.0)):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and lo < v < hi):
                raise ConfigError(f"success.{k}", f"{v!r} is not in ({lo}, {hi})", f"use a number in ({lo}, {hi})")
        if not self.channels or any(not isinstance(c, int) or c < 4 or c % 4 for c in self.channels):
            raise ConfigError("success.channels", f"{self.channels!r}", "use a list of multiples of 4, e.g. [16, 32]")
        return self


class SuccessClassifier(nn.Module):
    """uint8 RGB frames (N, H, W, 3) -> success logits (N,). ``config``: the model fields of :class:`SuccessConfig`
    plus ``camera`` and ``image_shape`` ([H, W, 3]); ``threshold`` is kept with it."""

    def __init__(self, config: dict):
        from robot_rl.policies.encoders import ImageEncoder

        super().__init__()
        self.config = dict(config)
        c = self.config
        self.encoder = ImageEncoder(list(c["channels"]), int(c["num_keypoints"]), int(c["feature_dim"]),
                                    n_groups=4, crop=c.get("crop"))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(int(c["feature_dim"]), 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images)).squeeze(-1)

    @torch.no_grad()
    def prob(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """Success probabilities, float32 (N,), of uint8 frames (N, H, W, 3) (or one frame (H, W, 3): shape (1,)).
        Raises ConfigError for frames of another shape than the classifier's ``image_shape``."""
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        want = tuple(self.config["image_shape"])
        if x.shape[1:] != want or x.dtype != np.uint8:
            raise ConfigError("images", f"{x.dtype} frames of shape {x.shape[1:]} != uint8 {want}",
                              f"pass {self.config['camera']} frames at the classifier's size {want[:2]}")
        was = self.training
        self.eval()
        out = [torch.sigmoid(self(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))).numpy()
               for i in range(0, len(x), batch)]
        self.train(was)
        return np.concatenate(out).astype(np.float32)

    def is_success(self, image: np.ndarray) -> bool:
        """One frame (H, W, 3) uint8 -> probability >= the classifier's threshold."""
        return bool(self.prob(image)[0] >= float(self.config["threshold"]))


def load_success_classifier(path: str | Path) -> SuccessClassifier:
    """Load a checkpoint written by :func:`train_success_classifier` (ConfigError for another format, pickle or
    mismatched tensors)."""
    from robot_rl.policies.checkpoint import load_module_safetensors

    model, _ = load_module_safetensors(path, SuccessClassifier, format_name=FORMAT)
    return model.eval()


def labelled_frames(store, camera: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(frames uint8 (N, H, W, 3), labels bool (N,), episode index int64 (N,), episode success bool (E,)) of every
    committed episode of ``store`` (a :class:`~robot_rl.datasets.store.ZarrStore`): the last frame of a successful
    episode is positive, every other frame negative. Raises ConfigError without that camera, or without at least
    one successful and one failed episode."""
    key = f"image_{camera}"
    if key not in store.keys:
        cams = [k[len("image_"):] for k in store.keys if k.startswith("image_")]
        raise ConfigError("success.camera", f"the store has no {key} (its cameras: {cams or 'none'})",
                          "record episodes with that camera, or set success.camera to one of them")
    metas = store.episodes_meta()
    ok = np.array([bool(m["success"]) for m in metas])
    if ok.all() or not ok.any():
        raise ConfigError("store", f"{int(ok.sum())} of {len(ok)} episodes are successes",
                          "a classifier needs both labels: add failed episodes (collect --set collect.only_success="
                          "false, eval --record) or successful ones")
    frames, labels, index = [], [], []
    for i in range(len(metas)):
        f = store.get_episode(i, keys=[key])[key]
        y = np.zeros(len(f), bool)
        y[-1] = ok[i]
        frames.append(f)
        labels.append(y)
        index.append(np.full(len(f), i, np.int64))
    return np.concatenate(frames), np.concatenate(labels), np.concatenate(index), ok


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for boolean ``truth`` (the Mann-Whitney U statistic over n_pos x n_neg,
    ties counted half; scipy.stats.mannwhitneyu); NaN without both labels."""
    from scipy.stats import mannwhitneyu

    truth = np.asarray(truth, bool)
    if truth.all() or not truth.any():
        return float("nan")
    u = mannwhitneyu(score[truth], score[~truth], alternative="greater").statistic
    return float(u / (truth.sum() * (~truth).sum()))


def confusion(pred: np.ndarray, truth: np.ndarray) -> dict:
    """{tp, fp, tn, fn, precision, recall, accuracy} of boolean predictions against boolean truth."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    tn, fn = int((~pred & ~truth).sum()), int((~pred & truth).sum())
    n = tp + fp + tn + fn
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"), "accuracy": (tp + tn) / n if n else float("nan")}


def train_success_classifier(store_path: str | Path, out: str | Path, config: SuccessConfig, seed: int = 0,
                             progress: bool = True) -> dict:
    """Train a :class:`SuccessClassifier` on ``store_path``'s labelled episodes (see the module doc), write
    ``out/checkpoint`` (safetensors + config.json), ``out/report.json`` / ``report.md`` (held-out confusion matrices
    for frames and for episodes) and ``out/confusion.png``. Progress: a line every ~5 s. Returns the report dict.
    Raises ConfigError for a store without the camera or without both labels, or a split with no held-out
    successful episode."""
    from robot_rl.datasets.store import ZarrStore
    from robot_rl.policies.checkpoint import save_module_safetensors

    cfg = config.validate()
    out = Path(out)
    store = ZarrStore.open(store_path)
    frames, labels, index, ok = labelled_frames(store, cfg.camera)
    rng = np.random.default_rng(seed)
    n_ep = len(ok)
    held = np.zeros(n_ep, bool)
    for want in (True, False):  # stratified by label: held-out episodes of both kinds
        eps = rng.permutation(np.flatnonzero(ok == want))
        held[eps[:max(1, int(round(cfg.val_fraction * len(eps))))]] = True
    if (held & ok).sum() == len(ok[ok]) or (~held & ok).sum() == 0:
        raise ConfigError("store", f"only {int(ok.sum())} successful episodes: none left for training after "
                          "holding some out", "record more successful episodes")
    if cfg.crop and (cfg.crop[0] > frames.shape[1] or cfg.crop[1] > frames.shape[2]):
        raise ConfigError("success.crop", f"{list(cfg.crop)} is larger than the frames ({frames.shape[1]} x "
                          f"{frames.shape[2]})", "set success.crop to at most the frame size, or null")
    train = ~held[index]
    pos, neg = np.flatnonzero(train & labels), np.flatnonzero(train & ~labels)
    torch.manual_seed(seed)
    model_cfg = {**{k: v for k, v in asdict(cfg).items() if k in ("channels", "num_keypoints", "feature_dim",
                                                                   "crop", "camera", "threshold")},
                 "image_shape": list(frames.shape[1:])}
    model = SuccessClassifier(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    half = cfg.batch_size // 2
    t0 = last = time.monotonic()
    for step in range(cfg.steps):
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, cfg.batch_size - half)])
        x = torch.from_numpy(frames[idx])
        y = torch.from_numpy(labels[idx].astype(np.float32))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (time.monotonic() - last > 5 or step == cfg.steps - 1):
            last = time.monotonic()
            print(f"success classifier: step {step + 1}/{cfg.steps}, loss {loss.item():.4f}, "
                  f"{(step + 1) / (last - t0):.1f} step/s", flush=True)
    model.eval()
    test = held[index]
    p = model.prob(frames[test])
    fires = np.zeros(n_ep, bool)
    np.maximum.at(fires, index[test], p >= cfg.threshold)
    ep_held = np.flatnonzero(held)
    report = {"store": str(store_path), "camera": cfg.camera, "seed": seed, "config": asdict(cfg),
              "episodes": {"train": int((~held).sum()), "held_out": int(held.sum()),
                           "held_out_successes": int((held & ok).sum())},
              "frames": {"train": int(train.sum()), "train_positives": int(len(pos)), "held_out": int(test.sum())},
              "held_out_frames": {**confusion(p >= cfg.threshold, labels[test]), "auroc": auroc(p, labels[test])},
              "held_out_episodes": confusion(fires[ep_held], ok[ep_held]),
              "final_loss": float(loss.item()), "train_seconds": time.monotonic() - t0}
    save_module_safetensors(model, out / "checkpoint", model_cfg, format_name=FORMAT,
                            extra={"report": {k: report[k] for k in ("held_out_frames", "held_out_episodes")}})
    _write_report(out, report)
    return report


def _write_report(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    thr = report["config"]["threshold"]
    lines = ["# Success classifier", "", f"Store `{report['store']}`, camera `{report['camera']}`, "
             f"{report['episodes']['train']} training / {report['episodes']['held_out']} held-out episodes "
             f"({report['episodes']['held_out_successes']} held-out successes), threshold {thr}.", ""]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, (name, what) in zip(axes, (("held_out_frames", "frames (last frame of a success = positive)"),
                                       ("held_out_episodes", "episodes (fires on any frame = success)"))):
        c = report[name]
        lines += [f"## Held-out {what}", "", "| | predicted success | predicted not |", "|---|---|---|",
                  f"| success | {c['tp']} | {c['fn']} |", f"| not | {c['fp']} | {c['tn']} |", "",
                  f"precision {c['precision']:.3f}, recall {c['recall']:.3f}, accuracy {c['accuracy']:.3f}"
                  + (f", AUROC {c['auroc']:.3f}" if "auroc" in c else ""), ""]
        m = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
        ax.imshow(m, cmap="Blues")
        for (r, k), v in np.ndenumerate(m):
            ax.text(k, r, str(v), ha="center", va="center")
        ax.set_xticks([0, 1], ["success", "not"])
        ax.set_yticks([0, 1], ["success", "not"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"held-out {name.split('_')[-1]}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    (out / "report.md").write_text("\n".join(lines))
