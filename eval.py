"""Evaluate trained task models the way the paper does: test AUROC with a 95% bootstrap CI, AUPRC, F1, ROC curves.

  python eval.py [RUN_DIR ...]           score the predictions train_task.py saved in each run folder (default:
                                         every task run one or two levels under --runs-dir) and write report.json,
                                         report.md and roc_<task>_<setting>.png to --out (default runs/report/)
  python eval.py --run RUN_DIR --test FILE
                                         score that run's model on a new labelled CSV/JSONL(.gz) file; writes
                                         predictions_<stem>.npz and eval_<stem>.json to the run folder (or --out)
  python eval.py --run RUN_DIR --predict FILE
                                         apply that run's model to unlabelled notes (CSV/JSONL(.gz)); writes
                                         predictions_<stem>.csv (id, then prob_<label> for each of the run's
                                         labels) and predictions_<stem>.npz, no metrics

Metrics (fractions in [0, 1] in JSON, percent in report.md):
  auroc      the paper's: binary on P(class 1); multi-class one-vs-one macro (LOS); multi-label macro over the
             labels with both classes present in the test split. null if undefined (one class in the test rows)
  ci_low/ci_high  95% percentile bootstrap over test rows (n_boot resamples of --n-boot, --seed)
  auprc      average precision: binary of class 1; multi-class one-vs-rest macro over the classes present;
             multi-label macro over the labels AUROC scores (labels_scored)
  f1         macro F1: single-label from the argmax class; multi-label from P >= 0.5, over the labels AUROC scores
  val_auroc  the paper's AUROC on predictions_val.npz
report.json:
  runs       one object per run: run_dir, task, column (PMV/MOR/LOS/DIAG/PROC or null), kind, setting, data,
             num_labels, n_test, labels_scored, auroc, ci_low, ci_high, n_boot, auprc, f1, val_auroc,
             trainable_params, trainable_percent, paper_auroc (MIMIC runs of a paper setting, else null), roc_png
  settings   one object per (setting, data): tasks, undefined_tasks, n_tasks, macro_auroc = the mean test AUROC
             over its tasks (the paper's headline "macro" when all five are there), paper_row, paper_macro_auroc
             (the paper's mean over the same tasks; MIMIC only)
  macro_auroc, best_setting  the macro of the setting group covering the most tasks (ties: the higher macro)
  skipped, ci  folders that are not task runs (DAPT); the CI method and seed
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from minilora.classify import load_classifier, predict
from minilora.cli import InputError, positive_int, run_cli, write_json_atomic
from minilora.files import read_json_object
from minilora.data.notes import clean_note
from minilora.data.synthetic import task_spec
from minilora.data.tasks import EncodedSplit, Split, id_columns, read_rows, split_codes, warn_duplicate_ids
from minilora.metrics import UndefinedMetricError, average_precision, bootstrap_ci, f1, roc_auc, roc_curve, task_auroc

KINDS = ("binary", "multiclass", "multilabel")
CI_LEVEL = 0.95
DEFAULT_BOOT = 1000
MANY_LABELS = 100  # multi-label tasks with more labels than this default to fewer resamples ...
MANY_LABELS_BOOT = 200  # ... as each resample sorts every label's scores (DIAG: ~0.4 s per resample)
CURVE_LABELS = 5  # most frequent labels drawn beside the micro-average curve of a multi-label task
REQUIRED_SUMMARY = ("task", "kind", "setting", "data")
PREDICTION_ARRAYS = ("ids", "y_true", "probs", "labels", "kind")

# Test AUROC (%) of Gema et al. (arXiv 2307.03042) on MIMIC-III as printed (docs/paper-notes.md).
PAPER_COLUMNS = ("PMV", "MOR", "LOS", "DIAG", "PROC")
PAPER_DATA = ("mimic", "mimic-iv")  # data whose runs get the paper's numbers beside them (DATA_NOTES says how)
PAPER_AUROC: dict[str, dict[str, float]] = {
    row: dict(zip(PAPER_COLUMNS + ("macro",), values)) for row, values in (
        ("BlueBERT", (53.12, 76.95, 66.36, 73.81, 77.70, 69.59)),
        ("LLaMA* (head only)", (51.38, 66.80, 57.65, 60.06, 63.83, 58.61)),
        ("LLaMA + LoRA", (51.65, 74.89, 65.70, 78.37, 87.49, 71.62)),
        ("LLaMA + Clinical LoRA (frozen) + Downstream LoRA", (51.11, 66.00, 58.04, 60.46, 65.30, 60.18)),
        ("LLaMA + Clinical LoRA (trainable)", (55.76, 74.81, 64.83, 76.07, 82.76, 70.85)),
        ("LLaMA + Clinical LoRA (trainable) + Downstream LoRA", (56.72, 77.36, 66.32, 78.52, 87.15, 73.21)),
        ("PMC-LLaMA + LoRA", (53.84, 78.03, 66.14, 78.81, 86.68, 72.70)),
    )
}
TASK_COLUMNS = {"pmv": "PMV", "mortality": "MOR", "mor": "MOR", "los": "LOS", "diagnoses": "DIAG", "diag": "DIAG",
                "procedures": "PROC", "proc": "PROC"}
DATA_NOTES = {
    "mimic": "Data: MIMIC; the paper's test AUROC (MIMIC-III) is shown beside ours, matched by setting and task.",
    "mimic-iv": "Data: MIMIC-IV (tasks built by tools/mimic4_tasks.py). The paper's test AUROC (MIMIC-III) is shown "
                "beside ours by setting and task, for reference: the task definitions are van Aken's, but the "
                "database, its patients and coding differ (and DIAG/PROC use ICD-10 codes if built with --icd 10).",
    "demo": "Data: synthetic demo data (minilora's generator). These numbers are NOT comparable to the paper's "
            "(MIMIC-III); its table is below for reference only.",
    "custom": "Data: custom files. These numbers are not directly comparable to the paper's (MIMIC-III); its "
              "table is below for reference only.",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run folders written by train_task.py, or folders holding them (default: --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where to look for runs when no RUN_DIR is given (default "
                   "%(default)s)")
    p.add_argument("--out", default=None,
                   help="output folder (default: <runs-dir>/report; with --test or --predict: the run folder)")
    p.add_argument("--n-boot", type=positive_int, default=None,
                   help=f"bootstrap resamples for the 95%% CI (default {DEFAULT_BOOT}; {MANY_LABELS_BOOT} for "
                        f"multi-label tasks with over {MANY_LABELS} labels)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("scoring a trained model on new data (--run with --test or --predict)")
    g.add_argument("--run", default=None, help="a train_task.py run folder (head/, task_adapter/, summary.json)")
    g.add_argument("--test", default=None, help="labelled CSV or JSONL(.gz) file to score")
    g.add_argument("--predict", default=None, metavar="FILE",
                   help="unlabelled CSV or JSONL(.gz) file to apply the model to (a label column is ignored)")
    g.add_argument("--text-col", default=None, help="text column / JSON field (default: the run's --text-col for "
                   "a custom task, else text)")
    g.add_argument("--label-col", default=None, help="label column / JSON field (codes joined by --label-sep; "
                   "default: a custom task's --label-col; a named task's column, e.g. short_codes for diagnoses, "
                   "when the file has it, else label)")
    g.add_argument("--id-col", default=None, help="id column (default: the run's for a custom task, else id; "
                   "absent: <file>:<line>)")
    g.add_argument("--label-sep", default=None, help="separator of multi-label codes (default: the run's, else ,)")
    g.add_argument("--max-seq-len", type=positive_int, default=None, help="tokens per note (default: the run's)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="inference batch (default: the run's)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: the run's")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    return p


# ------------------------------------------------------------------------------------------------ inputs
def read_summary(run: Path) -> dict:
    """A run's summary.json as a dict (an error names the file when it is not JSON)."""
    return read_json_object(run / "summary.json")


