"""tools/mimic4_tasks.py: the paper's tasks from MIMIC-IV tables and discharge summaries.

The MIMIC-IV demo tables (../shared) hold no notes, so the tests write a MIMIC-IV-style discharge summary for each
demo admission, with a marker word in every section that must not reach the task text. Labels are checked against
the demo's published facts (275 admissions, 15 in-hospital deaths) and against codes and stays recomputed here. The
demo has no icu module: PMV's ``procedureevents`` rows are written here, in patterns whose labels are worked out by
hand below.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

from minilora.data.synthetic import TASKS
from minilora.data.tasks import data_source, load_named_task

_SPEC = importlib.util.spec_from_file_location("mimic4_tasks", ROOT / "tools" / "mimic4_tasks.py")
mimic4_tasks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mimic4_tasks)

LEAK = "zqleak"  # in every left-out section


def discharge_note(hadm: str) -> str:
    return f"""
Name:  ___                     Unit No:   ___
 
Admission Date:  ___              Discharge Date:   ___
 
Date of Birth:  ___             Sex:   F
 
Service: MEDICINE {LEAK}
 
Allergies: 
Penicillins / sulfa admit{hadm}allergy
 
Attending: ___. {LEAK}
 
Chief Complaint:
Worsening abdominal distension admit{hadm}cc
 
Major Surgical or Invasive Procedure:
Paracentesis {LEAK}
 
History of Present Illness:
Ms. ___ is a woman with cirrhosis admit{hadm}hpi. Her brother died of liver disease last year.
 
Past Medical History:
1. HCV cirrhosis admit{hadm}pmh
2. Appendectomy ___
 
Social History:
___ admit{hadm}social
Family History:
Mother with diabetes admit{hadm}family
 
Physical Exam:
ADMISSION PHYSICAL EXAM:
VS: 98.1 107/61 78 18 97RA admit{hadm}exam
GENERAL: Thin, NAD
DISCHARGE PHYSICAL EXAM:
VS: 98.4 {LEAK}
 
Pertinent Results:
ADMISSION LABS: WBC 5.0 {LEAK}
 
Brief Hospital Course:
Patient expired on hospital day 3 {LEAK}
 
Medications on Admission:
1. Furosemide 20 mg PO DAILY admit{hadm}meds
 
Discharge Medications:
1. Lasix {LEAK}
 
Discharge Disposition:
Home {LEAK}
 
Discharge Diagnosis:
Ascites {LEAK}
 
Discharge Condition:
Stable {LEAK}
 
