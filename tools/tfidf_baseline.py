"""TF-IDF + logistic-regression baseline on a task, written as a run folder that eval.py reports beside the LLMs.

Same inputs as train_task.py (a named task with --data-dir, or --train/--val/--test); the regularisation C is
chosen on validation AUROC. Writes predictions_{val,test}.npz and summary.json (setting "TF-IDF + LR").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from minilora.cli import (
    TASK_RUN_OUTPUTS, InputError, check_out_folder, positive_int, remove_outputs, run_cli, write_json_atomic,
)
from minilora.data.tasks import load_named_task, load_task_files
from minilora.metrics import UndefinedMetricError, task_auroc

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="task name (mortality, los, pmv, diagnoses, procedures with "
                   "--data-dir; any name for --train/--val/--test)")
    p.add_argument("--data-dir", default=None, help="folder of a named task's van Aken (or mimic4_tasks.py) CSVs")
    p.add_argument("--train", help="custom task: training CSV/JSONL")
    p.add_argument("--val", help="custom task: validation CSV/JSONL")
    p.add_argument("--test", help="custom task: test CSV/JSONL")
    p.add_argument("--multilabel", action="store_true", help="custom task: the label column holds codes")
    p.add_argument("--text-col", default="text", help="custom task: text column (default %(default)s)")
    p.add_argument("--label-col", default="label", help="custom task: label column (default %(default)s)")
    p.add_argument("--out", required=True, help="run folder to write (eval.py reports it)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (else refused)")
    p.add_argument("--max-features", type=positive_int, default=50000,
                   help="TF-IDF vocabulary size, uni- and bigrams (default %(default)s)")
    args = p.parse_args(argv)
    if not args.data_dir and not (args.train and args.val and args.test):
        raise InputError("give --data-dir, or all of --train, --val and --test")
    check_out_folder(Path(args.out), TASK_RUN_OUTPUTS, resume=False, overwrite=args.overwrite, resumable=False)
    t0 = time.perf_counter()
    if args.data_dir:
        data, source = load_named_task(args.task, args.data_dir), "mimic"
    else:
        files = {"train": Path(args.train), "val": Path(args.val), "test": Path(args.test)}
        data = load_task_files(files, args.task, "multilabel" if args.multilabel else "multiclass",
                               args.text_col, args.label_col)
        if not args.multilabel and data.num_labels == 2:
            data.kind = "binary"
        source = "custom"
    vec = TfidfVectorizer(max_features=args.max_features, ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x = {s: (vec.fit_transform if s == "train" else vec.transform)(data.splits[s].texts) for s in ("train", "val", "test")}
    y = {s: data.splits[s].targets for s in x}

    def split_auroc(split: str, probs: np.ndarray) -> float | None:
        try:
            return task_auroc(y[split], probs, data.kind)
        except UndefinedMetricError as e:
            if split == "val":  # nothing to select C by
                raise InputError(f"{data.name}: the val split's AUROC is undefined ({e}); it needs both classes "
                                 "(a label with both classes for --multilabel)") from None
            print(f"warning: {split} AUROC is undefined ({e})", file=sys.stderr)
            return None

    best = None
    for c in (0.1, 1.0, 10.0):
        base = LogisticRegression(C=c, max_iter=2000, class_weight=None if data.kind == "multilabel" else "balanced")
        model = OneVsRestClassifier(base) if data.kind == "multilabel" else base
        model.fit(x["train"], y["train"])
        val = model.predict_proba(x["val"])
        score = split_auroc("val", val)
        if best is None or score > best[0]:
            best = (score, c, model, val)
    score, c, model, val = best
    test = model.predict_proba(x["test"])
    out = Path(args.out)
    if args.overwrite:  # the data have loaded and the model fitted: nothing of the earlier run goes for a typo
        remove_outputs(out, TASK_RUN_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    for split, probs in (("val", val), ("test", test)):
        tmp = out / f".predictions_{split}.tmp{os.getpid()}.npz"
        np.savez(tmp, ids=np.array(data.splits[split].ids), y_true=y[split], probs=probs.astype(np.float32),
                 labels=np.array(data.labels), kind=np.array(data.kind))
        os.replace(tmp, out / f"predictions_{split}.npz")
    summary = {"task": data.name, "kind": data.kind, "setting": "TF-IDF + LR", "data": source,
               "val_auroc": score, "test_auroc": split_auroc("test", test),
               "trainable_params": int(sum(e.coef_.size for e in getattr(model, "estimators_", [model]))),
               "trainable_percent": 100.0, "tokens_per_s": None, "wall_s": time.perf_counter() - t0,
               "labels": data.labels, "config": {**vars(args), "C": c}}
    write_json_atomic(out / "summary.json", summary)
    test_shown = "undefined" if summary["test_auroc"] is None else f"{summary['test_auroc']:.4f}"
    print(f"{data.name} TF-IDF + LR (C={c}): val AUROC {score:.4f}, test AUROC {test_shown}")
    return 0


if __name__ == "__main__":
    run_cli(main)