def check_summary(summary: dict, path: Path) -> None:
    """Every field eval needs is present and the kind is known."""
    missing = [k for k in REQUIRED_SUMMARY if k not in summary]
    if missing:
        raise InputError(f"{path}: no field {missing[0]!r} (expected {', '.join(REQUIRED_SUMMARY)})")
    if summary["kind"] not in KINDS:
        raise InputError(f"{path}: kind {summary['kind']!r}, expected one of {', '.join(KINDS)}")


def find_runs(run_dirs: list[str], runs_dir: Path) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """(task runs with their summaries, skipped non-task runs) among the given folders or under ``runs_dir``;
    a folder without summary.json is searched one and two levels down. Two runs of one task, setting and data
    is an error."""
    roots = [Path(d) for d in run_dirs] or [runs_dir]
    found: list[Path] = []
    for root in roots:
        if not root.is_dir():
            what = "run folder" if run_dirs else "runs folder (--runs-dir)"
            raise FileNotFoundError(f"{root}: no such {what}; train_task.py writes one run folder per task")
        if (root / "summary.json").is_file():
            found.append(root)
        else:
            found += [s.parent for pattern in ("*/summary.json", "*/*/summary.json") for s in sorted(root.glob(pattern))
                      if not any(part.startswith(".") for part in s.relative_to(root).parts)]
    runs, skipped = [], []
    seen: dict[tuple[str, str, str], Path] = {}  # (task, setting, data): one run each, as the macro needs
    unique: dict[Path, Path] = {}
    for run in found:  # one folder reached by two paths (a symlink) is one run
        unique.setdefault(run.resolve(), run)
    for run in unique.values():
        summary = read_summary(run)
        if "task" not in summary:
            print(f"skipping {run}: not a task run (summary.json has no 'task'; a train_dapt.py run?)", file=sys.stderr)
            skipped.append(run)
            continue
        check_summary(summary, run / "summary.json")
        key = (str(summary["task"]), str(summary["setting"]), str(summary["data"]))
        if key in seen:
            fix = ("report each in its own call with its own --out (one run per task and setting makes the macro)"
                   if run_dirs else "pass the run folders to report (eval.py RUN ...)")
            raise InputError(f"two runs of task {key[0]!r} with setting {key[1]!r} on {key[2]} data: {seen[key]} and "
                             f"{run}; {fix}")
        seen[key] = run
        runs.append((run, summary))
    if not runs:
        where = ", ".join(map(str, roots))
        extra = f"; skipped {len(skipped)} non-task run(s)" if skipped else ""
        raise InputError(f"no task runs found in {where} (looked for summary.json with a 'task' field in the folder "
                         f"and one or two levels below{extra}); train_task.py writes one folder per task with "
                         f"summary.json and predictions_val.npz / predictions_test.npz")
    return runs, skipped


