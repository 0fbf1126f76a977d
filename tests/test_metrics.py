"""minilora.metrics against scikit-learn (the oracle) to 1e-12: AUROC in every mode, AP, F1, ROC curves,
the bootstrap interval (against a hand-rolled resampling loop scored by scikit-learn) and input errors."""

from __future__ import annotations

import importlib.util
import itertools
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from minilora.metrics import (
    UndefinedMetricError, average_precision, bootstrap_ci, f1, roc_auc, roc_curve, task_auroc,
)

TOL = 1e-12
SCORE_KINDS = ("float", "tied", "int", "constant")
MULTICLASS_MODES = [("ovr", "macro"), ("ovr", "weighted"), ("ovr", "micro"), ("ovo", "macro"), ("ovo", "weighted")]

_SPEC = importlib.util.spec_from_file_location(
    "bench_metrics", Path(__file__).resolve().parents[1] / "tools" / "bench_metrics.py")
bench_metrics = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_metrics)


def scores(rng: np.random.Generator, shape: int | tuple, kind: str) -> np.ndarray:
    """Random scores: continuous, heavily tied (1 decimal), small integers, or one constant."""
    if kind == "float":
        return rng.random(shape)
    if kind == "tied":
        return np.round(rng.random(shape), 1)
    if kind == "int":
        return rng.integers(-2, 3, shape)
    return np.full(shape, 0.3)


def all_classes(rng: np.random.Generator, n: int, k: int = 2) -> np.ndarray:
    """n labels in 0..k-1, each class present at least once."""
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    return rng.permutation(y)


def probabilities(rng: np.random.Generator, n: int, k: int, kind: str) -> np.ndarray:
    """Rows summing to 1: Dirichlet draws, small-integer weights (many ties), or all classes equal."""
    if kind == "dirichlet":
        return rng.dirichlet(np.ones(k), n)
    weights = rng.integers(1, 4, (n, k)).astype(float) if kind == "tied" else np.ones((n, k))
    return weights / weights.sum(axis=1, keepdims=True)


def valid_columns(y: np.ndarray) -> np.ndarray:
    """Indices of the columns of a 0/1 matrix with both classes present."""
    positives = y.sum(axis=0)
    return np.flatnonzero((positives > 0) & (positives < len(y)))


