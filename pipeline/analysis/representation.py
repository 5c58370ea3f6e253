"""What an embedding has learned, scored so that baselines cannot be skipped.

Every score here takes an ``(n, d)`` embedding and per-object labels (a group: a class, or a
replicate id) and is computed the same way for every embedding, learned or baseline:

- :func:`retrieval_map`: mean average precision of retrieving same-group objects by cosine
  similarity, with permutation-null p-values and Benjamini-Hochberg correction, from
  ``copairs`` (the field's tool for exactly this);
- :func:`knn_accuracy`: leave-fold-out 1-nearest-neighbour accuracy (cosine);
- :func:`probe_accuracy`: a linear probe (standardised logistic regression) on held-out folds;
- :func:`confound_r2`: how well a nuisance variable (size, intensity, local density) is
  predicted from the embedding (ridge regression, held-out R^2): high means the embedding
  may be "recognising" groups by their confounds;
- :func:`over_best_baseline`: each figure as a difference over the best baseline's.

scikit-learn does the learning; nothing here is written by hand that it or copairs provides.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

BASELINES = ("untrained", "pixel", "structure")


def _folds(groups: np.ndarray, wanted: int) -> int:
    """Folds for stratified cross-validation: at most the smallest group's size."""
    counts = np.unique(groups, return_counts=True)[1]
    return int(max(2, min(wanted, counts.min())))


def retrieval_map(embedding: np.ndarray, groups: Sequence, *, null_size: int = 1000, threshold: float = 0.05,
                  seed: int = 0) -> dict:
    """mAP of retrieving an object's group-mates among all objects (cosine), per group and
    overall, with p-values against a permutation null (``copairs``)."""
    import pandas as pd
    from copairs.map import average_precision, mean_average_precision

    meta = pd.DataFrame({"group": np.asarray(groups).astype(str)})
    feats = np.asarray(embedding, np.float64)
    ap = average_precision(meta, feats, pos_sameby=["group"], pos_diffby=[], neg_sameby=[], neg_diffby=["group"],
                           distance="cosine", progress_bar=False)
    per_group = mean_average_precision(ap, sameby=["group"], null_size=null_size, threshold=threshold, seed=seed,
                                       progress_bar=False)
    return {"map": float(per_group["mean_average_precision"].mean()),
            "map_p": float(per_group["corrected_p_value"].median()),
            "significant_groups": float(per_group["below_corrected_p"].mean()),
            "by_group": {str(g): float(m) for g, m in zip(per_group["group"], per_group["mean_average_precision"])}}


def knn_accuracy(embedding: np.ndarray, groups: Sequence, *, folds: int = 5, seed: int = 0) -> float:
    """Held-out 1-nearest-neighbour accuracy (cosine), stratified folds."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    y = np.asarray(groups)
    cv = StratifiedKFold(_folds(y, folds), shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(1, metric="cosine"), embedding, y, cv=cv).mean())


def probe_accuracy(embedding: np.ndarray, groups: Sequence, *, folds: int = 5, seed: int = 0) -> float:
    """Held-out accuracy of a linear probe (standardised features, logistic regression)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(groups)
    cv = StratifiedKFold(_folds(y, folds), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(probe, embedding, y, cv=cv).mean())


def confound_r2(embedding: np.ndarray, target: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Held-out R^2 of predicting ``target`` (a per-object nuisance) from the embedding."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    cv = KFold(max(2, min(folds, len(target) // 2)), shuffle=True, random_state=seed)
    return float(cross_val_score(model, embedding, np.asarray(target, np.float64), cv=cv, scoring="r2").mean())


HIGHER_IS_BETTER = ("map", "knn_acc", "probe_acc")


def over_best_baseline(scores: Mapping[str, Mapping[str, float]], *, baselines: Sequence[str] = BASELINES,
                       metrics: Sequence[str] = HIGHER_IS_BETTER) -> dict[str, dict[str, float]]:
    """``{embedding: {metric: value - best baseline's value}}`` for every non-baseline
    embedding (baselines are the embeddings whose name starts with one of ``baselines``);
    ``metrics`` are those where higher is better (not p-values)."""
    base = {name: s for name, s in scores.items() if name.startswith(tuple(baselines))}
    out: dict[str, dict[str, float]] = {}
    for name, s in scores.items():
        if name in base:
            continue
        out[name] = {}
        for metric, value in s.items():
            if metric not in metrics:
                continue
            others = [b[metric] for b in base.values() if isinstance(b.get(metric), (int, float))]
            if isinstance(value, (int, float)) and others:
                out[name][metric] = float(value) - max(others)
    return out
