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


def overlap_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping pair of objects of two label images, background (0) excluded.

    Returns ``(a_ids, b_ids, iou)`` as three aligned 1-D arrays (uint64 ids, sorted by pair);
    pairs that do not overlap are absent. Each pair is packed into one uint64 key, so counting
    is one ``np.unique`` over the overlap; ids of 2^32 and above are ranked first. Used by the
    accuracy metrics and by tile stitching (``pipeline.steps.stitch``), so both count overlaps
    the same way.
    """
    if a.shape != b.shape:
        raise ValueError(f"label images differ in shape: {a.shape} vs {b.shape}")
    a = a.ravel().astype(np.uint64)
    b = b.ravel().astype(np.uint64)
    if a.size and max(int(a.max()), int(b.max())) >= 1 << 32:
        (a, a_names), (b, b_names) = _ranked(a), _ranked(b)
        pa, pb, iou = overlap_iou(a, b)
        return a_names[pa.astype(np.int64)], b_names[pb.astype(np.int64)], iou
    both = (a > 0) & (b > 0)
    if not both.any():
        empty = np.empty(0, np.uint64)
        return empty, empty, np.empty(0, np.float64)
    keys, inter = np.unique(a[both] << np.uint64(32) | b[both], return_counts=True)
    pa, pb = keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF)
    a_ids, a_counts = np.unique(a[a > 0], return_counts=True)
    b_ids, b_counts = np.unique(b[b > 0], return_counts=True)
    union = a_counts[np.searchsorted(a_ids, pa)] + b_counts[np.searchsorted(b_ids, pb)] - inter
    return pa, pb, inter / union


def _ranked(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids renumbered 1..n in sorted order (0 stays background), and the table back."""
    names = np.unique(ids[ids > 0])
    ranked = np.where(ids > 0, np.searchsorted(names, ids) + 1, 0).astype(np.uint64)
    return ranked, np.concatenate([[np.uint64(0)], names])


def iou_table(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (truth id, predicted id) pair as int64 ids (see :func:`overlap_iou`)."""
    t_ids, p_ids, iou = overlap_iou(truth, pred)
    return t_ids.astype(np.int64), p_ids.astype(np.int64), iou


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