def assert_close(actual: float | np.ndarray, expected: float | np.ndarray) -> None:
    """Equal within 1e-12 (absolute), NaN where the oracle has NaN."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL, equal_nan=True)


# ------------------------------------------------------------------------------------------- binary AUROC
@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_binary_auroc_matches_sklearn(seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    for n in (2, 3, 4, 17, 250, 3000):
        y, s = all_classes(rng, n), scores(rng, n, kind)
        expected = roc_auc_score(y, s)
        assert_close(roc_auc(y, s), expected)
        assert_close(roc_auc(y, np.stack([1 - s, s], axis=1)), expected)  # [n, 2] matrix: column 1 is positive
        assert_close(roc_auc(y.astype(bool), s.astype(np.float32)), roc_auc_score(y, s.astype(np.float32)))
        assert_close(roc_auc(np.where(y == 1, "dead", "alive"), s), expected)  # positive = the larger label
        assert_close(roc_auc(y * 5 + 2, s), expected)


def test_binary_auroc_every_tiny_case() -> None:
    for n in (2, 3):
        for y in itertools.product((0, 1), repeat=n):
            if len(set(y)) < 2:
                continue
            for s in itertools.product((0.0, 0.5, 1.0), repeat=n):
                assert_close(roc_auc(y, s), roc_auc_score(y, s))


# -------------------------------------------------------------------------------------- multi-class AUROC
@pytest.mark.parametrize("kind", ("dirichlet", "tied", "equal"))
@pytest.mark.parametrize("k", (3, 4, 6))
@pytest.mark.parametrize("seed", range(4))
def test_multiclass_auroc_matches_sklearn(seed: int, k: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    for n in (k, k + 1, 40, 600):
        y, p = all_classes(rng, n, k), probabilities(rng, n, k, kind)
        for multi_class, average in MULTICLASS_MODES:
            assert_close(roc_auc(y, p, average=average, multi_class=multi_class),
                         roc_auc_score(y, p, average=average, multi_class=multi_class))
        assert_close(roc_auc(y, p, average=None), roc_auc_score(y, p, average=None, multi_class="ovr"))


def test_multiclass_auroc_with_classes_absent_from_y_true() -> None:
    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 3], 300)  # class 2 of 4 never occurs (e.g. a small split of LOS)
    p = probabilities(rng, 300, 4, "tied")
    with warnings.catch_warnings():  # sklearn warns of the absent class, though 'weighted' gives it no weight
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for multi_class, average in [("ovo", "macro"), ("ovo", "weighted"), ("ovr", "weighted"), ("ovr", "micro")]:
            assert_close(roc_auc(y, p, average=average, multi_class=multi_class, labels=[0, 1, 2, 3]),
                         roc_auc_score(y, p, average=average, multi_class=multi_class, labels=[0, 1, 2, 3]))
        expected = roc_auc_score(y, p, average=None, multi_class="ovr", labels=[0, 1, 2, 3])
    per_class = roc_auc(y, p, average=None, labels=[0, 1, 2, 3])
    assert np.isnan(per_class[2])
    assert_close(per_class, expected)
    with pytest.raises(UndefinedMetricError, match=r"classes \[2\]"):  # sklearn: NaN with a warning
        roc_auc(y, p, average="macro", labels=[0, 1, 2, 3])
    letters = np.array(list("abcd"))  # the same with string classes
    assert_close(roc_auc(letters[y], p, multi_class="ovo", labels=letters),
                 roc_auc_score(y, p, multi_class="ovo", labels=[0, 1, 2, 3]))
    two = np.where(y == 3, 1, y)  # only two classes present, scores for four
    assert_close(roc_auc(two, p, multi_class="ovo", labels=[0, 1, 2, 3]),
                 roc_auc_score(two, p, multi_class="ovo", labels=[0, 1, 2, 3]))


# -------------------------------------------------------------------------------------- multi-label AUROC
@pytest.mark.parametrize("seed, kind, sizes", [
    (seed, kind, ((3, 5), (60, 12), (200, 30))) for seed in range(4) for kind in SCORE_KINDS[:3]
] + [(0, "tied", ((1500, 200),))])  # the last spans two sorting blocks
def test_multilabel_auroc_skips_single_class_labels(seed: int, kind: str, sizes: tuple) -> None:
    rng = np.random.default_rng(seed)
    for n, n_labels in sizes:
        y = (rng.random((n, n_labels)) < rng.random(n_labels) * 0.5).astype(np.int64)
        y[:, 0], y[:, 1] = 0, 1  # constant labels: skipped by our averages, NaN per label
        y[:2, 2:4] = [[0, 1], [1, 0]]  # at least two valid labels
        s = scores(rng, (n, n_labels), kind)
        valid = valid_columns(y)
        for average in ("macro", "weighted"):
            assert_close(roc_auc(y, s, average=average), roc_auc_score(y[:, valid], s[:, valid], average=average))
        assert_close(roc_auc(y, s, average="micro"), roc_auc_score(y, s, average="micro"))
        per_label = roc_auc(y.astype(bool), s, average=None)
        expected = np.full(n_labels, np.nan)
        expected[valid] = [roc_auc_score(y[:, j], s[:, j]) for j in valid]
        assert_close(per_label, expected)


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(0)
    y, s = (rng.random((50, 7)) < 0.3).astype(int), np.asfortranarray(rng.random((50, 7)))  # s.T is C-ordered
    s_copy = s.copy()
    roc_auc(y, s)
    average_precision(y, s)
    np.testing.assert_array_equal(s, s_copy)


# ------------------------------------------------------------------------------------------ task AUROC
def test_task_auroc_follows_the_paper() -> None:
    rng = np.random.default_rng(1)
    y2, p2 = all_classes(rng, 400), probabilities(rng, 400, 2, "dirichlet").astype(np.float32)
    assert_close(task_auroc(y2, p2, "binary"), roc_auc_score(y2, p2[:, 1]))
    y4 = rng.choice([0, 1, 2], 400)  # class 3 absent: scored over the present pairs
    p4 = probabilities(rng, 400, 4, "dirichlet")
    assert_close(task_auroc(y4, p4, "multiclass"),
                 roc_auc_score(y4, p4, multi_class="ovo", average="macro", labels=[0, 1, 2, 3]))
    yl = (rng.random((400, 30)) < 0.05).astype(np.int64)
    yl[:, :3] = 0
    pl = rng.random((400, 30))
    valid = valid_columns(yl)
    assert_close(task_auroc(yl, pl, "multilabel"), roc_auc_score(yl[:, valid], pl[:, valid], average="macro"))
    with pytest.raises(ValueError, match="kind must be one of"):
        task_auroc(y2, p2, "regression")
    with pytest.raises(ValueError, match=r"binary probs must be 1-d or \[n, 2\]"):
        task_auroc(y4, p4, "binary")


# ----------------------------------------------------------------------------------------- ROC curve
@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_matches_sklearn(seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    for n in (2, 3, 30, 500):
        y, s = all_classes(rng, n), scores(rng, n, kind)
        fpr, tpr, thresholds = roc_curve(y, s)
        sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(y, s)
        assert_close(fpr, sk_fpr)
        assert_close(tpr, sk_tpr)
        np.testing.assert_array_equal(thresholds, sk_thresholds)
        np.testing.assert_array_equal(roc_curve(y, np.stack([1 - s, s], axis=1))[1], tpr)


# ------------------------------------------------------------------------------------ average precision
@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn(seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    for n in (2, 3, 40, 1000):
        y, s = all_classes(rng, n), scores(rng, n, kind)
        assert_close(average_precision(y, s), average_precision_score(y, s))
        assert_close(average_precision(y, np.stack([1 - s, s], axis=1)), average_precision_score(y, s))
    y = (rng.random((300, 20)) < rng.random(20) * 0.3).astype(np.int64)
    y[:, 0], y[:, 1] = 0, 1  # sklearn scores a label without positives as 0 (and we do too)
    s = scores(rng, (300, 20), kind)
    for average in ("macro", "micro", "weighted", None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            expected = average_precision_score(y, s, average=average)
        assert_close(average_precision(y, s, average=average), expected)
    y3, p3 = all_classes(rng, 200, 3), probabilities(rng, 200, 3, "tied")
    for average in ("macro", "micro", "weighted", None):
        assert_close(average_precision(y3, p3, average=average), average_precision_score(y3, p3, average=average))


# ------------------------------------------------------------------------------------------------- F1
@pytest.mark.parametrize("seed", range(6))
def test_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for n in (2, 5, 300):
            y, s = all_classes(rng, n), np.round(rng.random(n), 1)
            for threshold in (0.3, 0.5):
                assert_close(f1(y, s, threshold=threshold), f1_score(y, (s >= threshold).astype(int)))
            p = np.stack([1 - s, s], axis=1)
            assert_close(f1(y, p), f1_score(y, p.argmax(axis=1)))
            y_pred = rng.integers(0, 2, n)
            for average in ("binary", "macro", "micro", "weighted", None):
                assert_close(f1(y, y_pred, average=average), f1_score(y, y_pred, average=average))
        y = rng.choice([0, 1, 3], 200)  # class 2 of 4 absent from y_true
        p = probabilities(rng, 200, 4, "tied")
        y_pred = p.argmax(axis=1)
        for average in ("macro", "micro", "weighted", None):
            assert_close(f1(y, p, average=average, labels=[0, 1, 2, 3]), f1_score(y, y_pred, average=average))
            assert_close(f1(y, y_pred, average=average), f1_score(y, y_pred, average=average))
        y = (rng.random((150, 12)) < 0.2).astype(np.int64)
        y[:, 0] = 0
        s = np.round(rng.random((150, 12)), 1)
        s[:, 1] = 0.0  # a label never predicted
        for average in ("macro", "micro", "weighted", None):
            assert_close(f1(y, s, average=average), f1_score(y, (s >= 0.5).astype(int), average=average))
            assert_close(f1(y, s, average=average, threshold=0.2), f1_score(y, (s >= 0.2).astype(int), average=average))
        zeros = np.zeros((4, 3), dtype=np.int64)
        for average in ("macro", "micro", "weighted"):
            assert_close(f1(zeros, zeros, average=average), f1_score(zeros, zeros, average=average))
        assert f1([0, 0], [0, 0]) == f1_score([0, 0], [0, 0]) == 0.0


# ------------------------------------------------------------------------------------------ bootstrap
def binary_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A binary task with some signal: positive scores shifted up."""
    rng = np.random.default_rng(seed)
    y = all_classes(rng, n)
    return y, rng.standard_normal(n) + 0.8 * y


