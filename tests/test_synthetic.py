"""The synthetic clinical corpus: determinism, note structure, no death mentions in task inputs, the van Aken file
format, cohort disjointness, and learnable-but-noisy labels (TF-IDF + logistic regression as the oracle)."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import MultiLabelBinarizer

from conftest import ROOT
from minilora.data import (
    TASKS,
    clean_note,
    generate_patients,
    render_note,
    task_spec,
    write_dapt_corpus,
    write_task_csvs,
)

SECTIONS = [
    "CHIEF COMPLAINT",
    "PRESENT ILLNESS",
    "MEDICAL HISTORY",
    "MEDICATION ON ADMISSION",
    "ALLERGIES",
    "PHYSICAL EXAM",
    "FAMILY HISTORY",
    "SOCIAL HISTORY",
]
DEATH = re.compile(r"\b(die[sd]?|dying|death|dead|deceased|expired?|passed away|demise)\b", re.I)
CODE_FORMS = {"diagnoses": re.compile(r"^(\d{3}|[VE]\d{3})$"), "procedures": re.compile(r"^\d{3}$")}


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """All five tasks from 3,000 task-cohort patients (seed 0)."""
    directory = tmp_path_factory.mktemp("tasks")
    for name in TASKS:
        write_task_csvs(directory, name, n=3000, seed=0)
    return directory


def test_deterministic_files(tmp_path):
    a = write_dapt_corpus(tmp_path / "a" / "dapt.jsonl.gz", n=50, seed=3).read_bytes()
    assert a == write_dapt_corpus(tmp_path / "b" / "dapt.jsonl.gz", n=50, seed=3).read_bytes()
    assert a != write_dapt_corpus(tmp_path / "c" / "dapt.jsonl.gz", n=50, seed=4).read_bytes()
    first = write_task_csvs(tmp_path / "x", "mortality", n=200, seed=3)
    second = write_task_csvs(tmp_path / "y", "mortality", n=200, seed=3)
    assert all(first[s].read_bytes() == second[s].read_bytes() for s in first)


def test_admission_notes_have_van_aken_sections_and_no_death(task_dir):
    rows = read_rows(task_dir / "MP_IN_adm_train.csv")
    for row in rows:
        headers = re.findall(rf"^({'|'.join(SECTIONS)}):", row["text"], flags=re.M)
        assert headers == SECTIONS
        assert not DEATH.search(row["text"]), row["id"]
    patients = generate_patients(300, seed=0)
    discharge = [render_note(p, random.Random(i), "discharge") for i, p in enumerate(patients)]
    died = [d for d, p in zip(discharge, patients) if p.died]
    assert died and all("Expired" in d for d in died)  # the DAPT corpus does mention death; the task input does not
    assert all(
        d.count("[**") >= 4 and "Brief Hospital Course:" in d and "History of Present Illness:" in d for d in discharge
    )
    assert "[**" not in clean_note(discharge[0]) and "\n" not in clean_note(discharge[0])


def test_van_aken_file_format(task_dir):
    for name, spec in TASKS.items():
        ids_by_split = {}
        for split in spec.splits:
            path = task_dir / spec.file(split)
            raw = path.read_bytes().decode("utf-8")
            rows = read_rows(path)
            assert list(rows[0]) == ["id", "text", spec.label_column]
            again = io.StringIO(newline="")
            writer = csv.writer(again, quoting=csv.QUOTE_ALL)
            writer.writerow(["id", "text", spec.label_column])
            writer.writerows([r["id"], r["text"], r[spec.label_column]] for r in rows)
            assert again.getvalue() == raw  # every field quoted, exactly as csv.QUOTE_ALL writes it
            labels = [r[spec.label_column] for r in rows]
            if spec.kind == "multilabel":
                for cell in labels:
                    codes = cell.split(",")
                    assert codes == sorted(set(codes)) and all(CODE_FORMS[name].match(c) for c in codes), cell
            else:
                assert set(labels) == {str(k) for k in range(spec.num_classes)}
            ids_by_split[split] = {int(r["id"]) for r in rows}
        sizes = [len(ids_by_split[s]) for s in spec.splits]
        assert len(set.union(*ids_by_split.values())) == sum(sizes)  # each admission is in one split
        fractions = np.array(sizes) / sum(sizes)
        assert np.allclose(fractions, [0.7, 0.1, 0.2], atol=0.04), (name, fractions)
    assert (task_dir / "pmv_dev.csv").is_file() and task_spec("MOR") is TASKS["mortality"]
    train = {r["id"] for r in read_rows(task_dir / "MP_IN_adm_train.csv")}
    test = {r["id"] for r in read_rows(task_dir / "MP_IN_adm_test.csv")}
    assert train.isdisjoint({r["id"] for r in read_rows(task_dir / "DIA_GROUPS_3_DIGITS_adm_test.csv")})
    assert test >= {r["id"] for r in read_rows(task_dir / "LOS_WEEKS_adm_test.csv")}  # same patient split in every task


def test_los_label_bins():
    patient = generate_patients(1, seed=0)[0]
    for days, label in ((0.5, 0), (3.0, 0), (3.01, 1), (7.0, 1), (7.5, 2), (14.0, 2), (14.2, 3), (40.0, 3)):
        assert dataclasses.replace(patient, los_days=days).los_label == label


def test_dapt_and_task_patients_are_disjoint(tmp_path):
    path = write_dapt_corpus(tmp_path / "dapt.jsonl.gz", n=400, seed=0)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        notes = [json.loads(line) for line in fh]
    assert len(notes) == 400 and all(set(n) == {"note_id", "text"} for n in notes)
    dapt_subjects = {int(n["note_id"].split("-")[0]) for n in notes}
    task_subjects = {p.subject_id for p in generate_patients(3000, seed=0)}
    assert dapt_subjects.isdisjoint(task_subjects)


def _auroc(task_dir, name: str) -> float:
    """Test AUROC of TF-IDF + logistic regression trained on the train split (macro over labels for multi-label;
    one-vs-one macro for LOS), as the paper scores the tasks."""
    spec = TASKS[name]
    train, test = read_rows(task_dir / spec.file("train")), read_rows(task_dir / spec.file("test"))
    vectorizer = TfidfVectorizer(min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    x_test = vectorizer.transform([r["text"] for r in test])
    column = spec.label_column
    if spec.kind != "multilabel":
        y_train, y_test = (np.array([int(r[column]) for r in rows]) for rows in (train, test))
        proba = (
            LogisticRegression(C=4, max_iter=2000, class_weight="balanced").fit(x_train, y_train).predict_proba(x_test)
        )
        if spec.kind == "binary":
            return roc_auc_score(y_test, proba[:, 1])
        return roc_auc_score(y_test, proba, multi_class="ovo", average="macro")
    binarizer = MultiLabelBinarizer().fit([r[column].split(",") for r in train])
    known = set(binarizer.classes_)
    y_train = binarizer.transform([r[column].split(",") for r in train])
    y_test = binarizer.transform([[c for c in r[column].split(",") if c in known] for r in test])
    scores = []
    for j in range(y_train.shape[1]):
        if len(set(y_train[:, j])) == 2 and len(set(y_test[:, j])) == 2:
            model = LogisticRegression(C=4, solver="liblinear").fit(x_train, y_train[:, j])
            scores.append(roc_auc_score(y_test[:, j], model.predict_proba(x_test)[:, 1]))
    assert len(scores) >= 20
    return float(np.mean(scores))


@pytest.mark.parametrize("name", list(TASKS))
def test_labels_are_learnable_but_noisy(task_dir, name):
    assert 0.6 < _auroc(task_dir, name) < 0.97


def test_generated_files_do_not_depend_on_the_string_hash_seed(tmp_path: Path) -> None:
    """The same seed gives byte-identical corpora and task CSVs in processes with different PYTHONHASHSEED (set
    iteration order follows string hashes; a draw taken in that order made every run's demo data differ)."""
    script = (
        "import hashlib, pathlib, sys\n"
        "from minilora.data.synthetic import TASKS, write_dapt_corpus, write_task_csvs\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "h = hashlib.sha256(write_dapt_corpus(d / 'notes.jsonl', 60, seed=0).read_bytes())\n"
        "for t in TASKS:\n"
        "    for p in sorted(write_task_csvs(d / t, t, 60, seed=0).values()):\n"
        "        h.update(p.read_bytes())\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / hash_seed
        proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.add(proc.stdout.strip())
    assert len(digests) == 1
