"""Instance segmentation metrics: objects matched one-to-one by IoU (Hungarian assignment).

Conventions follow the DSB-2018 / StarDist evaluation: a predicted object is a true positive
when it is assigned to a ground-truth object with IoU >= the threshold; accuracy is
TP / (TP + FP + FN) ("average precision" in the DSB sense), and panoptic quality is
sum(IoU of TP) / (TP + FP/2 + FN/2). Overlaps are counted sparsely (one ``np.unique`` over the
pairs of labels), so large label images with many objects stay cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Matching:
    """Scores at one IoU threshold."""

    threshold: float
    tp: int
    fp: int
    fn: int
    mean_matched_iou: float

    @property
    def precision(self) -> float:
        return self.tp / max(self.tp + self.fp, 1)

    @property
    def recall(self) -> float:
        return self.tp / max(self.tp + self.fn, 1)

    @property
    def f1(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    @property
    def accuracy(self) -> float:
        return self.tp / max(self.tp + self.fp + self.fn, 1)

    @property
    def panoptic_quality(self) -> float:
        return self.mean_matched_iou * self.tp / max(self.tp + 0.5 * self.fp + 0.5 * self.fn, 1e-12)

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "accuracy": self.accuracy, "panoptic_quality": self.panoptic_quality}


def iou_table(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (truth id, predicted id) pair, background (0) excluded.

    Returns ``(truth_ids, pred_ids, iou)`` as three aligned 1-D arrays; pairs that do not
    overlap are absent (their IoU is 0).
    """
    if truth.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {truth.shape} vs {pred.shape}")
    t = truth.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    t_ids, t_counts = np.unique(t, return_counts=True)
    p_ids, p_counts = np.unique(p, return_counts=True)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
    ta = t_counts[np.searchsorted(t_ids, pairs[0])]
    pa = p_counts[np.searchsorted(p_ids, pairs[1])]
    return pairs[0], pairs[1], inter / (ta + pa - inter)


def match(truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> list[Matching]:
    """Match predicted to true objects at each IoU threshold (one-to-one, maximising total IoU)."""
    from scipy.optimize import linear_sum_assignment

    n_true = int(np.count_nonzero(np.unique(truth)))
    n_pred = int(np.count_nonzero(np.unique(pred)))
    t_ids, p_ids, iou = iou_table(truth, pred)
    results = []
    for thr in thresholds:
        keep = iou >= thr
        if not keep.any():
            results.append(Matching(float(thr), 0, n_pred, n_true, 0.0))
            continue
        # a dense cost matrix only over the objects that have a candidate at this threshold
        rows, ti = np.unique(t_ids[keep], return_inverse=True)
        cols, pi = np.unique(p_ids[keep], return_inverse=True)
        score = np.zeros((len(rows), len(cols)))
        score[ti, pi] = iou[keep]
        r, c = linear_sum_assignment(score, maximize=True)
        matched = score[r, c]
        matched = matched[matched >= thr]
        tp = len(matched)
        results.append(Matching(float(thr), tp, n_pred - tp, n_true - tp, float(matched.mean()) if tp else 0.0))
    return results


def summary(truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """``{threshold: scores}`` as plain dicts, for reports and benchmark JSON."""
    return {f"{m.threshold:.2f}": m.to_dict() for m in match(truth, pred, thresholds)}