def load_predictions(path: Path, kind: str) -> dict[str, Any]:
    """ids, y_true, probs, labels of a predictions npz, checked against each other and the run's ``kind``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: cannot read it as a numpy .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in PREDICTION_ARRAYS if k not in arrays]
    if missing:
        raise InputError(f"{path}: no array {missing[0]!r} (has {', '.join(arrays) or 'none'}; expected "
                         f"{', '.join(PREDICTION_ARRAYS)})")
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise InputError(f"{path}: array {k!r} is not a valid .npy member")
    ids, y, probs, labels = arrays["ids"], arrays["y_true"], arrays["probs"], arrays["labels"]
    file_kind = str(arrays["kind"][()]) if arrays["kind"].ndim == 0 else None
    if file_kind != kind:
        raise InputError(f"{path}: kind is {file_kind!r} but summary.json says {kind!r}")
    n = len(y) if y.ndim else 0
    if probs.dtype.kind != "f" or probs.ndim != 2 or len(probs) != n or n == 0 or ids.shape != (n,):
        raise InputError(f"{path}: expected ids [n], y_true [n] or [n, L] and float probs [n, K] with n > 0, got "
                         f"shapes {ids.shape}, {y.shape}, {probs.shape} (probs dtype {probs.dtype})")
    if labels.ndim != 1 or labels.size != probs.shape[1]:
        raise InputError(f"{path}: labels has shape {labels.shape} but probs has {probs.shape[1]} columns")
    if not np.isfinite(probs).all():
        raise InputError(f"{path}: probs holds NaN or inf")
    if kind == "multilabel":
        if y.shape != probs.shape:
            raise InputError(f"{path}: multi-label y_true has shape {y.shape}, expected probs' shape {probs.shape}")
        if y.dtype.kind not in "biu" or ((y != 0) & (y != 1)).any():
            raise InputError(f"{path}: multi-label y_true must be 0/1 (multi-hot)")
    else:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise InputError(f"{path}: {kind} y_true must be integer class indices [n], got {y.dtype} {y.shape}")
        bad = y[(y < 0) | (y >= probs.shape[1])]
        if bad.size:
            raise InputError(f"{path}: y_true holds class {int(bad[0])} but probs has {probs.shape[1]} columns")
        if kind == "binary" and probs.shape[1] != 2:
            raise InputError(f"{path}: binary probs must have 2 columns, got {probs.shape[1]}")
        if not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
            raise InputError(f"{path}: {kind} probs rows must be softmax probabilities summing to 1")
    return {"ids": ids, "y_true": y, "probs": probs, "labels": [str(x) for x in labels]}


# ----------------------------------------------------------------------------------------------- metrics
def scored_columns(y_true: np.ndarray, kind: str, num_labels: int) -> np.ndarray:
    """Which classes / labels the macro metrics average over: classes present (single-label), labels with both
    classes present (multi-label, the paper's AUROC convention)."""
    if kind == "multilabel":
        positives = y_true.sum(axis=0)
        return (positives > 0) & (positives < len(y_true))
    return np.bincount(y_true, minlength=num_labels) > 0


def default_n_boot(kind: str, num_labels: int) -> int:
    return MANY_LABELS_BOOT if kind == "multilabel" and num_labels > MANY_LABELS else DEFAULT_BOOT


def score(y_true: np.ndarray, probs: np.ndarray, kind: str, n_boot: int, seed: int, where: str,
          progress: bool, in_macro: bool = True) -> dict[str, Any]:
    """Test AUROC with its bootstrap CI, macro AUPRC and macro F1 of one prediction set. Where AUROC is undefined
    (one class in the test rows) the metrics are None; where over half the resamples are, the CI is None."""
    cols = scored_columns(y_true, kind, probs.shape[1])
    out = {"auroc": None, "ci_low": None, "ci_high": None, "n_boot": n_boot, "auprc": None, "f1": None,
           "n_test": len(y_true), "labels_scored": int(cols.sum())}
    try:
        out["auroc"] = task_auroc(y_true, probs, kind)
    except UndefinedMetricError as e:
        print(f"{where}: test AUROC undefined ({e})" + ("; left out of the macro" if in_macro else ""),
              file=sys.stderr)
        return out
    with tqdm(total=n_boot + 1, desc=f"bootstrap {where}", unit="resample", delay=2.0, leave=False,
              disable=None if progress else True) as bar:
        def counted(y: np.ndarray, p: np.ndarray, kind: str) -> float:
            bar.update()
            return task_auroc(y, p, kind)

        try:
            out["ci_low"], out["ci_high"] = bootstrap_ci(y_true, probs, metric=counted, n_boot=n_boot,
                                                         alpha=1 - CI_LEVEL, seed=seed, kind=kind)
        except ValueError as e:  # the inputs passed task_auroc: AUROC was undefined on most resamples
            print(f"{where}: no bootstrap CI ({e})", file=sys.stderr)
    if kind == "binary":
        out["auprc"] = average_precision(y_true, probs[:, 1])
        out["f1"] = f1(y_true, probs, average="macro", labels=np.arange(2))
    elif kind == "multiclass":
        ap = average_precision(y_true, probs, average=None, labels=np.arange(probs.shape[1]))
        out["auprc"] = float(ap[cols].mean())
        out["f1"] = f1(y_true, probs, average="macro", labels=np.arange(probs.shape[1]))
    else:
        out["auprc"] = average_precision(y_true[:, cols], probs[:, cols], average="macro")
        out["f1"] = f1(y_true[:, cols], probs[:, cols], average="macro", threshold=0.5)
    return out


def paper_row(setting: str) -> str | None:
    """The paper's table row for a setting name: "LoRA" and "LLaMA + LoRA" both match "LLaMA + LoRA"; case,
    punctuation, a leading "LLaMA"/"LLaMA*" and the word "Downstream" are ignored."""
    def key(name: str) -> str:
        name = re.sub(r"^llama\*?\s*\+?\s*", "", name.lower()).replace("downstream ", "")
        return " ".join(re.findall(r"[a-z0-9+]+", name.replace("-", " ")))

    return next((row for row in PAPER_AUROC if key(row) == key(setting)), None)


def evaluate_run(run: Path, summary: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """(report row, test predictions) of one task run."""
    kind, task = summary["kind"], str(summary["task"])
    test_path = run / "predictions_test.npz"
    if not test_path.is_file():
        raise InputError(f"{run}: missing predictions_test.npz (train_task.py writes predictions_val.npz and "
                         f"predictions_test.npz when training ends; was the run interrupted?)")
    pred = load_predictions(test_path, kind)
    n_boot = args.n_boot or default_n_boot(kind, len(pred["labels"]))
    if args.n_boot is None and n_boot != DEFAULT_BOOT:
        print(f"{run}: {len(pred['labels'])} labels, so {n_boot} bootstrap resamples (set --n-boot to change)",
              file=sys.stderr)
    row = {"run_dir": str(run), "task": task, "column": TASK_COLUMNS.get(task.lower()), "kind": kind,
           "setting": str(summary["setting"]), "data": str(summary["data"]), "num_labels": len(pred["labels"])}
    row.update(score(pred["y_true"], pred["probs"], kind, n_boot, args.seed, str(run), not args.no_progress))
    val_path = run / "predictions_val.npz"
    if val_path.is_file():
        val = load_predictions(val_path, kind)
        try:
            row["val_auroc"] = task_auroc(val["y_true"], val["probs"], kind)
        except UndefinedMetricError as e:
            print(f"{val_path}: val AUROC undefined ({e})", file=sys.stderr)
            row["val_auroc"] = None
    else:
        print(f"{run}: no predictions_val.npz; val_auroc from summary.json", file=sys.stderr)
        row["val_auroc"] = summary.get("val_auroc")
    recorded = summary.get("test_auroc")
    if isinstance(recorded, (int, float)) and row["auroc"] is not None and abs(recorded - row["auroc"]) > 1e-6:
        print(f"note: {run}: summary.json test_auroc {recorded:.6f} differs from the recomputed {row['auroc']:.6f}",
              file=sys.stderr)
    row["trainable_params"] = summary.get("trainable_params")
    row["trainable_percent"] = summary.get("trainable_percent")
    paper = PAPER_AUROC.get(paper_row(row["setting"]) or "", {})
    row["paper_auroc"] = paper[row["column"]] / 100 if row["data"] in PAPER_DATA and row["column"] in paper \
        else None
    return row, pred


def group_settings(rows: list[dict]) -> list[dict]:
    """One group per (setting, data): its tasks and macro AUROC (mean over the tasks with a defined AUROC), and the
    paper's mean over the same tasks for MIMIC groups."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["data"]), []).append(r)
    out = []
    for (setting, data), members in groups.items():
        scored = [r for r in members if r["auroc"] is not None]
        paper = [r["paper_auroc"] for r in scored]
        out.append({
            "setting": setting, "data": data, "paper_row": paper_row(setting), "tasks": [r["task"] for r in scored],
            "undefined_tasks": [r["task"] for r in members if r["auroc"] is None], "n_tasks": len(scored),
            "macro_auroc": float(np.mean([r["auroc"] for r in scored])) if scored else None,
            "paper_macro_auroc": float(np.mean(paper)) if data in PAPER_DATA and paper and None not in paper
            else None,
        })
    return out


def sort_rows(rows: list[dict]) -> list[dict]:
    """Paper order: settings as the paper's rows (others after, by name), tasks as its columns (others after)."""
    setting_rank = {row: i for i, row in enumerate(PAPER_AUROC)}

    def key(r: dict) -> tuple:
        s = setting_rank.get(paper_row(r["setting"]) or "", len(setting_rank))
        c = PAPER_COLUMNS.index(r["column"]) if r["column"] else len(PAPER_COLUMNS)
        return s, r["setting"], r["data"], c, r["task"]

    return sorted(rows, key=key)


# ------------------------------------------------------------------------------------------------ outputs
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def plot_roc(pred: dict, row: dict, path: Path) -> Path:
    """ROC curves of one run: binary one curve; multi-class one-vs-rest per class; multi-label the micro-average
    and the most frequent labels; with the chance diagonal. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p, labels, kind = pred["y_true"], pred["probs"], pred["labels"], row["kind"]
    ci = f" [{100 * row['ci_low']:.2f}, {100 * row['ci_high']:.2f}]"
    curves: list[tuple[np.ndarray, np.ndarray, str]] = []  # (targets, scores, legend name)
    if kind == "binary":
        curves.append((y, p[:, 1], f"P(class {labels[1]})"))
        scope = ""
    elif kind == "multiclass":
        curves += [(y == k, p[:, k], f"class {labels[k]} vs rest") for k in range(p.shape[1]) if (y == k).any()]
        scope = " (one-vs-one macro)"
    else:
        curves.append((y.ravel(), p.ravel(), "micro-average"))
        cols = np.flatnonzero(scored_columns(y, kind, p.shape[1]))
        frequent = cols[np.argsort(-y[:, cols].sum(axis=0), kind="stable")[:CURVE_LABELS]]
        curves += [(y[:, k], p[:, k], f"{labels[k]} (prevalence {y[:, k].mean():.1%})") for k in frequent]
        scope = f" (macro over {row['labels_scored']} labels)"
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for i, (target, s, name) in enumerate(curves):
        try:
            fpr, tpr, _ = roc_curve(target, s)
            auc = roc_auc(target, s)
        except UndefinedMetricError:
            continue
        main = i == 0 and kind != "multiclass"
        ax.plot(fpr, tpr, lw=2 if main else 1, linestyle=("-", "-.", ":")[i // 10 % 3],  # colours repeat after 10
                label=f"{name}: AUROC {100 * auc:.2f}%" + (ci if kind == "binary" else ""))
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    ax.set_title(f"{row['column'] or row['task']} - {row['setting']} ({row['data']})\n"
                 f"test AUROC{scope} {100 * row['auroc']:.2f}%{ci}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def auroc_cell(r: dict) -> str:
    """Test AUROC % with its CI, or why there is none."""
    if r["auroc"] is None:
        return "undefined (one class in test)"
    return pct(r["auroc"]) + (" [no CI]" if r["ci_low"] is None else f" [{pct(r['ci_low'])}, {pct(r['ci_high'])}]")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; a "|" in a cell (a task or folder name) is escaped so it stays in its column."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def render_markdown(rows: list[dict], groups: list[dict], seed: int) -> tuple[str, str]:
    """(results section, paper reference section) of report.md."""
    custom = sorted({r["task"] for r in rows if r["column"] is None})
    columns = [c for c in PAPER_COLUMNS if any(r["column"] == c for r in rows)] + custom
    datas = sorted({r["data"] for r in rows})
    lines = ["# Evaluation report", ""]
    lines += [line for d in datas for line in (DATA_NOTES.get(d, f"Data: {d}."), "")][:-1]
    boots = sorted({r["n_boot"] for r in rows})
    lines += ["", f"Test AUROC in %, with a {CI_LEVEL:.0%} percentile-bootstrap CI over test rows "
              f"({'/'.join(map(str, boots))} resamples, seed {seed}). AUROC as the paper: binary on P(class 1), "
              "LOS one-vs-one macro, multi-label macro over labels with both classes in the test split. Macro = "
              "mean over the tasks of a setting (the paper's headline uses all five).", "",
              "## AUROC % by setting", ""]
    table = []
    for g in groups:
        by_col = {r["column"] or r["task"]: r for r in rows if (r["setting"], r["data"]) == (g["setting"], g["data"])}
        cells = [("undefined" if by_col[c]["auroc"] is None else pct(by_col[c]["auroc"])) if c in by_col else "-"
                 for c in columns]
        table.append([g["setting"], g["data"], *cells, f"{pct(g['macro_auroc'])} ({g['n_tasks']} task{'s' * (g['n_tasks'] != 1)})"])
        if g["data"] in PAPER_DATA and g["paper_row"]:
            paper = PAPER_AUROC[g["paper_row"]]
            table.append([f"paper: {g['paper_row']}", "MIMIC-III",
                          *[f"{paper[c]:.2f}" if c in paper else "-" for c in columns],
                          f"{100 * g['paper_macro_auroc']:.2f} (same tasks)" if g["paper_macro_auroc"] else "-"])
    lines += md_table(["setting", "data", *columns, "macro"], table)
    show_paper = any(r["paper_auroc"] is not None for r in rows)
    lines += ["", "## Runs", ""]
    header = ["setting", "task", "data", "n test", "AUROC % [95% CI]"] + (["paper %"] if show_paper else []) + \
        ["val AUROC %", "AUPRC %", "F1 %", "trainable params", "run"]
    table = []
    for r in rows:
        params = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        table.append([r["setting"], r["column"] or r["task"], r["data"], f"{r['n_test']:,}",
                      auroc_cell(r),
                      *([pct(r["paper_auroc"])] if show_paper else []), pct(r["val_auroc"]), pct(r["auprc"]),
                      pct(r["f1"]), params, f"`{r['run_dir']}`"])
    lines += md_table(header, table)
    lines += ["", "AUPRC: binary of class 1, otherwise macro over the classes present / the labels AUROC scores. "
              "F1: macro; argmax class for single-label, P >= 0.5 for multi-label.", ""]
    ref = ["## Paper results (reference)", "",
           "Gema et al., arXiv 2307.03042: test AUROC % on MIMIC-III (clinical outcome prediction from admission "
           "notes; PMV from BEEP).", ""]
    ref += md_table(["model", *PAPER_COLUMNS, "macro"],
                    [[row, *[f"{v:.2f}" for v in values.values()]] for row, values in PAPER_AUROC.items()])
    for row, values in PAPER_AUROC.items():
        mean = np.mean([values[c] for c in PAPER_COLUMNS])
        if abs(mean - values["macro"]) > 0.01:
            ref += ["", f"Note: the paper's macro for {row} ({values['macro']:.2f}) is not the mean of its five "
                        f"columns ({mean:.2f}); the table shows the paper's numbers as printed."]
    return "\n".join(lines), "\n".join(ref) + "\n"


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def report(args: argparse.Namespace) -> int:
    """Score every task run, write report.json, report.md and the ROC PNGs, print the tables."""
    out = Path(args.out or Path(args.runs_dir) / "report")
    runs, skipped = find_runs(args.run_dirs, Path(args.runs_dir))
    scored = [evaluate_run(run, summary, args) for run, summary in runs]
    rows = sort_rows([row for row, _ in scored])
    groups = group_settings(rows)
    several_data = len({r["data"] for r in rows}) > 1
    for row, pred in scored:
        name = f"roc_{slug(row['task'])}_{slug(row['setting'])}" + (f"_{slug(row['data'])}" if several_data else "")
        row["roc_png"] = None if row["auroc"] is None else plot_roc(pred, row, out / f"{name}.png").name
    best = max((g for g in groups if g["n_tasks"]), key=lambda g: (g["n_tasks"], g["macro_auroc"]), default=None)
    write_json_atomic(out / "report.json", {
        "macro_auroc": best and best["macro_auroc"],
        "best_setting": best and {"setting": best["setting"], "data": best["data"], "n_tasks": best["n_tasks"]},
        "settings": groups,
        "runs": rows,
        "skipped": [str(s) for s in skipped],
        "ci": {"level": CI_LEVEL, "method": "percentile bootstrap over test rows", "seed": args.seed},
    })
    results, reference = render_markdown(rows, groups, args.seed)
    write_text_atomic(out / "report.md", results + "\n" + reference)
    print(results)
    plots = {r["roc_png"] for r in rows if r["roc_png"] is not None}
    for stale in out.glob("roc_*.png"):  # an earlier report's plots of runs not in this one
        if stale.name not in plots:
            stale.unlink()
    print(f"report: {out / 'report.md'}, {out / 'report.json'}; {len(plots)} ROC plots in {out}")
    return 0


# ---------------------------------------------------------------------------------------- new labelled data
def file_stem(path: Path) -> str:
    """``x`` for x.csv, x.csv.gz, x.jsonl.gz."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.rsplit(".", 1)[0] if "." in name else name


def default_label_col(path: Path, task: str) -> str:
    """The label column of a named task's files (van Aken's ``short_codes``, say) when ``path`` has it, else
    ``label`` (the two-column re-uploads and custom files)."""
    try:
        column = task_spec(task).label_column
    except ValueError:
        return "label"
    for _, rec in read_rows(path, []):
        return column if column in rec else "label"
    return "label"


def required_id(args: argparse.Namespace) -> list[str]:
    """The id column a file must have: one asked for by --id-col (not one taken from the run's settings)."""
    return [] if getattr(args, "id_col_optional", False) else id_columns(args.id_col)


def read_labelled(path: Path, labels: list[str], kind: str, args: argparse.Namespace) -> tuple[Split, dict]:
    """The rows of a labelled file mapped to the run's label vocabulary; (split, counts). Empty texts are skipped;
    single-label rows with an unknown label are left out, unknown multi-label codes dropped; all are counted."""
    index = {lab: i for i, lab in enumerate(labels)}
    ids, texts, targets, raw = [], [], [], []
    counts = {"rows": 0, "empty_text": 0, "unknown_labels": 0}
    unknown: set[str] = set()
    unmatched = 0  # rows whose label (codes) the run has none of
    for line, rec in read_rows(path, [args.text_col, args.label_col, *required_id(args)]):
        text = clean_note(rec[args.text_col] or "")
        value = (rec[args.label_col] or "").strip()
        if not text:
            counts["empty_text"] += 1
            continue
        if kind == "multilabel":
            codes = split_codes(value, args.label_sep)
            known = [index[c] for c in codes if c in index]
            unknown.update(c for c in codes if c not in index)
            counts["unknown_labels"] += len(codes) - len(known)
            unmatched += bool(codes) and not known
            target: Any = np.zeros(len(labels), dtype=np.uint8)
            target[known] = 1
        elif value not in index:
            counts["unknown_labels"] += 1
            unmatched += 1
            unknown.add(value)
            continue
        else:
            target = index[value]
        rid = rec.get(args.id_col) if args.id_col else None
        ids.append(rid if rid else f"{path.name}:{line}")
        texts.append(text)
        targets.append(target)
        raw.append(value)
    counts["rows"] = len(ids)
    warn_duplicate_ids(path, ids)
    if unknown:
        what = "label codes dropped" if kind == "multilabel" else "rows left out"
        # label values only where they look like codes: a wrong --label-col or a ragged row would put text here,
        # and when most rows have none of the run's labels the column is likely text (one-word notes look like codes)
        if 2 * unmatched > unmatched + len(ids):
            shown = f"{len(unknown)} distinct values not shown: most rows have none of them; is --label-col right?"
        else:
            codes = sorted(v for v in unknown if re.fullmatch(r"[\w.-]{1,20}", v))
            shown = ", ".join(codes[:5]) + (", ..." if len(codes) > 5 else "")
            hidden = len(unknown) - len(codes)
            shown += (", " if shown and hidden else "") + (f"{hidden} longer values not shown" if hidden else "")
        print(f"{path}: {counts['unknown_labels']} {what}: {args.label_col!r} values not among the run's "
              f"{len(labels)} labels ({shown})", file=sys.stderr)
    if counts["empty_text"]:
        print(f"{path}: {counts['empty_text']} rows with empty text skipped", file=sys.stderr)
    if not ids:
        raise InputError(f"{path}: no row with text and a label among the run's labels")
    if kind == "multilabel" and not any(t.any() for t in targets):
        raise InputError(f"{path}: no row has any of the run's {len(labels)} labels in {args.label_col!r} (codes "
                         f"split by {args.label_sep!r}); check --label-col and --label-sep")
    y = np.stack(targets) if kind == "multilabel" else np.array(targets, dtype=np.int64)
    return Split(ids, texts, y, raw), counts


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def read_unlabelled(path: Path, args: argparse.Namespace) -> tuple[list[str], list[str], int]:
    """(ids, cleaned texts, rows with empty text skipped) of a file of notes; any label column is ignored."""
    ids, texts, empty = [], [], 0
    for line, rec in read_rows(path, [args.text_col, *required_id(args)]):
        text = clean_note(rec[args.text_col] or "")
        if not text:
            empty += 1
            continue
        rid = rec.get(args.id_col) if args.id_col else None
        ids.append(rid if rid else f"{path.name}:{line}")
        texts.append(text)
    if empty:
        print(f"{path}: {empty} rows with empty text skipped", file=sys.stderr)
    if not ids:
        raise InputError(f"{path}: no row with text in {args.text_col!r}")
    warn_duplicate_ids(path, ids)
    return ids, texts, empty


def load_run(args: argparse.Namespace, path: Path) -> tuple[Path, dict, Path, str]:
    """(run folder, its summary, output folder, file stem) for scoring ``path`` with ``--run``, checked."""
    run = Path(args.run)
    if not (run / "summary.json").is_file():
        raise FileNotFoundError(f"{run / 'summary.json'}: missing (--run expects a train_task.py run folder)")
    summary = read_summary(run)
    if "task" not in summary:
        raise InputError(f"{run}: not a task run (summary.json has no 'task'); --run needs a train_task.py folder")
    check_summary(summary, run / "summary.json")
    if not isinstance(summary.get("labels"), list) or not isinstance(summary.get("config"), dict):
        raise InputError(f"{run / 'summary.json'}: expected 'labels' (list) and 'config' (object)")
    # the columns default to the run's own: a custom task's flags (train_task.py --train ...), else the named
    # task's files' layout
    cfg = summary["config"]
    custom = bool(cfg.get("train")) and not cfg.get("data_dir")
    explicit_id = args.id_col is not None
    for key, fallback in (("text_col", "text"), ("id_col", "id"), ("label_sep", ",")):
        if getattr(args, key) is None:
            setattr(args, key, cfg[key] if custom and isinstance(cfg.get(key), str) else fallback)
    if args.label_col is None and custom and cfg.get("label_col"):
        args.label_col = cfg["label_col"]
    args.id_col_optional = not explicit_id  # a run's id column that the file lacks: <file>:<line> ids, as for id
    out, stem = Path(args.out) if args.out else run, file_stem(path)
    if out.resolve() == run.resolve() and stem in ("val", "test"):
        raise InputError(f"{path}: its predictions would overwrite train_task.py's predictions_{stem}.npz in {run}; "
                         f"pass --out DIR")
    return run, summary, out, stem


def run_model(args: argparse.Namespace, run: Path, summary: dict, split: Split) -> np.ndarray:
    """The run's model (base, adapters, head) applied to ``split``: probabilities [n, labels]."""
    labels, cfg = summary["labels"], summary["config"]
    model, tok, _ = load_classifier(run, device=args.device)
    if model.num_labels != len(labels):
        raise InputError(f"{run}: the head has {model.num_labels} outputs but summary.json lists {len(labels)} labels")
    dataset = EncodedSplit(split, tok, args.max_seq_len or cfg.get("max_seq_len", 512))
    return predict(model, dataset, pad_id=tok.pad_id, batch_size=args.batch_size or cfg.get("batch_size", 16),
                   device=next(model.parameters()).device, precision=args.precision or cfg.get("precision", "bf16"),
                   progress=not args.no_progress and sys.stderr.isatty())


def predict_file(args: argparse.Namespace) -> int:
    """Apply a trained run's model to unlabelled notes; write the probabilities as CSV and npz."""
    path = Path(args.predict)
    run, summary, out, stem = load_run(args, path)
    kind, labels = summary["kind"], [str(x) for x in summary["labels"]]
    ids, texts, _ = read_unlabelled(path, args)
    targets = np.zeros((len(ids), len(labels)) if kind == "multilabel" else len(ids), dtype=np.int64)  # unused
    probs = run_model(args, run, summary, Split(ids, texts, targets, [""] * len(ids))).astype(np.float32)
    npz = write_npz_atomic(out / f"predictions_{stem}.npz", ids=np.asarray(ids, dtype=str), probs=probs,
                           labels=np.asarray(labels, dtype=str), kind=np.array(kind))
    csv_path = out / f"predictions_{stem}.csv"
    tmp = csv_path.with_name(f".{csv_path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *(f"prob_{lab}" for lab in labels)])
        w.writerows([rid, *(f"{p:.6g}" for p in row)] for rid, row in zip(ids, probs.tolist()))
    os.replace(tmp, csv_path)
    print(f"{summary['task']} ({summary['setting']}): {len(ids):,} notes of {path.name} scored; predictions in "
          f"{csv_path} and {npz.name}")
    return 0


def score_file(args: argparse.Namespace) -> int:
    """Predict a labelled file with a trained run's model; write its predictions and metrics, print AUROC + CI."""
    test = Path(args.test)
    run, summary, out, stem = load_run(args, test)
    kind, labels = summary["kind"], [str(x) for x in summary["labels"]]
    if args.label_col is None:
        args.label_col = default_label_col(test, summary["task"])
    split, counts = read_labelled(test, labels, kind, args)
    probs = run_model(args, run, summary, split)
    npz = write_npz_atomic(out / f"predictions_{stem}.npz", ids=np.asarray(split.ids, dtype=str), y_true=split.targets,
                           probs=probs.astype(np.float32), labels=np.asarray(labels, dtype=str), kind=np.array(kind))
    n_boot = args.n_boot or default_n_boot(kind, len(labels))
    metrics = score(split.targets, probs, kind, n_boot, args.seed, str(test), not args.no_progress, in_macro=False)
    write_json_atomic(out / f"eval_{stem}.json", {
        "run_dir": str(run), "file": str(test), "task": summary["task"], "kind": kind,
        "setting": summary["setting"], **metrics, "counts": counts,
        "ci": {"level": CI_LEVEL, "method": "percentile bootstrap over rows", "seed": args.seed},
    })
    print(f"{summary['task']} ({summary['setting']}) on {test.name}, n={metrics['n_test']:,}: AUROC % [95% CI] "
          f"{auroc_cell(metrics)}, AUPRC {pct(metrics['auprc'])}%, F1 {pct(metrics['f1'])}%; predictions in {npz}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.test is not None and args.predict is not None:
        raise InputError("give one of --test FILE (labelled: metrics) and --predict FILE (unlabelled), not both")
    if (args.run is None) != (args.test is None and args.predict is None):
        raise InputError("--run goes with --test or --predict: --run RUN_DIR --test FILE (or --predict FILE)")
    if args.run and args.run_dirs:
        raise InputError("give either RUN_DIRs (report) or --run with --test / --predict (score a file), not both")
    if args.n_boot is not None and args.n_boot < 1:
        raise InputError(f"--n-boot must be >= 1, got {args.n_boot}")
    if args.predict is not None:
        return predict_file(args)
    return score_file(args) if args.run else report(args)


if __name__ == "__main__":
    run_cli(main)
