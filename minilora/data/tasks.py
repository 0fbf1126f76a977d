"""Downstream outcome tasks: the van Aken CSVs, the two-column ``text,label`` re-uploads, and any CSV/JSONL.

The label vocabulary comes from the training split. Rows of val/test whose label is unseen in training cannot be
scored as a class: they are counted, reported and left out (single-label); unseen codes of multi-label rows are
counted and dropped from that row's targets. Rows with empty text are counted and skipped. Nothing is silent.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minilora.data.notes import clean_note, csv_error_line, describe_fields
from minilora.data.synthetic import TASKS, task_spec
from minilora.tokenizer import Tokenizer

KINDS = ("binary", "multiclass", "multilabel")


class TaskDataError(ValueError):
    """Bad task data: one line naming the file, the field and the expectation."""


@dataclass
class Split:
    """One split: row ids, cleaned texts and targets (class index [n] or multi-hot [n, L])."""

    ids: list[str]
    texts: list[str]
    targets: np.ndarray
    raw_labels: list[str]


@dataclass
class TaskData:
    name: str
    kind: str
    labels: list[str]
    splits: dict[str, Split]
    report: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: rows, empty_text, unknown_labels

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # -sig: a leading byte-order mark is dropped


def read_rows(path: Path, columns: list[str], list_sep: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    """(line number where the row starts, row) from a CSV or JSONL(.gz) file, checking that ``columns`` exist and
    (CSV) that every row has the header's number of fields. A JSON list value (multi-label codes) is joined with
    ``list_sep``."""
    if path.is_dir():
        raise TaskDataError(f"{path}: is a folder, expected a CSV or JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise TaskDataError(f"{path}: empty file")
    is_jsonl = bool({".jsonl", ".json", ".ndjson"} & set(path.suffixes))
    csv.field_size_limit(2**31 - 1)
    with read_errors(path):
        with _open_text(path) as fh:
            if is_jsonl:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise TaskDataError(f"{path}: line {i} is not valid JSON") from None
                    if not isinstance(row, dict):
                        raise TaskDataError(f"{path}: line {i} is a JSON {_json_kind(row)}, expected an object")
                    nested = [c for c in columns if isinstance(row.get(c), dict)]
                    if nested:
                        raise TaskDataError(f"{path}: line {i}: field {nested[0]!r} is a JSON object, expected a "
                                            "string, number or list")
                    missing = [c for c in columns if c not in row]
                    if missing:
                        raise TaskDataError(f"{path}: line {i} has no field {missing[0]!r} "
                                            f"(fields: {describe_fields(row)})")
                    yield i, {c: "" if row[c] is None else (row[c] if isinstance(row[c], str) else
                                                           list_sep.join(map(str, row[c])) if isinstance(row[c], list)
                                                           else str(row[c])) for c in row}
            else:
                reader = csv.DictReader(fh, strict=True)  # strict: an unclosed quote is an error, not one huge row
                with _csv_errors(path, reader, 1):
                    header = reader.fieldnames or []
                missing = [c for c in columns if c not in header]
                if missing:
                    raise TaskDataError(f"{path}: missing column {missing[0]!r} "
                                        f"(columns: {describe_fields(header, columns)})")
                twice = [c for c in columns if header.count(c) > 1]
                if twice:  # DictReader would keep the last of them
                    raise TaskDataError(f"{path}: column {twice[0]!r} appears {header.count(twice[0])} times in the "
                                        "header; expected it once")
                while True:
                    start = reader.line_num + 1  # a row's first line: its id when the file has none
                    with _csv_errors(path, reader, start):
                        row = next(reader, None)
                    if row is None:
                        return
                    extra, short = row.get(None) or [], sum(v is None for v in row.values())
                    if extra or short:  # DictReader files surplus fields under None and fills missing ones with None
                        raise TaskDataError(f"{path}: line {reader.line_num}: row has "
                                            f"{len(header) + len(extra) - short} fields, expected {len(header)} as "
                                            "in the header (an unquoted comma or line break in the text?)")
                    yield start, row


@contextlib.contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """Reading ``path`` inside: undecodable text, a .gz name on other data and I/O errors become TaskDataErrors."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except gzip.BadGzipFile:  # its message quotes the file's first bytes
        raise TaskDataError(f"{path}: not a gzip file, though its name ends in .gz") from None
    except (OSError, EOFError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None


@contextlib.contextmanager
def _csv_errors(path: Path, reader: csv.DictReader, row_start: int) -> Iterator[None]:
    """A malformed CSV row (read inside, starting on line ``row_start``) becomes a TaskDataError naming its line."""
    try:
        yield
    except csv.Error as e:
        # reader.reader: the DictReader's own line_num moves only when a row is read well
        raise TaskDataError(csv_error_line(path, e, row_start, reader.reader.line_num)) from None


def _json_kind(value: object) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


MAX_LABEL_CHARS = 100  # a longer class name or code is text in the wrong column

# NaN written out (str of a float NaN, JSON NaN): never a class name; "none" or "NA" can be one, so they are taken
MISSING_LABELS = {"nan"}


def split_codes(value: str, sep: str) -> list[str]:
    """The codes of a multi-label field; a missing value ('nan') is no codes, as an empty field or a JSON null."""
    if value.strip().lower() in MISSING_LABELS:
        return []
    return [v.strip() for v in value.split(sep) if v.strip()]


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric order when every label is an integer (0, 1, 2, ... 10), else lexical."""
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def load_task_files(
    files: dict[str, Path],
    name: str,
    kind: str,
    text_col: str = "text",
    label_col: str = "label",
    id_col: str | None = "id",
    label_sep: str = ",",
) -> TaskData:
    """Read train/val/test files of one task; ``kind`` is binary, multiclass or multilabel."""
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r}: expected one of {KINDS}")
    multilabel = kind == "multilabel"
    raw: dict[str, list[tuple[str, str, str]]] = {}
    report: dict[str, dict[str, int]] = {}
    for split, path in files.items():
        rows, empty = [], 0
        for line, row in read_rows(Path(path), [text_col, label_col, *id_columns(id_col)], list_sep=label_sep):
            text = clean_note(row[text_col] or "")
            label = (row[label_col] or "").strip()
            if not text:
                empty += 1
                continue
            if not label and not multilabel:
                raise TaskDataError(f"{path}: line {line} has an empty {label_col!r}; expected a class label")
            if label.lower() in MISSING_LABELS and not multilabel:
                raise TaskDataError(f"{path}: line {line} has {label!r} as its {label_col!r}: a missing value, "
                                    "expected a class label")
            rid = row.get(id_col) if id_col else None
            rows.append((rid if rid not in (None, "") else f"{Path(path).name}:{line}", text, label))
        if not rows:
            raise TaskDataError(f"{path}: no rows with text")
        raw[split] = rows
        report[split] = {"rows": len(rows), "empty_text": empty, "unknown_labels": 0}
    train_labels = {lab for _, _, v in raw["train"] for lab in (split_codes(v, label_sep) if multilabel else [v])}
    labels = _sort_labels(train_labels)
    if not multilabel and len(labels) < 2:
        raise TaskDataError(f"{files['train']}: {label_col!r} has a single class in training; expected at least 2")
    if multilabel and not labels:
        raise TaskDataError(f"{files['train']}: {label_col!r} holds no label code in training; expected at least one")
    long = sum(len(lab) > MAX_LABEL_CHARS for lab in labels)
    rows = len(raw["train"])
    if long or (not multilabel and len(labels) > 20 and 2 * len(labels) > rows):  # labels go into files and plots
        raise TaskDataError(f"{files['train']}: {label_col!r} looks like free text, not labels ({len(labels)} distinct "
                            f"values in {rows} rows" + (f", {long} over {MAX_LABEL_CHARS} characters" if long else "")
                            + "); expected class labels or codes (is --label-col right?)")
    if kind == "binary" and len(labels) > 2:
        raise TaskDataError(f"{files['train']}: {label_col!r} has {len(labels)} distinct values in training; the "
                            f"{name} task is binary (expected 2, e.g. 0 and 1)")
    index = {lab: i for i, lab in enumerate(labels)}
    splits = {}
    for split, rows in raw.items():
        ids, texts, targets, raw_labels = [], [], [], []
        unknown = 0
        for rid, text, value in rows:
            if multilabel:
                codes = split_codes(value, label_sep)
                known = [index[c] for c in codes if c in index]
                unknown += len(codes) - len(known)
                t = np.zeros(len(labels), dtype=np.uint8)
                t[known] = 1
            else:
                if value not in index:
                    unknown += 1
                    continue
                t = index[value]
            ids.append(rid)
            texts.append(text)
            targets.append(t)
            raw_labels.append(value)
        report[split]["unknown_labels"] = unknown
        if not ids:
            raise TaskDataError(f"{files[split]}: no row with text and a label seen in training ({unknown} left out)")
        splits[split] = Split(ids, texts, np.stack(targets) if multilabel else np.array(targets, dtype=np.int64),
                              raw_labels)
    return TaskData(name, kind, labels, splits, report)


def fingerprint(data: TaskData) -> str:
    """A short hash of a task's content (kind, labels and every split's ids, texts and labels): what a resumed run
    must train on again, whatever the files are called or however they were copied."""
    h = hashlib.sha256(json.dumps([data.kind, data.labels]).encode())
    for split in sorted(data.splits):
        s = data.splits[split]
        for part in (s.ids, s.texts, s.raw_labels):
            h.update(split.encode() + b"\0" + "\0".join(part).encode() + b"\1")
    return h.hexdigest()[:20]


DEFAULT_ID_COL = "id"  # optional: without it a row's id is <file>:<line>; any other --id-col must exist


def id_columns(id_col: str | None) -> list[str]:
    """The id column as a required column: none for the default (optional), the column for any other."""
    return [id_col] if id_col and id_col != DEFAULT_ID_COL else []


def warn_duplicate_ids(path: Path, ids: list[str]) -> None:
    """One line on stderr when ``ids`` repeat (rows that cannot be told apart by id); ids are not note text."""
    repeated = len(ids) - len(set(ids))
    if repeated:
        print(f"warning: {path}: {repeated} rows repeat an id of an earlier row (predictions cannot be joined back "
              "by id alone)", file=sys.stderr)


def van_aken_files(task: str, data_dir: Path) -> tuple[dict[str, Path], str, str]:
    """The split files of a named task in ``data_dir`` and its (kind, label column); accepts val or dev."""
    spec = task_spec(task)
    files = {}
    for split, alt in (("train", "train"), ("val", spec.splits[1]), ("test", "test")):
        names = [spec.file(s) for s in dict.fromkeys((split, alt, "dev" if split == "val" else split))]
        cands = [data_dir / n for n in names] + [data_dir / f"{n}.gz" for n in names]  # gzipped copies too
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{cands[0]}: missing (expected the {task} task's {split} split in {data_dir})")
        files[split] = found
    with read_errors(files["train"]), _open_text(files["train"]) as fh:
        header = next(csv.reader(fh), [])
    label_col = spec.label_column if spec.label_column in header else "label"
    return files, spec.kind, label_col


def load_named_task(task: str, data_dir: str | Path) -> TaskData:
    """A van Aken / BEEP task (or its two-column ``text,label`` re-upload) from ``data_dir``."""
    files, kind, label_col = van_aken_files(task, Path(data_dir))
    return load_task_files(files, task_spec(task).name, kind, label_col=label_col)


MIMIC4_SOURCE = "MIMIC-IV"  # the "source" in summary.json of a folder that tools/mimic4_tasks.py built


def data_source(data_dir: str | Path) -> str:
    """What a --data-dir holds, for eval.py's report: ``mimic-iv`` when tools/mimic4_tasks.py built it (its
    summary.json says so), else ``mimic`` (van Aken's MIMIC-III files, which the paper's numbers are for)."""
    try:
        summary = json.loads((Path(data_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return "mimic"
    return "mimic-iv" if isinstance(summary, dict) and summary.get("source") == MIMIC4_SOURCE else "mimic"


def print_report(data: TaskData) -> None:
    """Counts per split on stderr (never text): rows, empty texts skipped, unseen labels."""
    for split, r in data.report.items():
        extra = []
        if r["empty_text"]:
            extra.append(f"{r['empty_text']} empty texts skipped")
        if r["unknown_labels"]:
            what = "label codes not seen in training dropped" if data.kind == "multilabel" else \
                "rows with a label not seen in training left out"
            extra.append(f"{r['unknown_labels']} {what}")
        more = f" ({'; '.join(extra)})" if extra else ""
        print(f"{data.name} {split}: {len(data.splits[split].ids):,} rows{more}", file=sys.stderr)
    train = set(data.splits["train"].texts) if "train" in data.splits else set()  # references, not copies
    for split in ("val", "test"):
        shared = sum(t in train for t in data.splits[split].texts) if split in data.splits else 0
        if shared:
            print(f"warning: {data.name} {split}: {shared:,} notes also in train (the same cleaned text); its AUROC "
                  "overstates what unseen notes would get", file=sys.stderr)


# ---- tokenised examples and length-bucketed batches ----

class EncodedSplit(torch.utils.data.Dataset):
    """Token ids (truncated to ``max_seq_len``, BOS when the model uses it) with their targets."""

    def __init__(self, split: Split, tokenizer: Tokenizer, max_seq_len: int, workers: int = 1):
        ids = tokenizer.encode_batch(split.texts, bos=tokenizer.add_bos, workers=workers)
        self.input_ids = [x[:max_seq_len] for x in ids]
        self.targets = split.targets
        self.lengths = np.array([len(x) for x in self.input_ids])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor(self.input_ids[i]), "labels": torch.as_tensor(self.targets[i])}


def collate_classification(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` and stack targets; multi-hot targets become float."""
    T = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = b["input_ids"]
        mask[i, : len(b["input_ids"])] = 1
    labels = torch.stack([b["labels"] for b in batch])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.float() if labels.dim() == 2 else labels}


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, window: int = 50) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within windows of ``window`` batches, shuffle batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches for inference, sorted by length (least padding); callers restore the order."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


__all__ = ["TASKS", "TaskData", "Split", "TaskDataError", "load_task_files", "load_named_task", "van_aken_files",
           "EncodedSplit", "collate_classification", "bucketed_batches", "eval_batches", "print_report"]
