"""Build the paper's outcome tasks (MOR, LOS, DIAG, PROC, PMV) from MIMIC-IV and MIMIC-IV-Note, in van Aken's and
BEEP's file formats.

The paper's tasks come from van Aken et al.'s MIMIC-III admission notes. For a site with MIMIC-IV instead, this
tool makes the same four tasks from the hosp module's ``admissions``, ``diagnoses_icd`` and ``procedures_icd``
tables and the discharge summaries of MIMIC-IV-Note, and, given the icu module (``--icu``), BEEP's PMV from its
``procedureevents``, so that ``train_task.py --task <name> --data-dir OUT`` reads them as it reads van Aken's and
BEEP's files:

- text: the parts of the discharge summary known at admission (chief complaint, present illness, medical history,
  medications on admission, allergies, the admission physical exam, family and social history), under van Aken's
  section names; sentences that mention death are dropped. Everything else (procedures, results, hospital course,
  the discharge exam, discharge diagnoses and medications) is left out, because it gives the labels away.
- MOR ``MP_IN_adm``: ``hospital_expire_flag``. LOS ``LOS_WEEKS_adm``: ``los_label`` 0: <= 3 days, 1: > 3-7,
  2: > 7-14, 3: > 14 (dischtime - admittime; in-hospital deaths left out). DIAG ``DIA_GROUPS_3_DIGITS_adm`` and
  PROC ``PRO_GROUPS_3_DIGITS_adm``: ``short_codes``, the admission's codes cut to 3 characters (ICD-9 diagnosis V
  and E codes to 4), comma-joined; admissions without a code of the chosen ICD version are left out.
- PMV ``pmv_{train,dev,test}`` ``label`` (with ``--icu``): 1 if the admission's invasive ventilation lasted more than
  7 days in all, else 0. The cohort is the admissions with invasive ventilation: ``procedureevents`` rows of itemid
  225792 ("Invasive Ventilation"), rows of status "Rewritten" left out (a later row replaces them); the duration is
  that of the union of their [starttime, endtime] intervals, so overlapping or repeated rows count once.
- splits: by patient (a seeded hash of ``subject_id``: 70 / 10 / 20 % train / val / test), the same for every task.
  ``subject_splits.csv.gz`` lists them; ``--dapt-notes`` writes the notes of training patients only, so a clinical
  adapter trained on it has not read the validation or test patients' notes.

Only counts are printed, never text.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import hashlib
import io
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from minilora.cli import InputError, run_cli, write_json_atomic
from minilora.data.synthetic import ADMISSION_SECTIONS, TASKS, remove_death_mentions
from minilora.data.tasks import MIMIC4_SOURCE, read_rows
from minilora.files import read_json_object

SPLITS = (("train", 0.7), ("val", 0.8), ("test", 1.0))  # upper bounds of the hash's unit interval
TASK_NAMES = ("mortality", "los", "diagnoses", "procedures")  # from the hosp tables; "pmv" needs --icu
INVASIVE_VENTILATION = "225792"  # itemid of procedureevents (d_items: "Invasive Ventilation")
PMV_DAYS = 7.0  # BEEP's prolonged mechanical ventilation: more than 7 days

# Section headers of MIMIC-IV discharge summaries (lower case) -> van Aken's section name, or None: a section
# that is left out. A kept section ends at the next known header, or at any header that names discharge, the
# hospital course, results, procedures, diagnoses or follow-up (the discharge exam inside "Physical Exam", say).
_KEEP = {
    "CHIEF COMPLAINT": ("chief complaint", "cc"),
    "PRESENT ILLNESS": ("history of present illness", "present illness", "hpi"),
    "MEDICAL HISTORY": ("past medical history", "medical history", "pmh"),
    "MEDICATION ON ADMISSION": ("medications on admission", "admission medications", "meds on admission",
                                "medications prior to admission", "home medications"),
    "ALLERGIES": ("allergies",),
    "PHYSICAL EXAM": ("physical exam", "physical examination", "admission physical exam", "admission exam",
                      "physical exam on admission"),
    "FAMILY HISTORY": ("family history",),
    "SOCIAL HISTORY": ("social history",),
}
assert set(_KEEP) == set(ADMISSION_SECTIONS)
_DROP = ("name", "unit no", "admission date", "discharge date", "date of birth", "sex", "service", "attending",
         "major surgical or invasive procedure", "pertinent results", "brief hospital course", "hospital course",
         "discharge medications", "discharge disposition", "facility", "discharge diagnosis", "discharge diagnoses",
         "discharge condition", "discharge instructions", "followup instructions")
SECTIONS: dict[str, str | None] = {h: name for name, hs in _KEEP.items() for h in hs} | dict.fromkeys(_DROP)
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&,()'-]{0,60}?)[ \t]*:(.*)$")
_LEAKS = re.compile(r"discharge|hospital course|result|procedure|diagnos|transitional|follow|labs|imaging|studies",
                    re.I)


def admission_text(note: str) -> str:
    """The admission-time sections of a discharge summary as ``NAME: text`` blocks in van Aken's order, with
    sentences that mention death dropped; ``""`` when the note has none of them."""
    found: dict[str, list[str]] = defaultdict(list)
    current: str | None = None
    for line in note.splitlines():
        m = _HEADER.match(line)
        if m:
            header = " ".join(m.group(1).lower().split())
            if header in SECTIONS:
                current, line = SECTIONS[header], m.group(2)
            elif current is not None and _LEAKS.search(header):
                current = None
        if current is not None and line.strip():
            found[current].append(line.strip())
    blocks = ((name, remove_death_mentions("\n".join(found[name]))) for name in ADMISSION_SECTIONS if found[name])
    return "\n\n".join(f"{name}: {text}" for name, text in blocks if text)


def split_of(subject_id: str, seed: int) -> str:
    """``train``, ``val`` or ``test`` for a patient: a seeded hash, so it needs no state and never changes."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()[:8], "big") / 2**64
    return next(name for name, upper in SPLITS if u < upper)


