"""Segmentation scores with abstentions: per-class Dice, IoU and abstain fraction.

A confusion matrix with the ground-truth classes as rows and the predicted classes plus an extra
ABSTAIN column, as in the paper's code. An abstained pixel is never a true positive: it counts
as a false negative of the ground-truth class it belongs to, and as a false positive of none.
For class c: TP = pixels labelled c that are c; FP = pixels labelled c that are not c;
FN = pixels of c labelled anything else or ABSTAIN. Dice = 2TP / (2TP + FP + FN),
IoU = TP / (TP + FP + FN); both are NaN for a class absent from both the target and the
prediction (it is then skipped by the per-class means). The same functions score uncertified
predictions (they simply contain no ABSTAIN).

Spatial dimensions are generic: labels and target are (H, W) images or (D, H, W) volumes. ``valid``
(a bool array of their shape) restricts the scores to the real pixels or voxels, e.g. leaving out
the padding of a volume padded to a common shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from medcert_core.certify import ABSTAIN


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def confusion_matrix(labels: Any, target: Any, num_classes: int, valid: Any | None = None) -> np.ndarray:
    """Counts (K, K + 1): row = ground-truth class, column = predicted class, last column ABSTAIN.

    labels: (H, W) or (D, H, W) class ids in 0..K-1 or ABSTAIN; target: the same shape, class ids in
    0..K-1; valid: optional bool mask of the same shape, only its True elements are counted.
    """
    labels, target = _to_numpy(labels).astype(np.int64), _to_numpy(target).astype(np.int64)
    if labels.shape != target.shape:
        raise ValueError(f"labels and target must have the same shape, got {labels.shape} and {target.shape}")
    if valid is not None:
        valid = _to_numpy(valid)
        if valid.shape != labels.shape or valid.dtype != bool:
            raise ValueError(f"valid must be a bool mask of the labels' shape {labels.shape}, got {valid.dtype} "
                             f"{valid.shape}")
        labels, target = labels[valid], target[valid]
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target class ids must lie in 0..{num_classes - 1}, got {target.min()}..{target.max()}")
    valid = (labels == ABSTAIN) | ((labels >= 0) & (labels < num_classes))
    if not valid.all():
        raise ValueError(f"labels must be class ids in 0..{num_classes - 1} or ABSTAIN ({ABSTAIN})")
    column = np.where(labels == ABSTAIN, num_classes, labels)
    flat = target.reshape(-1) * (num_classes + 1) + column.reshape(-1)
    return np.bincount(flat, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class dice, iou, abstain_in_class (fraction of the class's pixels abstained), each (K,)."""
    num_classes = confusion.shape[0]
    true_positive = np.diag(confusion[:, :num_classes]).astype(np.float64)
    false_positive = confusion[:, :num_classes].sum(0) - true_positive
    class_pixels = confusion.sum(1).astype(np.float64)
    false_negative = class_pixels - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * true_positive / (2 * true_positive + false_positive + false_negative)
        iou = true_positive / (true_positive + false_positive + false_negative)
        abstain_in_class = confusion[:, num_classes] / class_pixels
    return {"dice": dice, "iou": iou, "abstain_in_class": abstain_in_class}


def segmentation_scores(labels: Any, target: Any, num_classes: int, valid: Any | None = None) -> dict[str, np.ndarray]:
    """Per-class Dice, IoU and abstain-in-class of one image or volume, plus ``abstain`` (fraction, scalar),
    over the ``valid`` pixels (voxels) when given, else all."""
    confusion = confusion_matrix(labels, target, num_classes, valid)
    scores = scores_from_confusion(confusion)
    scores["abstain"] = np.float64(confusion[:, num_classes].sum() / max(confusion.sum(), 1))
    return scores