def test_bootstrap_equals_a_resampling_loop_scored_by_sklearn() -> None:
    y, s = binary_sample(60, 0)
    y[:3], y[3:] = 1, 0  # rare positives: about 5% of resamples have none and are skipped
    rng, values = np.random.default_rng(7), []
    for _ in range(400):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(y):
            values.append(roc_auc_score(y[idx], s[idx]))
    assert 350 < len(values) < 400
    assert_close(bootstrap_ci(y, s, n_boot=400, seed=7), np.quantile(values, [0.025, 0.975]))


def test_bootstrap_is_deterministic_contains_the_estimate_and_widens_with_fewer_samples() -> None:
    y, s = binary_sample(2000, 1)
    ci = bootstrap_ci(y, s, n_boot=300, seed=3)
    assert ci == bootstrap_ci(y, s, n_boot=300, seed=3)
    assert ci != bootstrap_ci(y, s, n_boot=300, seed=4)
    assert ci[0] < roc_auc(y, s) < ci[1]
    small = bootstrap_ci(y[:100], s[:100], n_boot=300, seed=3)
    assert small[1] - small[0] > 2 * (ci[1] - ci[0])
    narrow = bootstrap_ci(y, s, n_boot=300, seed=3, alpha=0.5)
    assert ci[0] < narrow[0] < narrow[1] < ci[1]