Followup Instructions:
___ {LEAK}
"""


def test_admission_text_keeps_admission_sections_in_van_akens_order_and_nothing_else():
    text = mimic4_tasks.admission_text(discharge_note("7"))
    assert LEAK not in text
    assert [line.split(":")[0] for line in text.split("\n\n")] == [
        "CHIEF COMPLAINT", "PRESENT ILLNESS", "MEDICAL HISTORY", "MEDICATION ON ADMISSION", "ALLERGIES",
        "PHYSICAL EXAM", "FAMILY HISTORY", "SOCIAL HISTORY"]
    for part in ("cc", "hpi", "pmh", "meds", "allergy", "exam", "social", "family"):
        assert f"admit7{part}" in text, part
    assert "GENERAL: Thin, NAD" in text and "Appendectomy" in text
    assert "died" not in text and "Ms. ___ is a woman with cirrhosis admit7hpi." in text
    assert mimic4_tasks.admission_text("Discharge Diagnosis:\nsepsis\nPertinent Results:\nWBC 20") == ""


@pytest.mark.parametrize("code, version, diagnosis, short", [
    ("4139", "9", True, "413"), ("V707", "9", True, "V707"), ("E8497", "9", True, "E849"), ("25000", "9", True, "250"),
    ("E119", "10", True, "E11"), ("V4582", "10", True, "V45"), ("3961", "9", False, "396"),
    ("0DTJ4ZZ", "10", False, "0DT")])
def test_short_codes(code, version, diagnosis, short):
    assert mimic4_tasks.short_code(code, version, diagnosis) == short


# PMV patterns, cycled over the demo admissions: (itemid, start day, end day, status) rows -> the label by hand, or
# None: not in the cohort. Days count from the admission's admittime.
IV, NIV = "225792", "225794"  # invasive, non-invasive ventilation
PMV_PATTERNS = [
    ([(IV, 0, 8, "FinishedRunning")], "1"),                                 # one 8-day episode
    ([(IV, 0, 5, "Stopped"), (IV, 1, 6, "FinishedRunning")], "0"),          # overlapping rows: 6 days, not 11
    ([(IV, 0, 4, "FinishedRunning"), (IV, 10, 13.5, "FinishedRunning")], "1"),  # two episodes, 7.5 days in all
    ([(IV, 1, 8, "FinishedRunning")], "0"),                                 # exactly 7 days is not more than 7
    ([(IV, 0, 10, "Rewritten"), (IV, 0, 2, "FinishedRunning")], "0"),       # the rewritten row does not count
    ([(NIV, 0, 12, "FinishedRunning")], None),                              # non-invasive only: not in the cohort
    ([(IV, 2, 2.5, "FinishedRunning"), (IV, 2.25, 9.4, "FinishedRunning"), (IV, 9.4, 9.5, "Paused")], "1"),  # 7.5
    ([], None),                                                             # not ventilated
]


def test_los_buckets():
    assert [mimic4_tasks.los_label(d) for d in (0.5, 3.0, 3.01, 7.0, 7.5, 14.0, 14.2, 40)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo hosp tables, one discharge summary per admission plus a radiology report per patient, a stray
    discharge note of an unknown admission and a duplicate; then the tool's output."""
    hosp = shared_path("mimic-iv-demo", "hosp")
    d = tmp_path_factory.mktemp("mimic4")
    with gzip.open(hosp / "admissions.csv.gz", "rt", newline="") as fh:
        admissions = list(csv.DictReader(fh))
    notes = d / "discharge.csv.gz"
    with gzip.open(notes, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"])
        for i, a in enumerate(admissions):
            w.writerow([f"{a['subject_id']}-DS-{i}", a["subject_id"], a["hadm_id"], "DS", i, "", "",
                        discharge_note(a["hadm_id"])])
        w.writerow(["x-DS-1", "1", "99999999", "DS", 1, "", "", discharge_note("stray")])
        w.writerow(["dup-DS-1", admissions[0]["subject_id"], admissions[0]["hadm_id"], "DS", 9, "", "", "x"])
        for a in {a["subject_id"]: a for a in admissions}.values():
            w.writerow([f"{a['subject_id']}-RR-1", a["subject_id"], "", "RR", 1, "", "", "CT chest. No acute process."])
    icu = d / "icu"
    icu.mkdir()
    pmv = {}
    with gzip.open(icu / "procedureevents.csv.gz", "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "hadm_id", "stay_id", "starttime", "endtime", "itemid", "value", "valueuom",
                    "statusdescription"])
        for i, a in enumerate(admissions):
            events, label = PMV_PATTERNS[i % len(PMV_PATTERNS)]
            admit = dt.datetime.fromisoformat(a["admittime"])
            for item, start, end, status in events:
                w.writerow([a["subject_id"], a["hadm_id"], "3" + a["hadm_id"], admit + dt.timedelta(days=start),
                            admit + dt.timedelta(days=end), item, (end - start) * 1440, "min", status])
            if label is not None:
                pmv[a["hadm_id"]] = label
        w.writerow(["1", "", "", "2100-01-01 00:00:00", "2100-01-09 00:00:00", IV, "", "min", "FinishedRunning"])
        w.writerow(["1", "99999998", "", "2100-01-01 00:00:00", "2100-01-02 00:00:00", IV, "", "min", "Stopped"])
    out = d / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mimic4_tasks.py"), "--hosp", str(hosp), "--notes", str(notes),
         "--icu", str(icu), "--out", str(out), "--dapt-notes", str(d / "dapt" / "notes.csv.gz"), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"hosp": hosp, "out": out, "admissions": admissions, "dapt": d / "dapt" / "notes.csv.gz",
            "stderr": proc.stderr, "pmv": pmv, "notes": notes}


def _rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def _task(demo, task: str) -> dict[str, dict[str, dict]]:
    spec = TASKS[task]
    return {s: {r["id"]: r for r in _rows(demo["out"] / f"{spec.prefix}_{f}.csv.gz")}
            for s, f in zip(("train", "val", "test"), spec.splits)}