class MetricAccumulator:
    """Collects per-image scores and averages them per image, as the paper's tables do.

    >>> acc = MetricAccumulator(["background", "lung"])
    >>> acc.add(labels, target, image_id="case1", sigma=0.25)   # any extra columns
    >>> acc.to_frame()    # one row per image x class
    >>> acc.summary()     # mean per class (and per extra column value)
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = tuple(class_names)
        self.rows: list[dict[str, Any]] = []

    def add(self, labels: Any, target: Any, image_id: str | int, valid: Any | None = None,
            **columns: Any) -> dict[str, np.ndarray]:
        """Score one image or volume (labels, target: (H, W) or (D, H, W); ``valid``: its real pixels, default
        all) and keep one row per class; returns its scores."""
        scores = segmentation_scores(labels, target, len(self.class_names), valid)
        for class_id, class_name in enumerate(self.class_names):
            self.rows.append(
                {
                    "image_id": image_id,
                    "class_id": class_id,
                    "class_name": class_name,
                    "dice": float(scores["dice"][class_id]),
                    "iou": float(scores["iou"][class_id]),
                    "abstain_in_class": float(scores["abstain_in_class"][class_id]),
                    "abstain": float(scores["abstain"]),
                    **columns,
                }
            )
        return scores

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per image x class (x whatever extra columns were given)."""
        return pd.DataFrame(self.rows)

    def summary(self, by: Sequence[str] = ()) -> pd.DataFrame:
        """Per-image means per class (NaN scores of absent classes skipped) and ``images``, the number
        of images that enter the Dice and IoU means (those where the class is present in the target
        or the prediction)."""
        frame = self.to_frame()
        keys = [*by, "class_id", "class_name"]
        grouped = frame.groupby(keys, sort=True)
        summary = grouped[["dice", "iou", "abstain_in_class", "abstain"]].mean()
        summary["images"] = grouped["dice"].count()
        return summary.reset_index()


def psnr(estimate: torch.Tensor, clean: torch.Tensor, data_range: float = 1.0,
         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image: (B, C, H, W) pairs (volumes: (B, C, D, H, W)) -> (B,).

    valid: optional bool (B, *spatial) mask of the pixels (voxels) that count, in every channel (a padded
    volume's real voxels, ``dataset.real_voxels(i)``); the mean squared error is over them only."""
    error = (estimate.double() - clean.double()).pow(2)
    if valid is None:
        mse = error.flatten(1).mean(1)
    else:
        weights = valid.to(device=error.device, dtype=torch.float64).unsqueeze(1).expand_as(error)
        mse = (error * weights).flatten(1).sum(1) / weights.flatten(1).sum(1)
    return 10 * torch.log10(data_range**2 / mse)


def paired_bootstrap_interval(differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                              seed: int = 0) -> dict[str, float]:
    """Mean of paired per-image differences (N,) and its percentile bootstrap interval: images are
    resampled with replacement ``resamples`` times (generator seeded by ``seed``)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need a 1-D sequence of at least 2 paired differences, got shape {values.shape}")
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "images": len(values)}


def seeds_and_images_bootstrap_interval(differences: np.ndarray, confidence: float = 0.95, resamples: int = 10_000,
                                        seed: int = 0) -> dict[str, float]:
    """Mean of paired differences (S training seeds, N images) and its percentile bootstrap interval
    resampling both levels: each resample draws S seeds and N images with replacement, independently
    (every seed certifies the same images: a crossed design), and averages the differences of the drawn
    seeds on the drawn images. With one seed, only images vary. Also returned: ``seed_spread``, the
    standard deviation over seeds of each seed's mean difference (0 for one seed)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2 or not np.isfinite(values).all():
        raise ValueError(f"need finite paired differences of shape (seeds, images >= 2), got shape {values.shape}")
    seeds, images = values.shape
    rng = np.random.default_rng(seed)
    seed_counts = _pick_counts(rng.integers(0, seeds, size=(resamples, seeds)), seeds)  # (R, S)
    image_counts = _pick_counts(rng.integers(0, images, size=(resamples, images)), images)  # (R, N)
    means = ((seed_counts @ values) * image_counts).sum(axis=1) / (seeds * images)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    per_seed = values.mean(axis=1)
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "images": images, "seeds": seeds, "seed_spread": float(per_seed.std(ddof=1)) if seeds > 1 else 0.0}


def _pick_counts(picks: np.ndarray, size: int) -> np.ndarray:
    """(R, k) indices in [0, size) -> (R, size) how often each index was drawn in each row."""
    counts = np.zeros((picks.shape[0], size))
    np.add.at(counts, (np.arange(picks.shape[0])[:, None], picks), 1)
    return counts