def los_label(days: float) -> int:
    return 0 if days <= 3 else 1 if days <= 7 else 2 if days <= 14 else 3


def short_code(code: str, version: str, diagnosis: bool) -> str:
    code = code.strip().upper().replace(".", "")
    return code[:4] if diagnosis and version == "9" and code[:1] in ("V", "E") else code[:3]


def _table(folder: Path, name: str, module: str = "hosp") -> Path:
    for cand in (folder / f"{name}.csv.gz", folder / f"{name}.csv"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{folder / name}.csv.gz: no such file (expected the MIMIC-IV {module} table {name})")


def _time(path: Path, line: int, field: str, value: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"{path}: line {line}: {field} {value!r} is not a date-time (YYYY-MM-DD HH:MM:SS)") from None


def read_admissions(hosp: Path) -> dict[str, dict]:
    """hadm_id -> subject_id, LOS in days and the in-hospital death flag."""
    path = _table(hosp, "admissions")
    out = {}
    for line, row in read_rows(path, ["subject_id", "hadm_id", "admittime", "dischtime", "hospital_expire_flag"]):
        if row["hospital_expire_flag"] not in ("0", "1"):
            raise InputError(f"{path}: line {line}: hospital_expire_flag {row['hospital_expire_flag']!r} is not 0 or 1")
        days = (_time(path, line, "dischtime", row["dischtime"])
                - _time(path, line, "admittime", row["admittime"])).total_seconds() / 86400
        out[row["hadm_id"]] = {"subject": row["subject_id"], "los_days": days, "died": row["hospital_expire_flag"]}
    if not out:
        raise InputError(f"{path}: no admissions")
    return out


def read_codes(hosp: Path, table: str, icd: str) -> dict[str, set[str]]:
    """hadm_id -> short codes of ICD version ``icd`` (9, 10, or both: then prefixed ``ICD9-`` / ``ICD10-``)."""
    path = _table(hosp, table)
    codes: dict[str, set[str]] = defaultdict(set)
    for line, row in read_rows(path, ["hadm_id", "icd_code", "icd_version"]):
        version = row["icd_version"].strip()
        if version not in ("9", "10"):
            raise InputError(f"{path}: line {line}: icd_version {version!r} is not 9 or 10")
        if icd in (version, "both") and row["icd_code"].strip():
            code = short_code(row["icd_code"], version, table == "diagnoses_icd")
            codes[row["hadm_id"]].add(f"ICD{version}-{code}" if icd == "both" else code)
    return codes


def read_ventilation(icu: Path, counts: Counter[str]) -> dict[str, float]:
    """hadm_id -> days of invasive ventilation: the length of the union of the admission's ``procedureevents``
    intervals of itemid 225792, leaving out rows of status "Rewritten" and counting in ``counts`` the rows left
    out for a missing admission or an end before the start."""
    path = _table(icu, "procedureevents", "icu")
    intervals: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for line, row in read_rows(path, ["hadm_id", "itemid", "starttime", "endtime"]):
        if row["itemid"].strip() != INVASIVE_VENTILATION:
            continue
        if (row.get("statusdescription") or "").strip().lower() == "rewritten":
            counts["ventilation_rows_rewritten"] += 1
            continue
        if not row["hadm_id"].strip():
            counts["ventilation_rows_without_admission"] += 1
            continue
        start = _time(path, line, "starttime", row["starttime"])
        end = _time(path, line, "endtime", row["endtime"])
        if end < start:
            counts["ventilation_rows_ending_before_start"] += 1
            continue
        intervals[row["hadm_id"].strip()].append((start, end))
    return {hadm: _union_seconds(spans) / 86400 for hadm, spans in intervals.items()}


def _union_seconds(spans: list[tuple[dt.datetime, dt.datetime]]) -> float:
    """Seconds covered by the union of the intervals: each counts only past the furthest end before it."""
    total, covered = 0.0, None
    for start, end in sorted(spans):
        if covered is not None:
            start = max(start, covered)
        total += max((end - start).total_seconds(), 0.0)
        covered = end if covered is None else max(covered, end)
    return total


class AtomicOutputs:
    """Gzipped CSV writers under temporary names, renamed into place together on success, removed on failure."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[Path, io.TextIOWrapper, csv.writer]] = {}

    def writer(self, path: Path, header: list[str]) -> csv.writer:
        if path not in self.files:
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            fh = io.TextIOWrapper(gzip.open(tmp, "wb", compresslevel=6), encoding="utf-8", newline="")
            w = csv.writer(fh, quoting=csv.QUOTE_ALL)
            w.writerow(header)
            self.files[path] = (tmp, fh, w)
        return self.files[path][2]

    def commit(self) -> None:
        for path, (tmp, fh, _) in self.files.items():
            fh.close()
            os.replace(tmp, path)
        self.files.clear()

    def discard(self) -> None:
        for tmp, fh, _ in self.files.values():
            fh.close()
            tmp.unlink(missing_ok=True)
        self.files.clear()


def iter_note_rows(paths: list[Path], needs_subject: bool) -> Iterator[dict[str, str]]:
    columns = ["note_id", "hadm_id", "text"] + (["subject_id"] if needs_subject else [])
    for path in paths:
        for _, row in read_rows(path, columns):
            yield row


def build(args: argparse.Namespace) -> dict:
    admissions = read_admissions(args.hosp)
    diagnoses = read_codes(args.hosp, "diagnoses_icd", args.icd)
    procedures = read_codes(args.hosp, "procedures_icd", args.icd)
    counts: Counter[str] = Counter()
    ventilation = read_ventilation(args.icu, counts) if args.icu is not None else None
    tasks = TASK_NAMES + (("pmv",) if ventilation is not None else ())
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Counter[str]] = {t: Counter() for t in tasks}
    positives: Counter[str] = Counter()
    train_codes: dict[str, set[str]] = {"diagnoses": set(), "procedures": set()}
    seen: set[str] = set()
    outputs = AtomicOutputs()
    try:
        from tqdm import tqdm

        if args.dapt_notes is not None:
            args.dapt_notes.parent.mkdir(parents=True, exist_ok=True)
            outputs.writer(args.dapt_notes, ["note_id", "text"])
            counts["dapt_notes"] = 0

        notes = tqdm(iter_note_rows(args.notes, args.dapt_notes is not None), desc="notes", unit=" notes",
                     disable=not args.progress, file=sys.stderr)
        for row in notes:
            counts["notes"] += 1
            if args.dapt_notes is not None:
                subject = row["subject_id"] or admissions.get(row["hadm_id"], {}).get("subject")
                if subject and split_of(subject, args.seed) == "train":
                    outputs.writer(args.dapt_notes, ["note_id", "text"]).writerow([row["note_id"], row["text"]])
                    counts["dapt_notes"] += 1
            if row.get("note_type", "DS") != "DS":
                continue
            adm = admissions.get(row["hadm_id"])
            if adm is None:
                counts["discharge_notes_without_admission"] += 1
                continue
            if row["hadm_id"] in seen:
                counts["duplicate_discharge_notes"] += 1
                continue
            seen.add(row["hadm_id"])
            text = admission_text(row["text"])
            if not text:
                counts["discharge_notes_without_admission_sections"] += 1
                continue
            split = split_of(adm["subject"], args.seed)
            labels = {"mortality": adm["died"]}
            if adm["died"] == "1":
                counts["los_excluded_deaths"] += 1
            elif adm["los_days"] < 0:
                counts["los_excluded_negative_stay"] += 1
            else:
                labels["los"] = str(los_label(adm["los_days"]))
            for task, codes in (("diagnoses", diagnoses), ("procedures", procedures)):
                if codes.get(row["hadm_id"]):
                    labels[task] = ",".join(sorted(codes[row["hadm_id"]]))
                    if split == "train":
                        train_codes[task] |= codes[row["hadm_id"]]
            if ventilation is not None and row["hadm_id"] in ventilation:
                labels["pmv"] = "1" if ventilation[row["hadm_id"]] > PMV_DAYS else "0"
            for task, label in labels.items():
                spec = TASKS[task]
                path = args.out / f"{spec.prefix}_{_split_file(task, split)}.csv.gz"
                outputs.writer(path, ["id", "text", spec.label_column]).writerow([row["hadm_id"], text, label])
                rows[task][split] += 1
                positives[f"{task}/{split}"] += task in ("mortality", "pmv") and label == "1"
        missing = [f"{TASKS[t].prefix}_{_split_file(t, s)}" for t in tasks for s, _ in SPLITS if not rows[t][s]]
        if missing:
            raise InputError(f"{args.out}: no rows for {', '.join(missing)} (too few admissions with discharge notes "
                             f"in {', '.join(map(str, args.notes))}?)")
        split_rows = sorted({(a["subject"], split_of(a["subject"], args.seed)) for a in admissions.values()})
        w = outputs.writer(args.out / "subject_splits.csv.gz", ["subject_id", "split"])
        w.writerows(split_rows)
        outputs.commit()
    finally:
        outputs.discard()
    counts["admissions"] = len(admissions)
    counts["admissions_without_discharge_note"] = len(admissions.keys() - seen)
    if ventilation is not None:
        counts["ventilated_admissions"] = len(ventilation)
        counts["ventilated_admissions_without_discharge_note"] = len(ventilation.keys() - seen)
        counts["ventilated_admissions_unknown"] = len(ventilation.keys() - admissions.keys())
    return {
        "source": MIMIC4_SOURCE,  # train_task.py labels runs on this folder "mimic-iv" (minilora.data.tasks)
        "settings": {"hosp": str(args.hosp), "notes": [str(p) for p in args.notes], "icd": args.icd,
                     "icu": str(args.icu) if args.icu else None, "seed": args.seed,
                     "dapt_notes": str(args.dapt_notes.resolve()) if args.dapt_notes else None},
        "rows": {t: {s: rows[t][s] for s, _ in SPLITS} for t in tasks},
        "mortality_positives": {s: positives[f"mortality/{s}"] for s, _ in SPLITS},
        **({"pmv_positives": {s: positives[f"pmv/{s}"] for s, _ in SPLITS},
            "pmv_definition": {"itemid": int(INVASIVE_VENTILATION), "more_than_days": PMV_DAYS}}
           if ventilation is not None else {}),
        "codes_in_train": {t: len(c) for t, c in train_codes.items()},
        "counts": dict(counts),
    }


def read_earlier_settings(out: Path) -> dict | None:
    """The settings of an earlier build into ``out`` (its summary.json), or None."""
    try:
        settings = read_json_object(out / "summary.json").get("settings")
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def remove_stale(args: argparse.Namespace, summary: dict, earlier: dict | None) -> None:
    """After a build: remove the task files of an earlier build into the same --out that this one did not write (PMV
    without --icu now), which train_task.py would otherwise read as this build's; and an earlier build's DAPT notes
    that this one did not rewrite when the patient split may differ (their notes may belong to this build's
    validation or test patients): removed inside --out, warned about elsewhere."""
    for task in set(TASKS) - set(summary["rows"]):
        for split, _ in SPLITS:
            path = args.out / f"{TASKS[task].prefix}_{_split_file(task, split)}.csv.gz"
            if path.is_file():
                path.unlink()
                print(f"removed {path} (an earlier build's; this one has no {task})", file=sys.stderr)
    old_notes = (earlier or {}).get("dapt_notes")
    same_split = all((earlier or {}).get(k) == summary["settings"][k] for k in ("hosp", "notes", "seed"))
    new_notes = summary["settings"]["dapt_notes"]
    rewritten = bool(old_notes and new_notes and Path(old_notes).is_file()
                     and os.path.samefile(old_notes, new_notes))  # the same file, however spelt: this build's
    if old_notes and not rewritten and Path(old_notes).is_file() and not same_split:
        if Path(old_notes).resolve().is_relative_to(args.out.resolve()):  # the build's own folder: no user file
            Path(old_notes).unlink()
            print(f"removed {old_notes} (an earlier build's DAPT notes, of another patient split: they would hold "
                  "validation and test patients of this one; rebuild them with --dapt-notes)", file=sys.stderr)
        else:
            print(f"warning: {old_notes}: DAPT notes of an earlier build into {args.out}, with another patient split; "
                  "they may hold this build's validation or test patients: delete them, or rebuild them with "
                  "--dapt-notes", file=sys.stderr)


def _split_file(task: str, split: str) -> str:
    """The file name's split: BEEP's PMV files say ``dev`` where van Aken's say ``val``."""
    return dict(zip(("train", "val", "test"), TASKS[task].splits))[split]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosp", type=Path, required=True, help="MIMIC-IV hosp folder (admissions, diagnoses_icd, "
                                                             "procedures_icd as .csv.gz or .csv)")
    p.add_argument("--notes", type=Path, nargs="+", required=True,
                   help="MIMIC-IV-Note discharge.csv.gz (tasks use rows of note_type DS); radiology.csv.gz may follow "
                        "for --dapt-notes")
    p.add_argument("--icu", type=Path, default=None,
                   help="MIMIC-IV icu folder (procedureevents as .csv.gz or .csv): also build PMV, invasive "
                        "ventilation > 7 days, as BEEP's pmv_{train,dev,test} (default: PMV is not built)")
    p.add_argument("--out", type=Path, default=Path("data/mimic4-tasks"), help="output folder (default: %(default)s)")
    p.add_argument("--icd", choices=("9", "10", "both"), default="9",
                   help="ICD version of DIAG/PROC labels: 9 as the paper (default), 10, or both (codes prefixed ICD9-/"
                        "ICD10-)")
    p.add_argument("--seed", type=int, default=0, help="patient split seed (default 0)")
    p.add_argument("--dapt-notes", type=Path, default=None,
                   help="also write the --notes of training patients only to this .csv.gz (note_id, text), for "
                        "train_dapt.py --notes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    if args.dapt_notes is not None and not args.dapt_notes.name.endswith(".csv.gz"):
        raise InputError(f"--dapt-notes {args.dapt_notes}: expected a .csv.gz file name")
    earlier = read_earlier_settings(args.out)
    summary = build(args)
    write_json_atomic(args.out / "summary.json", summary)
    remove_stale(args, summary, earlier)
    print(f"admissions {summary['counts']['admissions']}, notes read {summary['counts']['notes']}", file=sys.stderr)
    for task, r in summary["rows"].items():
        extra = f" ({sum(summary['mortality_positives'].values())} deaths)" if task == "mortality" else ""
        extra = f" ({summary['codes_in_train'][task]} codes in train)" if task in ("diagnoses", "procedures") else extra
        if task == "pmv":
            extra = f" ({sum(summary['pmv_positives'].values())} ventilated > {PMV_DAYS:g} days)"
        print(f"{TASKS[task].prefix}: train {r['train']}, {_split_file(task, 'val')} {r['val']}, test {r['test']}"
              f"{extra}", file=sys.stderr)
    if args.dapt_notes is not None:
        print(f"{args.dapt_notes}: {summary['counts']['dapt_notes']} notes of training patients", file=sys.stderr)
    kept = ("admissions", "notes", "dapt_notes", "ventilated_admissions")
    skipped = {k: v for k, v in summary["counts"].items() if k not in kept and v}
    print("left out: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "nothing"), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