def _codes(hosp: Path, table: str, width) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in _rows(hosp / f"{table}.csv.gz"):
        if r["icd_version"] == "9":
            out[r["hadm_id"]].add(r["icd_code"][:width(r["icd_code"])])
    return out


def test_mortality_has_every_admission_and_the_demos_15_deaths(demo):
    mor = _task(demo, "mortality")
    rows = {h: r for split in mor.values() for h, r in split.items()}
    assert len(rows) == sum(map(len, mor.values())) == 275
    assert sum(r["hospital_expire_flag"] == "1" for r in rows.values()) == 15
    assert {r["hadm_id"] for r in demo["admissions"]} == set(rows)
    assert "left out: admissions_without_discharge_note" not in demo["stderr"]
    assert "discharge_notes_without_admission 1" in demo["stderr"] and "duplicate_discharge_notes 1" in demo["stderr"]


ALL_TASKS = (*mimic4_tasks.TASK_NAMES, "pmv")


def test_splits_are_by_patient_and_shared_by_every_task(demo):
    subject = {a["hadm_id"]: a["subject_id"] for a in demo["admissions"]}
    where: dict[str, str] = {}
    for task in ALL_TASKS:
        for split, rows in _task(demo, task).items():
            for hadm in rows:
                assert where.setdefault(subject[hadm], split) == split, f"{task}: patient in two splits"
    counts = {s: sum(v == s for v in where.values()) for s in ("train", "val", "test")}
    assert counts["train"] > counts["test"] > counts["val"] > 0, counts  # 70 / 10 / 20 % of 100 patients
    listed = {r["subject_id"]: r["split"] for r in _rows(demo["out"] / "subject_splits.csv.gz")}
    assert len(listed) == 100 and all(listed[s] == v for s, v in where.items())
    dapt = _rows(demo["dapt"])
    assert dapt and {r["note_id"].split("-")[0] for r in dapt} == {s for s, v in listed.items() if v == "train"}
    assert sum(r["note_id"].endswith("-RR-1") for r in dapt) == counts["train"]  # radiology notes of training patients


def test_los_labels_follow_the_stay_and_leave_out_deaths(demo):
    want = {}
    for a in demo["admissions"]:
        if a["hospital_expire_flag"] == "0":
            stay = dt.datetime.strptime(a["dischtime"], "%Y-%m-%d %H:%M:%S") - dt.datetime.strptime(
                a["admittime"], "%Y-%m-%d %H:%M:%S")
            want[a["hadm_id"]] = str(sum(stay > dt.timedelta(days=d) for d in (3, 7, 14)))
    got = {h: r["los_label"] for split in _task(demo, "los").values() for h, r in split.items()}
    assert got == want and len(got) == 260


def test_code_labels_are_the_admissions_icd9_groups(demo):
    diag = _codes(demo["hosp"], "diagnoses_icd", lambda c: 4 if c[0] in "VE" else 3)
    proc = _codes(demo["hosp"], "procedures_icd", lambda c: 3)
    for task, want in (("diagnoses", diag), ("procedures", proc)):
        got = {h: set(r["short_codes"].split(",")) for split in _task(demo, task).values() for h, r in split.items()}
        assert got == dict(want), task
        assert 0 < len(got) < 275  # admissions coded in ICD-10 (or without procedures) are left out


def test_pmv_labels_are_invasive_ventilation_over_7_days_among_the_ventilated(demo):
    got = {h: r["label"] for split in _task(demo, "pmv").values() for h, r in split.items()}
    assert got == demo["pmv"]
    assert sorted(p.name for p in demo["out"].glob("pmv_*")) == ["pmv_dev.csv.gz", "pmv_test.csv.gz",
                                                                  "pmv_train.csv.gz"]
    summary = json.loads((demo["out"] / "summary.json").read_text())
    assert sum(summary["pmv_positives"].values()) == sum(v == "1" for v in demo["pmv"].values()) > 0
    assert summary["counts"]["ventilated_admissions"] == len(demo["pmv"]) + 1  # + the unknown admission
    for item in ("ventilation_rows_without_admission 1", "ventilated_admissions_unknown 1",
                 "ventilation_rows_rewritten "):
        assert item in demo["stderr"], item
    assert f"pmv: train {summary['rows']['pmv']['train']}, dev {summary['rows']['pmv']['val']}," in demo["stderr"]