def test_bootstrap_other_metrics_and_keywords() -> None:
    rng = np.random.default_rng(2)
    y, p = all_classes(rng, 300, 4), probabilities(rng, 300, 4, "dirichlet")
    low, high = bootstrap_ci(y, p, n_boot=50, multi_class="ovo")
    assert low <= roc_auc(y, p, multi_class="ovo") <= high
    yl = (rng.random((300, 40)) < 0.1).astype(np.int64)
    sl = rng.random((300, 40)) + 0.3 * yl
    low, high = bootstrap_ci(yl, sl, n_boot=50)
    assert low < roc_auc(yl, sl) < high
    low, high = bootstrap_ci(yl, sl, metric=average_precision, n_boot=50, average="micro")
    assert low < average_precision(yl, sl, average="micro") < high


def test_bootstrap_skips_undefined_resamples_and_raises_past_half() -> None:
    y, s = binary_sample(20, 5)
    y[:] = 0
    y[0] = 1  # one positive: about 36% of resamples miss it and are skipped
    low, high = bootstrap_ci(y, s, n_boot=200)
    assert 0 <= low <= high <= 1

    def defined_every(k: int) -> Callable[[np.ndarray, np.ndarray], float]:
        """roc_auc, but undefined on each call after the first (the full sample) whose count k does not divide."""
        calls = 0

        def metric(y_true: np.ndarray, y_score: np.ndarray) -> float:
            nonlocal calls
            calls += 1
            if calls > 1 and calls % k:
                raise UndefinedMetricError("undefined here")
            return roc_auc(y_true, y_score)
        return metric

    y, s = binary_sample(200, 5)  # every resample is defined for roc_auc itself
    bootstrap_ci(y, s, metric=defined_every(2), n_boot=200)  # resample calls 2..201: 100 skipped, exactly half
    with pytest.raises(ValueError, match="undefined on 133 of 200 resamples"):
        bootstrap_ci(y, s, metric=defined_every(3), n_boot=200)


