"""train_task.py end to end on a tiny random LLaMA: every task kind, stacked adapters, outputs and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from minilora.data.synthetic import TASKS, write_dapt_corpus, write_task_csvs
from minilora.metrics import task_auroc

FAST = ["--max-seq-len", "48", "--batch-size", "16", "--precision", "fp32", "--no-progress", "--workers", "1",
        "--epochs", "1"]


def run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    for task in TASKS:
        write_task_csvs(d, task, 160, seed=3)
    return d


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_and_writes_predictions(tiny_lm, task_dir, tmp_path, task):
    out = tmp_path / task
    run("train_task.py", "--task", task, "--data-dir", str(task_dir), "--model", str(tiny_lm), "--out", str(out),
        "--r", "4", "--alpha", "8", *FAST)
    summary = json.loads((out / "summary.json").read_text())
    spec = TASKS[task]
    assert summary["task"] == task and summary["kind"] == spec.kind and summary["setting"] == "LoRA"
    assert summary["data"] == "mimic" and summary["trainable_params"] > 0
    pred = np.load(out / "predictions_test.npz")
    with open(task_dir / spec.file("test"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(pred["ids"]) == len(rows) and list(pred["ids"]) == [r["id"] for r in rows]
    if spec.kind == "multilabel":
        assert pred["probs"].shape == pred["y_true"].shape == (len(rows), len(summary["labels"]))
        codes = [set(r["short_codes"].split(",")) for r in rows]
        for i, lab in enumerate(summary["labels"]):  # y_true is the multi-hot of the test codes
            assert [lab in c for c in codes] == pred["y_true"][:, i].astype(bool).tolist()
    else:
        assert pred["probs"].shape == (len(rows), spec.num_classes)
        assert np.allclose(pred["probs"].sum(1), 1.0, atol=1e-5)
        assert [summary["labels"][k] for k in pred["y_true"]] == [r[spec.label_column] for r in rows]
    assert summary["test_auroc"] == pytest.approx(task_auroc(pred["y_true"], pred["probs"], spec.kind), abs=1e-12)
    assert summary["val_auroc"] is None or 0.0 <= summary["val_auroc"] <= 1.0
    assert (out / "task_adapter" / "adapter_model.safetensors").is_file() and (out / "head" / "head.safetensors").is_file()
    assert json.loads((out / "head" / "head_config.json").read_text())["pooling"] == "last"  # the paper's, on real data


def test_stacked_domain_adapter_and_head_only(tiny_lm, task_dir, tmp_path):
    notes = write_dapt_corpus(tmp_path / "notes.jsonl", 30, seed=1)
    run("train_dapt.py", "--model", str(tiny_lm), "--notes", str(notes), "--out", str(tmp_path / "dapt"),
        "--max-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--max-seq-len", "48", "--precision", "fp32",
        "--no-progress", "--workers", "1")
    common = ["--task", "mortality", "--data-dir", str(task_dir), "--model", str(tiny_lm), *FAST,
              "--domain-adapter", str(tmp_path / "dapt" / "adapter")]
    run("train_task.py", *common, "--out", str(tmp_path / "frozen"))
    run("train_task.py", *common, "--out", str(tmp_path / "trainable"), "--domain-trainable")
    run("train_task.py", *common, "--out", str(tmp_path / "head"), "--no-task-adapter", "--no-domain-adapter")
    # --domain-trainable with no domain adapter to train: refused (before: ignored, the run labelled "LoRA")
    refused = run("train_task.py", *common, "--out", str(tmp_path / "none"), "--no-domain-adapter",
                  "--domain-trainable", check=False)
    assert refused.returncode == 2 and "--domain-trainable: no domain adapter to train" in refused.stderr
    s = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in ("frozen", "trainable", "head")}
    assert s["frozen"]["setting"] == "Clinical LoRA (frozen) + LoRA"
    assert s["trainable"]["setting"] == "Clinical LoRA (trainable) + LoRA"
    assert s["head"]["setting"] == "head-only"
    assert s["head"]["trainable_params"] == 2 * 32  # the bias-free head only: 2 classes x hidden 32
    assert s["trainable"]["trainable_params"] > s["frozen"]["trainable_params"] > s["head"]["trainable_params"]
    assert (tmp_path / "trainable" / "domain_adapter").is_dir() and not (tmp_path / "frozen" / "domain_adapter").exists()
    # the frozen setting again, into the trainable run's folder: refused without --overwrite (nothing touched); with
    # it, nothing of that run is used (its trained domain adapter is gone), so it predicts what the frozen run in a
    # clean folder did, and eval.py agrees
    refused = run("train_task.py", *common, "--out", str(tmp_path / "trainable"), check=False)
    assert refused.returncode == 2 and "holds an earlier run" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "trainable" / "domain_adapter").is_dir()
    run("train_task.py", *common, "--out", str(tmp_path / "trainable"), "--overwrite")
    assert not (tmp_path / "trainable" / "domain_adapter").exists()
    rerun, clean = (np.load(tmp_path / d / "predictions_test.npz")["probs"] for d in ("trainable", "frozen"))
    assert np.abs(rerun - clean).max() <= 1e-6
    test_csv = task_dir / TASKS["mortality"].file("test")
    run("eval.py", "--run", str(tmp_path / "trainable"), "--test", str(test_csv), "--label-col",
        TASKS["mortality"].label_column, "--precision", "fp32", "--max-seq-len", "48", "--no-progress")
    again = np.load(tmp_path / "trainable" / f"predictions_{test_csv.stem}.npz")["probs"]
    assert np.abs(again - rerun).max() <= 1e-5


def test_a_run_given_relative_paths_is_scored_from_any_folder(tiny_lm, task_dir, tmp_path):
    """Before: summary.json kept --model and --domain-adapter as typed, so eval.py --run from another folder said the
    adapter was missing; and an unfinished DAPT run's adapter/ (its best so far) was stacked without a word."""
    import shutil

    import torch

    from minilora import from_pretrained
    from minilora.lora import add_adapter, save_adapter

    shutil.copytree(tiny_lm, tmp_path / "model")
    lm, _ = from_pretrained(tmp_path / "model")
    add_adapter(lm, "domain", r=2, alpha=4)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    save_adapter(lm, "domain", tmp_path / "dapt" / "adapter")
    (tmp_path / "dapt" / "checkpoint").mkdir()  # a DAPT run stopped before its end
    args = ["--task", "mortality", "--data-dir", str(task_dir), "--model", "model", *FAST,
            "--domain-adapter", "dapt/adapter", "--out", "run"]
    proc = subprocess.run([sys.executable, str(ROOT / "train_task.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("warning: dapt/adapter: its DAPT run has not finished (a checkpoint and no summary.json in dapt): this "
            "is its best adapter so far; finish it with train_dapt.py --resume --out dapt") in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["model"] == str(tmp_path / "model")
    assert summary["config"]["domain_adapter"] == str(tmp_path / "dapt" / "adapter")
    test_csv = task_dir / TASKS["mortality"].file("test")
    score = ["eval.py", "--run", str(tmp_path / "run"), "--test", str(test_csv), "--precision", "fp32",
             "--max-seq-len", "48", "--no-progress", "--out", str(tmp_path / "scored")]
    run(*score)  # from ROOT, not the folder the run was trained in
    expected = np.load(tmp_path / "run" / "predictions_test.npz")["probs"]
    assert np.abs(np.load(tmp_path / "scored" / f"predictions_{test_csv.stem}.npz")["probs"] - expected).max() <= 1e-5
    summary["config"]["domain_adapter"] = "dapt/adapter"  # as runs before 20261202 recorded it
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    proc = run(*score, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: dapt/adapter: not found from {ROOT}; {tmp_path / 'run' / 'summary.json'} records this "
        "domain_adapter path relative to the folder the run was trained in: run eval.py from there"), proc.stderr


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_torchrun_two_ranks_with_an_empty_share_match_one_process(tiny_lm, task_dir, tmp_path):
    """2 gloo ranks, --device cpu, a batch size that leaves one row in the last batch (so rank 1 gets none at some
    step): the run is distributed (world_size 2), does not fail, and predicts what one process does."""
    spec = TASKS["procedures"]  # multi-label; 96 training rows
    with open(task_dir / spec.file("train"), newline="") as fh:
        n_train = len(list(csv.DictReader(fh)))
    batch = next(b for b in range(3, 40) if n_train % b == 1)
    common = ["--task", "procedures", "--data-dir", str(task_dir), "--model", str(tiny_lm), "--dropout", "0",
              "--device", "cpu", *FAST, "--batch-size", str(batch)]  # no --r: torchrun's parser takes it for its own
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_task.py"), *common, "--out", str(tmp_path / "one")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=one_thread)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_task.py"), *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=one_thread)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["train_tokens"] == two["train_tokens"]
    for split in ("val", "test"):  # validation is scored by both ranks, half each
        a, b = (np.load(tmp_path / d / f"predictions_{split}.npz") for d in ("one", "two"))
        assert list(a["ids"]) == list(b["ids"]) and np.abs(a["probs"] - b["probs"]).max() <= 1e-4
    assert two["val_auroc"] == pytest.approx(one["val_auroc"], abs=1e-6)


