"""Evaluation metrics for the outcome-prediction tasks, in numpy only: AUROC, average precision, F1, ROC curves
and percentile-bootstrap confidence intervals.

Values equal scikit-learn's (the test oracle) to 1e-12, with two deliberate differences: multi-label AUROC skips
labels with a single class present (the paper's convention; scikit-learn gives NaN), and a scalar metric that is
undefined raises ``UndefinedMetricError`` instead of warning and returning NaN.
AUROC is the Mann-Whitney U statistic with average ranks for ties: each label's scores are sorted once, in
blocks of labels, and every positive's rank comes from two binary searches into its sorted column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import combinations
from typing import Any

import numpy as np

__all__ = [
    "UndefinedMetricError", "average_precision", "bootstrap_ci", "f1", "roc_auc", "roc_curve", "task_auroc",
]

AVERAGES = ("macro", "micro", "weighted", None)
TASK_KINDS = ("binary", "multiclass", "multilabel")
BLOCK_ELEMENTS = 1 << 18  # scores are transposed and sorted in blocks of labels of 2 MiB (float64) ...
TILE_ELEMENTS = 1 << 14  # ... copied in tiles of 128 KiB


class UndefinedMetricError(ValueError):
    """The metric has no value for these targets (e.g. only one class present); bootstrap_ci skips such resamples."""


# ----------------------------------------------------------------------------------------------- input checks
def _choice(name: str, value: Any, options: tuple) -> None:
    """Raise unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _inputs(y_true: Any, y_score: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """Targets and float64 scores as arrays of one length, 1-d or 2-d, scores finite, targets class labels."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if y_score.dtype.kind not in "biuf":
        raise ValueError(f"{fn}: y_score must be numeric, got dtype {y_score.dtype}")
    y_score = y_score.astype(np.float64, copy=False)
    if y_true.ndim not in (1, 2) or y_score.ndim not in (1, 2):
        raise ValueError(f"{fn}: y_true and y_score must be 1-d or 2-d, got shapes {y_true.shape} and {y_score.shape}")
    if len(y_true) != len(y_score) or len(y_true) == 0:
        raise ValueError(f"{fn}: y_true and y_score must hold the same, non-zero number of samples, "
                         f"got {len(y_true)} and {len(y_score)}")
    if not np.isfinite(y_score).all():
        raise ValueError(f"{fn}: y_score must be finite, found NaN or inf")
    if y_true.dtype.kind == "f" and not (y_true == np.round(y_true)).all():
        raise ValueError(f"{fn}: y_true must hold class labels, found non-integer (or NaN) values")
    return y_true, y_score


def _zero_one(y: np.ndarray, name: str) -> np.ndarray:
    """A 0/1 (or bool) array as bool; anything else is an error."""
    if y.dtype == bool:
        return y
    if y.dtype.kind in "iu":
        ok = y.size == 0 or (y.min() >= 0 and y.max() <= 1)
    else:
        ok = ((y == 0) | (y == 1)).all()
    if not ok:
        raise ValueError(f"{name} must hold only 0/1 values, found {np.unique(y)[:6].tolist()}")
    return y.astype(bool)


def _classes(y_true: np.ndarray, labels: Any, n_columns: int, fn: str) -> np.ndarray:
    """The class of each score column: ``labels`` (unique, sorted, covering y_true) or y_true's sorted classes."""
    if labels is None:
        classes = np.unique(y_true)
        if classes.size != n_columns:
            raise ValueError(f"{fn}: y_true has {classes.size} classes but y_score has {n_columns} columns; "
                             f"pass labels= naming the class of every column")
        return classes
    classes = np.asarray(labels)
    if classes.ndim != 1 or classes.size != n_columns:
        raise ValueError(f"{fn}: labels must list {n_columns} classes (one per y_score column), got {classes.tolist()}")
    if not np.array_equal(np.unique(classes), classes):
        raise ValueError(f"{fn}: labels must be unique and sorted, got {classes.tolist()}")
    missing = np.setdiff1d(y_true, classes)
    if missing.size:
        raise ValueError(f"{fn}: y_true holds labels missing from labels=: {missing[:6].tolist()}")
    return classes


def _binary_target(y_true: np.ndarray, y_score: np.ndarray, labels: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """Binary targets as bool (positive = the larger class) and 1-d scores (column 1 of an [n, 2] matrix)."""
    if y_true.ndim != 1:
        raise ValueError(f"{fn}: y_true must be 1-d for binary targets, got shape {y_true.shape}")
    if y_score.ndim == 2:
        if y_score.shape[1] != 2:
            raise ValueError(f"{fn}: y_score must be 1-d or [n, 2] for binary y_true, got shape {y_score.shape}")
        y_score = y_score[:, 1]
    classes = np.unique(y_true) if labels is None else _classes(y_true, labels, 2, fn)
    if classes.size > 2:
        raise ValueError(f"{fn}: y_true has {classes.size} classes but y_score is 1-d; pass [n, K] probabilities")
    y = y_true == classes[-1]
    if y.all() or not y.any():
        raise UndefinedMetricError(f"{fn}: only one class ({y_true[0].item()!r}) is present in y_true; it is "
                                   "undefined")
    return y, y_score


# ---------------------------------------------------------------------------------------- per-column kernels
def _transposed(a: np.ndarray) -> np.ndarray:
    """A C-ordered copy of a.T, copied in tiles of rows (a whole strided copy thrashes the cache)."""
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    tile = max(1, TILE_ELEMENTS // a.shape[1])
    for r0 in range(0, a.shape[0], tile):
        out[:, r0:r0 + tile] = a[r0:r0 + tile].T
    return out


def _rank_counts(y: np.ndarray, s: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per column c of bool y / float s [n, L]: its positives' sorted scores q and how many scores are < q and <= q."""
    n, n_columns = s.shape
    step = max(1, BLOCK_ELEMENTS // n)
    for c0 in range(0, n_columns, step):
        block = _transposed(s[:, c0:c0 + step])
        rows, samples = np.nonzero(y[:, c0:c0 + step].T)
        positives = block[rows, samples]  # grouped by column, as nonzero walks rows in order
        ends = np.cumsum(np.bincount(rows, minlength=block.shape[0]))
        block.sort(axis=1)
        start = 0
        for r, end in enumerate(ends):
            q = np.sort(positives[start:end])
            start = end
            yield c0 + r, q, np.searchsorted(block[r], q, "left"), np.searchsorted(block[r], q, "right")


def _auc_columns(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of every column of bool y [n, L] against scores s [n, L]; NaN where a column has one class."""
    n = s.shape[0]
    auc = np.full(s.shape[1], np.nan)
    for c, q, below, upto in _rank_counts(y, s):
        p = q.size
        if 0 < p < n:  # U = sum of average ranks (below + upto + 1) / 2 - p (p + 1) / 2, exact in integers
            auc[c] = (int(below.sum()) + int(upto.sum()) - p * p) / (2 * p * (n - p))
    return auc


def _ap_columns(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision of every column; 0 for a column without positives (scikit-learn's value)."""
    n = s.shape[0]
    ap = np.zeros(s.shape[1])
    for c, q, below, _ in _rank_counts(y, s):
        if q.size:  # mean over positives of the precision at the positive's own score
            ap[c] = np.sum((q.size - np.searchsorted(q, q, "left")) / (n - below)) / q.size
    return ap


# --------------------------------------------------------------------------------------------------- AUROC
def roc_auc(y_true: Any, y_score: Any, average: str | None = "macro", multi_class: str = "ovr",
            labels: Any = None) -> float | np.ndarray:
    """Area under the ROC curve for binary, multi-class (one-vs-rest or Hand & Till one-vs-one) or multi-label
    targets, as sklearn's ``roc_auc_score``; multi-label averages skip labels with one class present."""
    _choice("average", average, AVERAGES)
    _choice("multi_class", multi_class, ("ovr", "ovo"))
    y_true, y_score = _inputs(y_true, y_score, "roc_auc")
    if y_true.ndim == 2:
        return _multilabel_auc(_zero_one(y_true, "roc_auc: multi-label y_true"), y_score, average)
    if y_score.ndim == 2 and y_score.shape[1] > 2:
        return _multiclass_auc(y_true, y_score, average, multi_class, labels)
    y, s = _binary_target(y_true, y_score, labels, "roc_auc")
    return float(_auc_columns(y[:, None], s[:, None])[0])


def _multilabel_auc(y: np.ndarray, s: np.ndarray, average: str | None) -> float | np.ndarray:
    """Multi-label AUROC: per label (NaN where one class), averaged over the labels where it is defined."""
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: multi-label y_score must have y_true's shape {y.shape}, got {s.shape}")
    if average == "micro":
        y, s = y.reshape(-1, 1), s.reshape(-1, 1)
    auc = _auc_columns(y, s)
    if average is None:
        return auc
    valid = ~np.isnan(auc)
    if not valid.any():
        raise UndefinedMetricError("roc_auc: no label of y_true has both classes present; it is undefined")
    weights = np.count_nonzero(y[:, valid], axis=0) if average == "weighted" else None
    return float(np.average(auc[valid], weights=weights))


def _multiclass_auc(y_true: np.ndarray, s: np.ndarray, average: str | None, multi_class: str,
                    labels: Any) -> float | np.ndarray:
    """Multi-class AUROC from [n, K] probabilities: one-vs-rest like multi-label, or Hand & Till one-vs-one."""
    if y_true.ndim != 1:
        raise ValueError(f"roc_auc: multi-class y_true must be 1-d, got shape {y_true.shape}")
    classes = _classes(y_true, labels, s.shape[1], "roc_auc")
    if not np.allclose(1, s.sum(axis=1)):
        raise ValueError("roc_auc: multi-class y_score rows must be probabilities summing to 1")
    codes = np.searchsorted(classes, y_true)
    if multi_class == "ovo":
        _choice("average (multi_class='ovo')", average, ("macro", "weighted"))
        present = np.unique(codes)
        if present.size < 2:
            raise UndefinedMetricError("roc_auc: only one class is present in y_true; it is undefined")
        pair_auc, prevalence = [], []
        for a, b in combinations(present, 2):
            mask = (codes == a) | (codes == b)
            y_pair = np.stack([codes[mask] == a, codes[mask] == b], axis=1)
            pair_auc.append(_auc_columns(y_pair, s[mask][:, [a, b]]).mean())
            prevalence.append(mask.mean())
        return float(np.average(pair_auc, weights=prevalence if average == "weighted" else None))
    one_hot = codes[:, None] == np.arange(classes.size)
    if average == "micro":
        return float(_auc_columns(one_hot.reshape(-1, 1), s.reshape(-1, 1))[0])
    auc = _auc_columns(one_hot, s)
    if average is None:
        return auc
    weights = one_hot.sum(axis=0) if average == "weighted" else np.ones(classes.size)
    used = weights > 0
    if np.isnan(auc[used]).any():
        raise UndefinedMetricError(f"roc_auc: classes {classes[used & np.isnan(auc)].tolist()} have no positive or "
                                   f"no negative sample; one-vs-rest {average} AUROC is undefined")
    return float(np.average(auc[used], weights=weights[used]))


def task_auroc(y_true: Any, probs: Any, kind: str) -> float:
    """The paper's AUROC per task kind: binary on probs[:, 1]; multi-class one-vs-one macro over classes
    0..K-1; multi-label macro over the labels with both classes present."""
    _choice("kind", kind, TASK_KINDS)
    probs = np.asarray(probs)
    if kind == "binary":
        if probs.ndim == 2 and probs.shape[1] != 2:
            raise ValueError(f"task_auroc: binary probs must be 1-d or [n, 2], got shape {probs.shape}")
        return roc_auc(y_true, probs)
    if probs.ndim != 2:
        raise ValueError(f"task_auroc: {kind} probs must be [n, K], got shape {probs.shape}")
    if kind == "multiclass":
        return roc_auc(y_true, probs, average="macro", multi_class="ovo", labels=np.arange(probs.shape[1]))
    return roc_auc(y_true, probs, average="macro")


def roc_curve(y_true: Any, y_score: Any, labels: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of a binary ROC curve, equal to sklearn's ``roc_curve`` (collinear points dropped,
    a first threshold of +inf); for one class of a multi-class task pass ``y_true == k`` and ``probs[:, k]``."""
    y_true, y_score = _inputs(y_true, y_score, "roc_curve")
    y, s = _binary_target(y_true, y_score, labels, "roc_curve")
    order = np.argsort(s)[::-1]
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score, high to low
    tps = np.cumsum(y)[ends]
    fps = ends + 1 - tps
    thresholds = s[ends]
    if ends.size > 2:  # keep corners only: a point collinear with its neighbours changes neither plot nor area
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


# ---------------------------------------------------------------------------------------- other metrics
def average_precision(y_true: Any, y_score: Any, average: str | None = "macro",
                      labels: Any = None) -> float | np.ndarray:
    """Area under the precision-recall curve (no interpolation), as sklearn's ``average_precision_score``:
    binary 0/1 targets, multi-label, or multi-class binarised one-vs-rest (columns named by ``labels``, else
    y_true's classes). A label or class without positives scores 0, as in sklearn."""
    _choice("average", average, AVERAGES)
    y_true, y_score = _inputs(y_true, y_score, "average_precision")
    if y_true.ndim == 1 and (y_score.ndim == 1 or y_score.shape[1] == 2):
        y = _zero_one(y_true, "average_precision: binary y_true")
        s = y_score[:, 1] if y_score.ndim == 2 else y_score
        return float(_ap_columns(y[:, None], s[:, None])[0])
    if y_true.ndim == 1:
        classes = _classes(y_true, labels, y_score.shape[1], "average_precision")
        y = y_true[:, None] == classes
    else:
        y = _zero_one(y_true, "average_precision: multi-label y_true")
    if y_score.shape != y.shape:
        raise ValueError(f"average_precision: y_score must have shape {y.shape}, got {y_score.shape}")
    if average == "micro":
        return float(_ap_columns(y.reshape(-1, 1), y_score.reshape(-1, 1))[0])
    ap = _ap_columns(y, y_score)
    if average is None:
        return ap
    if average == "macro":
        return float(ap.mean())
    support = y.sum(axis=0)
    return float(np.average(ap, weights=support)) if support.any() else 0.0


def f1(y_true: Any, y_pred: Any, average: str | None = "binary", threshold: float = 0.5,
       labels: Any = None) -> float | np.ndarray:
    """F1 as sklearn's ``f1_score`` (0 where undefined) from labels or scores: [n, K] scores give the argmax class
    (columns named by ``labels``, else y_true's sorted classes); 1-d float scores (0/1 y_true) and multi-label
    scores give ``score >= threshold``. The classes scored are those in y_true or the predictions."""
    _choice("average", average, ("binary",) + AVERAGES)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(f"f1: y_true and y_pred must hold the same, non-zero number of samples, "
                         f"got {len(y_true)} and {len(y_pred)}")
    if y_pred.dtype.kind == "f" and not np.isfinite(y_pred).all():
        raise ValueError("f1: y_pred must be finite, found NaN or inf")
    if y_true.ndim == 2:
        if average == "binary":
            raise ValueError("f1: multi-label y_true takes average 'macro', 'micro', 'weighted' or None")
        truth = _zero_one(y_true, "f1: multi-label y_true")
        if y_pred.shape != truth.shape:
            raise ValueError(f"f1: multi-label y_pred must have y_true's shape {truth.shape}, got {y_pred.shape}")
        pred = y_pred >= threshold if y_pred.dtype.kind == "f" else _zero_one(y_pred, "f1: multi-label y_pred")
    else:
        if y_pred.ndim == 2:
            y_pred = _classes(y_true, labels, y_pred.shape[1], "f1")[np.argmax(y_pred, axis=1)]
        elif y_pred.dtype.kind == "f":
            _zero_one(y_true, "f1: y_true with 1-d float scores")
            y_pred = (y_pred >= threshold).astype(np.int64)
        classes = np.union1d(y_true, y_pred)
        if average == "binary":
            if not np.isin(classes, (0, 1)).all():
                raise ValueError(f"f1: average='binary' needs 0/1 labels, found {classes.tolist()}; "
                                 f"use average='macro', 'micro', 'weighted' or None")
            classes = np.array([1])
        truth, pred = y_true[:, None] == classes, y_pred[:, None] == classes
    tp = np.count_nonzero(truth & pred, axis=0)
    fp = np.count_nonzero(pred & ~truth, axis=0)
    fn = np.count_nonzero(truth & ~pred, axis=0)
    if average == "micro":
        tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
    denominator = 2 * tp + fp + fn
    score = np.divide(2 * tp, denominator, out=np.zeros(tp.size), where=denominator > 0)
    if average is None:
        return score
    if average == "weighted":
        support = tp + fn
        return float(np.average(score, weights=support)) if support.any() else 0.0
    return float(score.mean())


# -------------------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(y_true: Any, y_score: Any, metric: Callable[..., Any] = roc_auc, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, **kw: Any) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) interval of a scalar metric over samples (rows), each resample one
    ``integers(0, n, n)`` draw of ``default_rng(seed)``; undefined resamples are skipped, over half is an error."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if len(y_true) != len(y_score) or len(y_true) == 0:
        raise ValueError(f"bootstrap_ci: y_true and y_score must hold the same, non-zero number of samples, "
                         f"got {len(y_true)} and {len(y_score)}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    if np.ndim(metric(y_true, y_score, **kw)) != 0:  # also surfaces input errors before resampling
        raise ValueError("bootstrap_ci: metric must return a scalar (use an average other than None)")
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            value = float(metric(y_true[idx], y_score[idx], **kw))
        except UndefinedMetricError:
            continue
        if not np.isnan(value):
            values.append(value)
    skipped = n_boot - len(values)
    if 2 * skipped > n_boot:
        raise ValueError(f"bootstrap_ci: the metric was undefined on {skipped} of {n_boot} resamples (more than "
                         f"half); the sample is too small or too imbalanced for a bootstrap interval")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