# --------------------------------------------------------------------------------------------- errors
THREE = np.array([0, 1, 2, 1])
P3 = np.full((4, 3), 1 / 3)


@pytest.mark.parametrize("call, error, match", [
    (lambda: roc_auc([1, 1, 1], [0.1, 0.2, 0.3]), UndefinedMetricError, "only one class"),
    (lambda: roc_auc([0, 1, 1], [0.1, 0.2]), ValueError, "same, non-zero number of samples"),
    (lambda: roc_auc([0, 1], [0.1, np.nan]), ValueError, "y_score must be finite"),
    (lambda: roc_auc([0, 1], ["a", "b"]), ValueError, "y_score must be numeric"),
    (lambda: roc_auc([0.2, 0.7], [0.1, 0.2]), ValueError, "class labels"),
    (lambda: roc_auc(np.array([[0, 2], [1, 0]]), np.zeros((2, 2))), ValueError, "only 0/1 values"),
    (lambda: roc_auc(np.array([[0, 1], [1, 0]]), np.zeros((2, 3))), ValueError, "must have y_true's shape"),
    (lambda: roc_auc(np.array([[0, 1], [0, 1]]), np.zeros((2, 2))), UndefinedMetricError, "no label"),
    (lambda: roc_auc(THREE, np.arange(4.0)), ValueError, "y_score is 1-d"),
    (lambda: roc_auc(THREE, np.full((4, 4), 0.25)), ValueError, "pass labels="),
    (lambda: roc_auc(THREE, P3 * 2), ValueError, "summing to 1"),
    (lambda: roc_auc(THREE, P3, average="samples"), ValueError, "average must be one of"),
    (lambda: roc_auc(THREE, P3, multi_class="raise"), ValueError, "multi_class must be one of"),
    (lambda: roc_auc(THREE, P3, multi_class="ovo", average=None), ValueError, r"average \(multi_class='ovo'\)"),
    (lambda: roc_auc(THREE, P3, labels=[2, 1, 0]), ValueError, "unique and sorted"),
    (lambda: roc_auc(THREE, P3, labels=[0, 1, 3]), ValueError, "missing from labels"),
    (lambda: roc_auc(np.zeros(4), P3, multi_class="ovo", labels=[0, 1, 2]), UndefinedMetricError, "only one class"),
    (lambda: roc_auc(np.zeros(4), P3, labels=[0, 1, 2]), UndefinedMetricError, r"classes \[0, 1, 2\]"),
    (lambda: roc_curve([0, 0], [0.1, 0.2]), UndefinedMetricError, "only one class"),
    (lambda: average_precision([0, 2], [0.1, 0.2]), ValueError, "only 0/1 values"),
    (lambda: f1(THREE, [0, 1, 2, 2]), ValueError, "needs 0/1 labels"),
    (lambda: f1(THREE, [0.1, 0.2, 0.3, 0.4], average="macro"), ValueError, "only 0/1 values"),
    (lambda: f1(np.eye(3), np.eye(3)), ValueError, "multi-label y_true takes average"),
    (lambda: bootstrap_ci(THREE, P3, average=None), ValueError, "metric must return a scalar"),
    (lambda: bootstrap_ci([0, 1], [0.1, 0.2], alpha=1.5), ValueError, "0 < alpha < 1"),
])
def test_errors_are_clear(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------- benchmark tool
def test_bench_metrics_runs_small(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    result = bench_metrics.main(["--n", "300", "--labels", "40", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["values_equal"] and 0 < result["valid_labels"] <= 40 and result["ours_s"] > 0
    assert "speed-up" in capsys.readouterr().out