def test_without_icu_no_pmv_is_built(demo, tmp_path):
    proc = _run_tool("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["rows"]) == set(mimic4_tasks.TASK_NAMES) and "pmv_positives" not in summary
    assert not list((tmp_path / "out").glob("pmv_*")) and "pmv:" not in proc.stderr
    assert summary["rows"] == {t: v for t, v in json.loads((demo["out"] / "summary.json").read_text())["rows"].items()
                               if t != "pmv"}


def test_a_rebuild_into_the_same_folder_leaves_nothing_stale(demo, tmp_path):
    """Before: a rebuild without --icu into a folder with PMV files kept them (train_task.py trained on them as this
    build's), and the earlier DAPT notes, drawn under another patient split, stayed without a word."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(demo["out"], out)
    summary = json.loads((out / "summary.json").read_text())
    summary["settings"]["dapt_notes"] = str(demo["dapt"])
    (out / "summary.json").write_text(json.dumps(summary))
    assert list(out.glob("pmv_*"))
    proc = _run_tool("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--out", str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(out.glob("pmv_*")) and f"removed {out / 'pmv_train.csv.gz'}" in proc.stderr
    assert f"warning: {demo['dapt']}: DAPT notes of an earlier build into {out}, with another patient split" in \
        proc.stderr
    proc = _run_tool("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--out", str(out), "--seed", "1")
    assert proc.returncode == 0 and "removed" not in proc.stderr and "warning" not in proc.stderr, proc.stderr
    # DAPT notes inside --out (the README's layout) are the build's own: removed, not only warned about (a third
    # build no longer knew of them, and train_dapt.py --notes would have trained on test patients' notes)
    inside = out / "dapt_notes.csv.gz"
    shutil.copy(demo["dapt"], inside)
    summary = json.loads((out / "summary.json").read_text())
    summary["settings"]["dapt_notes"] = str(inside)
    (out / "summary.json").write_text(json.dumps(summary))
    proc = _run_tool("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--out", str(out), "--seed", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removed {inside} (an earlier build's DAPT notes, of another patient split" in proc.stderr
    assert not inside.exists() and demo["dapt"].is_file()
    # the same notes file named another way (relative, then absolute) is this build's own: kept
    relative = os.path.relpath(inside, ROOT)
    proc = _run_tool("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--out", str(out),
                     "--dapt-notes", relative)
    assert proc.returncode == 0 and inside.is_file(), proc.stderr[-2000:]
    proc = _run_tool("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--out", str(out), "--seed", "3",
                     "--dapt-notes", str(inside))
    assert proc.returncode == 0 and "removed" not in proc.stderr and inside.is_file(), proc.stderr[-2000:]


def test_no_left_out_section_or_death_mention_reaches_any_task_text(demo):
    for task in ALL_TASKS:
        for split, rows in _task(demo, task).items():
            for hadm, r in rows.items():
                assert LEAK not in r["text"] and "died" not in r["text"] and "expired" not in r["text"]
                assert f"admit{hadm}cc" in r["text"] and f"admit{hadm}exam" in r["text"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_train_task_reads_the_output(demo, task):
    data = load_named_task(task, demo["out"])
    assert sum(len(s.ids) for s in data.splits.values()) == sum(map(len, _task(demo, task).values()))
    assert data.kind == TASKS[task].kind and all(not r.get("empty_text") for r in data.report.values())


def test_the_output_is_known_as_mimic_iv_and_other_folders_as_mimic(demo, tmp_path):
    assert data_source(demo["out"]) == "mimic-iv"
    assert data_source(tmp_path) == "mimic"  # van Aken's folder: no summary.json
    (tmp_path / "summary.json").write_text('{"source": "elsewhere"}')
    assert data_source(tmp_path) == "mimic"
    (tmp_path / "summary.json").write_text("[not json")
    assert data_source(tmp_path) == "mimic"


def test_a_run_on_the_output_is_reported_as_mimic_iv_beside_the_paper(demo, tiny_lm, tmp_path):
    """train_task.py on the built folder records data "mimic-iv"; eval.py shows the paper's MIMIC-III numbers
    beside it, under the MIMIC-IV note."""
    run = tmp_path / "mor"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_task.py"), "--task", "mortality", "--data-dir", str(demo["out"]),
         "--model", str(tiny_lm), "--out", str(run), "--r", "4", "--alpha", "8", "--max-seq-len", "48",
         "--batch-size", "16", "--precision", "fp32", "--no-progress", "--workers", "1", "--epochs", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["data"] == "mimic-iv"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(run), "--out", str(tmp_path / "report"),
                           "--n-boot", "20", "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(r["data"], r["column"], r["paper_auroc"]) for r in rep["runs"]] == [
        ("mimic-iv", "MOR", pytest.approx(0.7489))]  # the paper's "LLaMA + LoRA" MOR
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Data: MIMIC-IV (tasks built by tools/mimic4_tasks.py)" in md
    assert "| paper: LLaMA + LoRA | MIMIC-III | 74.89 |" in md


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "mimic4_tasks.py"), "--no-progress", *args],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)


def test_bad_inputs_give_one_line_and_exit_2_leaving_no_output(tmp_path):
    hosp = tmp_path / "hosp"
    hosp.mkdir()
    notes = tmp_path / "discharge.csv"
    notes.write_text('note_id,hadm_id,text\n"1","20","Chief Complaint:\nchest pain"\n')
    out = tmp_path / "out"
    proc = _run_tool("--hosp", str(hosp), "--notes", str(notes), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "admissions.csv.gz: no such file" in proc.stderr
    (hosp / "admissions.csv").write_text("subject_id,hadm_id,admittime,dischtime\n1,20,2100-01-01 00:00:00,x\n")
    proc = _run_tool("--hosp", str(hosp), "--notes", str(notes), "--out", str(out))
    assert proc.returncode == 2 and "missing column 'hospital_expire_flag'" in proc.stderr
    (hosp / "admissions.csv").write_text("subject_id,hadm_id,admittime,dischtime,hospital_expire_flag\n"
                                         "1,20,2100-01-01 00:00:00,01/05/2100,0\n")
    proc = _run_tool("--hosp", str(hosp), "--notes", str(notes), "--out", str(out))
    assert proc.returncode == 2 and "line 2: dischtime '01/05/2100' is not a date-time" in proc.stderr
    (hosp / "admissions.csv").write_text("subject_id,hadm_id,admittime,dischtime,hospital_expire_flag\n"
                                         "1,20,2100-01-01 00:00:00,2100-01-05 00:00:00,0\n")
    for table in ("diagnoses_icd", "procedures_icd"):
        (hosp / f"{table}.csv").write_text("subject_id,hadm_id,icd_code,icd_version\n1,20,4139,9\n")
    proc = _run_tool("--hosp", str(hosp), "--notes", str(notes), "--out", str(out))  # one admission: splits empty
    assert proc.returncode == 2 and "no rows for" in proc.stderr and "chest pain" not in proc.stderr
    assert not [p for p in out.iterdir() if p.name != "summary.json"] and not (out / "summary.json").exists()


def test_bad_icu_table_gives_one_line_and_exit_2(demo, tmp_path):
    icu = tmp_path / "icu"
    icu.mkdir()
    args = ("--hosp", str(demo["hosp"]), "--notes", str(demo["notes"]), "--icu", str(icu), "--out", str(tmp_path / "o"))
    proc = _run_tool(*args)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "procedureevents.csv.gz: no such file (expected the MIMIC-IV icu table procedureevents)" in proc.stderr
    (icu / "procedureevents.csv").write_text("hadm_id,starttime,endtime\n20,2100-01-01 00:00:00,2100-01-09 00:00:00\n")
    proc = _run_tool(*args)
    assert proc.returncode == 2 and "missing column 'itemid'" in proc.stderr
    (icu / "procedureevents.csv").write_text("hadm_id,itemid,starttime,endtime\n20,225792,2100-01-01 00:00:00,"
                                             "9 Jan 2100\n")
    proc = _run_tool(*args)
    assert proc.returncode == 2 and "line 2: endtime '9 Jan 2100' is not a date-time" in proc.stderr
    assert not (tmp_path / "o").exists()
