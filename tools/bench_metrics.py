"""Benchmark multi-label macro AUROC: minilora.metrics.roc_auc against a per-label scikit-learn loop.

The data look like the DIAG task's test split: label prevalences falling off as a power law (so some labels have
no or only one class and are skipped) and float32 sigmoid scores. The scikit-learn loop scores the same valid
labels on pre-transposed, contiguous columns (the transposition is not timed). Both macro values and every
per-label value must agree within 1e-12; the target is a speed-up of at least 20x.
Usage: ``PYTHONPATH=. python tools/bench_metrics.py [--n 10000] [--labels 1266] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sklearn
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minilora.metrics import roc_auc  # noqa: E402

TARGET_SPEEDUP = 20.0
TOLERANCE = 1e-12


def make_data(n: int, labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 targets [n, labels] with power-law prevalences and float32 sigmoid scores that track them."""
    rng = np.random.default_rng(seed)
    prevalence = np.minimum(0.5, 0.4 * np.arange(1, labels + 1) ** -1.1)
    y = (rng.random((n, labels)) < prevalence).astype(np.int64)
    logits = np.log(prevalence / (1 - prevalence)) + 1.5 * y + rng.standard_normal((n, labels))
    return y, (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest wall time in seconds over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000, help="samples (default 10000, about DIAG's test split)")
    p.add_argument("--labels", type=int, default=1266, help="labels (default 1266, DIAG's 3-digit ICD-9 codes)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each side; the fastest counts (default 3)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--json", type=Path, help="write all numbers and versions here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    y, score = make_data(args.n, args.labels, args.seed)
    y_cols, score_cols = np.ascontiguousarray(y.T), np.ascontiguousarray(score.T)

    def sklearn_loop() -> np.ndarray:
        positives = y_cols.sum(axis=1)
        valid = np.flatnonzero((positives > 0) & (positives < args.n))
        return np.array([roc_auc_score(y_cols[j], score_cols[j]) for j in valid])

    ours_s, ours = best_of(lambda: roc_auc(y, score, average="macro"), args.repeats)
    sklearn_s, sk_per_label = best_of(sklearn_loop, args.repeats)
    per_label = roc_auc(y, score, average=None)
    valid = ~np.isnan(per_label)
    max_diff = float(np.max(np.abs(per_label[valid] - sk_per_label))) if valid.sum() == sk_per_label.size else np.inf
    macro_diff = abs(ours - float(np.mean(sk_per_label)))
    speedup = sklearn_s / ours_s
    equal = max(max_diff, macro_diff) <= TOLERANCE
    result = {
        "n": args.n, "labels": args.labels, "valid_labels": int(valid.sum()), "seed": args.seed,
        "repeats": args.repeats, "ours_s": ours_s, "sklearn_loop_s": sklearn_s, "speedup": speedup,
        "target_speedup": TARGET_SPEEDUP, "macro_auroc": ours, "macro_abs_diff": macro_diff,
        "per_label_max_abs_diff": max_diff, "values_equal": equal, "pass": equal and speedup >= TARGET_SPEEDUP,
        "numpy": np.__version__, "sklearn": sklearn.__version__, "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"multi-label macro AUROC, n={args.n}, labels={args.labels} ({result['valid_labels']} with both classes)")
    print(f"  minilora.metrics.roc_auc : {ours_s * 1e3:9.1f} ms   AUROC {ours:.15f}")
    print(f"  sklearn per-label loop   : {sklearn_s * 1e3:9.1f} ms   |diff| macro {macro_diff:.1e}, "
          f"per label max {max_diff:.1e}")
    print(f"  speed-up {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x), values equal within {TOLERANCE:g}: "
          f"{equal} -> {'PASS' if result['pass'] else 'FAIL'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["pass"] else 1)
