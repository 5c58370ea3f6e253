"""Is a model's confidence honest, and does its uncertainty point at its errors?

- **Expected calibration error** (Guo et al. 2017): predictions binned by confidence (15 equal
  bins on [0, 1]); the gap between accuracy and mean confidence per bin, weighted by the bin's
  share. Kept as per-bin sums (:class:`Reliability`), so blocks of a volume of any size add up
  exactly, and the reliability diagram is drawn from the same sums. scikit-learn has no ECE,
  and its ``calibration_curve`` drops empty bins' counts, which the sum needs, hence by hand.
- **Error detection**: the AUROC of per-pixel uncertainty as a score for "this pixel is
  wrong" (scikit-learn's ``roc_auc_score``): 0.5 is chance, 1 ranks every error above every
  correct pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

BINS = 15


@dataclass
class Reliability:
    """Per-bin counts, summed confidences and summed correct predictions."""

    bins: int = BINS
    count: np.ndarray = field(default=None)  # type: ignore[assignment]
    confidence: np.ndarray = field(default=None)  # type: ignore[assignment]
    correct: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("count", "confidence", "correct"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.bins, np.float64))

    @classmethod
    def of(cls, confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> "Reliability":
        """Sums of one block: ``confidence`` in [0, 1], ``correct`` boolean, same shape."""
        conf = np.clip(np.asarray(confidence, np.float64).ravel(), 0.0, 1.0)
        ok = np.asarray(correct, bool).ravel()
        if conf.shape != ok.shape:
            raise ValueError(f"confidence {conf.shape} and correct {ok.shape} differ in size")
        index = np.minimum((conf * bins).astype(np.int64), bins - 1)  # confidence 1.0 goes to the top bin
        return cls(bins, np.bincount(index, minlength=bins).astype(np.float64),
                   np.bincount(index, weights=conf, minlength=bins), np.bincount(index, weights=ok, minlength=bins))

    def __add__(self, other: "Reliability") -> "Reliability":
        if other.bins != self.bins:
            raise ValueError("reliability sums with different bins do not add")
        return Reliability(self.bins, self.count + other.count, self.confidence + other.confidence,
                           self.correct + other.correct)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum_b (n_b / N) |accuracy_b - confidence_b|``."""
        if self.total == 0:
            return float("nan")
        return float(np.abs(self.correct - self.confidence).sum() / self.total)

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.total) if self.total else float("nan")

    def rows(self) -> list[dict]:
        """One row per bin: its range, count, mean confidence and accuracy (None when empty)."""
        edges = np.linspace(0, 1, self.bins + 1)
        out = []
        for b in range(self.bins):
            n = self.count[b]
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(n),
                        "confidence": float(self.confidence[b] / n) if n else None,
                        "accuracy": float(self.correct[b] / n) if n else None})
        return out

    def plot(self, path: str | Path | IO[bytes], *, title: str = "") -> str | Path | IO[bytes]:
        """The reliability diagram (accuracy against confidence per bin, the diagonal is perfect
        calibration, bar shade = share of pixels) as a PNG, to a path or an open binary file."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        edges = np.linspace(0, 1, self.bins + 1)
        centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / self.bins
        filled = self.count > 0
        acc = np.divide(self.correct, self.count, out=np.zeros_like(self.correct), where=filled)
        share = self.count / max(self.total, 1)
        fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
        ax.bar(centres[filled], acc[filled], width=width, edgecolor="black", linewidth=0.5,
               color=plt.cm.Blues(0.3 + 0.7 * share[filled] / max(share.max(), 1e-12)), label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=(title + "\n" if title else "") + f"ECE {self.ece:.4f} ({self.total:,} pixels)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        if not hasattr(path, "write"):
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        plt.close(fig)
        return path


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """ECE of predictions with ``confidence`` in [0, 1] and boolean ``correct``."""
    return Reliability.of(confidence, correct, bins).ece


def binary_confidence(probability: np.ndarray) -> np.ndarray:
    """Confidence of the decision ``probability > 0.5``: ``max(p, 1 - p)``."""
    p = np.asarray(probability, np.float64)
    return np.maximum(p, 1 - p)


def error_auroc(uncertainty: np.ndarray, error: np.ndarray) -> float | None:
    """AUROC of ``uncertainty`` as a detector of ``error`` (boolean); None when there are no
    errors, or nothing but errors (the score is undefined)."""
    from sklearn.metrics import roc_auc_score

    err = np.asarray(error, bool).ravel()
    if err.all() or not err.any():
        return None
    return float(roc_auc_score(err, np.asarray(uncertainty, np.float64).ravel()))