def test_torchrun_resume_with_dropout_and_an_empty_share_is_exact(tiny_lm, task_dir, tmp_path):
    """Before: a rank without rows in a short last batch drew no dropout seeds, so its generator fell behind rank 0's,
    which a resume restores on every rank: a run stopped after that step and resumed trained on with other masks
    (adapters 8.5e-3 apart). Now every rank takes rank 0's generator state after such a step."""
    import torch

    spec = TASKS["procedures"]
    with open(task_dir / spec.file("train"), newline="") as fh:
        n_train = len(list(csv.DictReader(fh)))
    batch = next(b for b in range(3, 40) if n_train % b == 1)
    per_epoch = -(-n_train // batch)
    common = ["--task", "procedures", "--data-dir", str(task_dir), "--model", str(tiny_lm), "--dropout", "0.1",
              "--device", "cpu", *FAST, "--batch-size", str(batch), "--schedule", "constant", "--save-every", "1000"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def torchrun(out: str, steps: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_task.py"), *common, "--max-steps", str(steps), "--out", str(tmp_path / out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=one_thread)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun("whole", per_epoch + 2)
    torchrun("resumed", per_epoch)  # stops right after the step whose batch had one row
    torchrun("resumed", per_epoch + 2, "--resume")
    a, b = (torch.load(tmp_path / d / "checkpoint" / "state.pt", weights_only=False)["trainable"]
            for d in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_custom_two_column_and_jsonl_tasks_report_unknown_labels(tiny_lm, tmp_path):
    rng = np.random.default_rng(0)
    words = ["fever", "cough", "chest pain", "sepsis", "fracture", "stroke"]
    def rows(n):
        return [[f"pt with {rng.choice(words)} and {rng.choice(words)}", str(rng.integers(0, 3))] for _ in range(n)]
    train = _write(tmp_path / "train.csv", ["text", "label"], rows(60))
    val = _write(tmp_path / "val.csv", ["text", "label"], rows(20))
    test_rows = rows(20) + [["new label row", "7"], ["", "1"]]
    test = _write(tmp_path / "test.csv", ["text", "label"], test_rows)
    proc = run("train_task.py", "--task", "triage", "--train", str(train), "--val", str(val), "--test", str(test),
               "--model", str(tiny_lm), "--out", str(tmp_path / "out"), *FAST)
    assert "triage test: 20 rows (1 empty texts skipped; 1 rows with a label not seen in training left out)" in proc.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["kind"] == "multiclass" and s["labels"] == ["0", "1", "2"]
    assert s["data_report"]["test"] == {"rows": 21, "empty_text": 1, "unknown_labels": 1}

    jl = tmp_path / "ml.jsonl"
    jl.write_text("".join(json.dumps({"body": f"note {i} {words[i % 6]}", "codes": ["A", "B"][: 1 + i % 2]}) + "\n"
                          for i in range(40)))
    run("train_task.py", "--task", "codes", "--train", str(jl), "--val", str(jl), "--test", str(jl), "--multilabel",
        "--text-col", "body", "--label-col", "codes", "--model", str(tiny_lm), "--out", str(tmp_path / "ml"), *FAST)
    assert json.loads((tmp_path / "ml" / "summary.json").read_text())["labels"] == ["A", "B"]


def test_eval_scores_a_custom_run_with_its_own_columns(tiny_lm, tmp_path):
    """Before: eval.py --run --test read 'text', 'label', 'id' and ',' whatever the run was trained with: a task
    trained with --label-col codes --label-sep ';' got 'missing column label', and with --label-col alone every code
    was dropped and the AUROC reported 'undefined (one class in test)' with exit 0."""
    words = ["fever", "cough", "chest pain", "sepsis", "fracture", "stroke"]
    # every row has two codes or more, so that a wrong --label-sep matches none
    rows = [[f"n{i}", f"pt with {words[i % 6]} and {words[(i * 5) % 6]}", ["A;B", "B;C", "A;C", "A;B;C"][i % 4]]
            for i in range(48)]
    data = _write(tmp_path / "data.csv", ["note", "body", "codes"], rows)
    run("train_task.py", "--task", "dx", "--train", str(data), "--val", str(data), "--test", str(data), "--multilabel",
        "--text-col", "body", "--label-col", "codes", "--label-sep", ";", "--id-col", "note", "--model", str(tiny_lm),
        "--out", str(tmp_path / "run"), *FAST)
    score = ["eval.py", "--run", str(tmp_path / "run"), "--test", str(data), "--no-progress", "--out",
             str(tmp_path / "scored")]
    run(*score)
    a, b = np.load(tmp_path / "run" / "predictions_test.npz"), np.load(tmp_path / "scored" / "predictions_data.npz")
    assert list(a["ids"]) == list(b["ids"]) == [r[0] for r in rows]
    assert np.array_equal(a["y_true"], b["y_true"]) and np.abs(a["probs"] - b["probs"]).max() <= 1e-5
    unlabelled = _write(tmp_path / "new.csv", ["body"], [[r[1]] for r in rows[:5]])  # no 'note' column: ids by line
    run("eval.py", "--run", str(tmp_path / "run"), "--predict", str(unlabelled), "--no-progress", "--out",
        str(tmp_path / "scored"))
    with open(tmp_path / "scored" / "predictions_new.csv", newline="") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == [f"new.csv:{i}" for i in range(2, 7)]
    proc = run(*score, "--label-sep", ",", check=False)  # every code unknown: an error, not an undefined AUROC
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {data}: no row has any of the run's 3 labels in 'codes' (codes split by ','); check --label-col "
        "and --label-sep"), proc.stderr


def test_bad_task_inputs(tiny_lm, tmp_path):
    train = _write(tmp_path / "train.csv", ["text", "outcome"], [["a", "0"], ["b", "1"]])
    proc = run("train_task.py", "--task", "x", "--train", str(train), "--val", str(train), "--test", str(train),
               "--model", str(tiny_lm), "--out", str(tmp_path / "o"), *FAST, check=False)
    assert proc.returncode == 2 and "train.csv: missing column 'label' (columns: text, outcome)" in proc.stderr
    proc = run("train_task.py", "--task", "nope", "--model", str(tiny_lm), *FAST, check=False)
    assert proc.returncode == 2 and "--task 'nope'" in proc.stderr
    proc = run("train_task.py", "--task", "mortality", "--data-dir", str(tmp_path), "--model", str(tiny_lm), *FAST,
               check=False)
    assert proc.returncode == 2 and "MP_IN_adm_train.csv: missing" in proc.stderr


def test_demo_task_defaults_to_mean_pooling(tiny_lm, tmp_path):
    out = tmp_path / "runs" / "pmv"
    run("train_task.py", "--task", "pmv", "--model", str(tiny_lm), "--out", str(out), "--no-domain-adapter", *FAST)
    assert json.loads((out / "head" / "head_config.json").read_text())["pooling"] == "mean"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "demo" and summary["config"]["pooling"] == "mean"
    assert (tmp_path / "runs" / "demo-data" / "tasks" / TASKS["pmv"].file("train")).is_file()


def test_stale_demo_files_are_redrawn(tiny_lm, tmp_path):
    """Demo files from an older cohort size (no or another stamp) are rewritten, not silently reused."""
    sys.path.insert(0, str(ROOT))
    from train_task import DEMO_PATIENTS

    demo = tmp_path / "runs" / "demo-data" / "tasks"
    write_task_csvs(demo, "mortality", 120, seed=0)  # an older demo's files
    run("train_task.py", "--task", "mortality", "--model", str(tiny_lm), "--out", str(tmp_path / "runs" / "mortality"),
        "--no-domain-adapter", *FAST, "--max-steps", "1")
    with open(demo / TASKS["mortality"].file("train"), newline="", encoding="utf-8") as fh:
        rows = sum(1 for _ in csv.DictReader(fh))
    fresh = write_task_csvs(tmp_path / "fresh", "mortality", DEMO_PATIENTS["mortality"], seed=0)
    with open(fresh["train"], newline="", encoding="utf-8") as fh:
        assert rows == sum(1 for _ in csv.DictReader(fh)) > 120


@pytest.mark.parametrize("task", ["mortality", "pmv", "los"])
def test_demo_cohorts_leave_enough_of_every_class_to_select_and_judge(tmp_path, task):
    """Best-epoch selection on validation and the test AUROC need a few dozen of every class, not 3 deaths."""
    sys.path.insert(0, str(ROOT))
    from train_task import DEMO_PATIENTS

    files = write_task_csvs(tmp_path, task, DEMO_PATIENTS[task], seed=0)
    column = TASKS[task].label_column
    for split, path in files.items():
        with open(path, newline="", encoding="utf-8") as fh:
            counts = np.unique([r[column] for r in csv.DictReader(fh)], return_counts=True)[1]
        least = 20 if split == "train" else 10
        assert len(counts) == (4 if task == "los" else 2) and counts.min() >= least, (split, counts)


@pytest.mark.slow
def test_demo_pipeline_three_commands(tmp_path):
    """The README's demo: train_dapt.py, train_task.py for every task, eval.py (about half an hour on 2 cores)."""
    runs = tmp_path / "runs"
    run("train_dapt.py", "--out", str(runs / "dapt"), "--no-progress")
    dapt = json.loads((runs / "dapt" / "summary.json").read_text())
    assert dapt["val_ppl"] < dapt["base_val_ppl"]
    for task in TASKS:
        run("train_task.py", "--task", task, "--out", str(runs / task), "--no-progress",
            "--domain-adapter", str(runs / "dapt" / "adapter"))
        s = json.loads((runs / task / "summary.json").read_text())
        assert 0.5 < s["test_auroc"] < 1.0, (task, s["test_auroc"])
    run("eval.py", "--runs-dir", str(runs), "--out", str(runs / "report"))
    report = json.loads((runs / "report" / "report.json").read_text())
    assert 0.5 < report["macro_auroc"] < 1.0
