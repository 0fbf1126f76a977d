"""Make a fixed MTSamples task (``medical_specialty``, multi-class) and notes for DAPT, from ../shared/data.

Writes ``train.csv``, ``val.csv``, ``test.csv`` (columns id, text, label; a stratified 70/10/20 split by note,
seeded) for the specialties with at least ``--min-count`` notes, and ``dapt_notes.jsonl`` with the transcriptions
of the TRAINING notes only (so DAPT never sees validation or test text). Only ids and counts are printed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from minilora.cli import InputError, positive_int, run_cli
from minilora.data.tasks import read_errors

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtsamples" / "mtsamples.jsonl.gz"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="mtsamples.jsonl.gz (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/mtsamples-data"),
                   help="folder for the task CSVs and DAPT notes (default %(default)s)")
    p.add_argument("--min-count", type=positive_int, default=100,
                   help="keep specialties with at least this many notes (default %(default)s)")
    p.add_argument("--max-per-class", type=positive_int, default=None,
                   help="cap notes per specialty (faster runs; default: no cap)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default %(default)s)")
    args = p.parse_args(argv)
    if not args.source.is_file():
        raise FileNotFoundError(f"{args.source}: not found (MTSamples ships in ../shared/data on developer machines)")
    rows = []
    with read_errors(args.source), gzip.open(args.source, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{args.source}: line {i} is not valid JSON") from None
    rows = [r for r in rows if isinstance(r, dict) and (r.get("transcription") or "").strip()
            and isinstance(r.get("medical_specialty"), str) and "note_id" in r]
    label = {r["note_id"]: r["medical_specialty"].strip() for r in rows}
    counts = Counter(label.values())
    keep = sorted(c for c, n in counts.items() if n >= args.min_count)
    if len(keep) < 2:
        raise InputError(f"{args.source}: {len(keep)} specialties have at least --min-count {args.min_count} notes; "
                         "a task needs 2 or more (lower --min-count)")
    rng = np.random.default_rng(args.seed)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for cls in keep:
        members = [r for r in rows if label[r["note_id"]] == cls]
        order = rng.permutation(len(members))
        if args.max_per_class:
            order = order[: args.max_per_class]
        n_test, n_val = round(0.2 * len(order)), round(0.1 * len(order))
        for k, i in enumerate(order):
            split = "test" if k < n_test else "val" if k < n_test + n_val else "train"
            splits[split].append(members[i])
    args.out.mkdir(parents=True, exist_ok=True)
    for split, members in splits.items():
        tmp = args.out / f".{split}.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, quoting=csv.QUOTE_ALL)
            w.writerow(["id", "text", "label"])
            for r in sorted(members, key=lambda r: str(r["note_id"])):
                w.writerow([r["note_id"], r["transcription"], label[r["note_id"]]])
        os.replace(tmp, args.out / f"{split}.csv")
    tmp = args.out / ".dapt_notes.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in splits["train"]:
            fh.write(json.dumps({"note_id": r["note_id"], "text": r["transcription"]}) + "\n")
    os.replace(tmp, args.out / "dapt_notes.jsonl")
    sizes = ", ".join(f"{s} {len(m)}" for s, m in splits.items())
    print(f"{len(keep)} specialties (>= {args.min_count} notes): {sizes}; DAPT notes = the training notes -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
