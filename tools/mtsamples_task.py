"""Make a fixed MTSamples task (``medical_specialty``, multi-class) and notes for DAPT, from ../shared/data.

Writes ``train.csv``, ``val.csv``, ``test.csv`` (columns id, text, label; a stratified 70/10/20 split by text,
seeded) for the specialties with at least ``--min-count`` notes, and ``dapt_notes.jsonl`` with the transcriptions
of the TRAINING notes only (so DAPT never sees validation or test text). Only ids and counts are printed.

MTSamples files most reports two or more times: under their specialty and under a document type or a broader one
("Surgery", "Consult - History and Phy.", "Radiology"). The split is therefore by text: every copy of a text goes
to the same split (so no test text is trained on, by the task or by DAPT), a copy repeating a text and its label is
dropped, and a text filed under two kept specialties stays in the task once per specialty, an ambiguity that is
MTSamples' own and that bounds the AUROC any model can reach on it.
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

from minilora.cli import InputError, check_out_folder, positive_int, remove_outputs, run_cli
from minilora.data.tasks import read_errors

OUTPUTS = ("train.csv", "val.csv", "test.csv", "dapt_notes.jsonl")
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
    p.add_argument("--overwrite", action="store_true", help="replace the task files of an earlier run in --out")
    args = p.parse_args(argv)
    check_out_folder(args.out, OUTPUTS, resume=False, overwrite=args.overwrite, resumable=False)
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
    groups: dict[str, dict[str, dict]] = {}  # text (whitespace-normalised) -> {specialty: its first row}
    for r in sorted(rows, key=lambda r: str(r["note_id"])):
        groups.setdefault(" ".join(r["transcription"].split()), {}).setdefault(r["medical_specialty"].strip(), r)
    repeats = len(rows) - sum(len(g) for g in groups.values())
    counts = Counter(cls for g in groups.values() for cls in g)
    keep = sorted(c for c, n in counts.items() if n >= args.min_count)
    if len(keep) < 2:
        raise InputError(f"{args.source}: {len(keep)} specialties have at least --min-count {args.min_count} notes; "
                         "a task needs 2 or more (lower --min-count)")
    texts = [{c: r for c, r in g.items() if c in keep} for g in groups.values()]
    texts = [g for g in texts if g]
    rng = np.random.default_rng(args.seed)
    splits: dict[str, list[tuple[str, dict]]] = {"train": [], "val": [], "test": []}
    for cls in keep:  # stratified by each text's first kept specialty (by note id)
        members = [g for g in texts if next(iter(g)) == cls]
        order = rng.permutation(len(members))
        if args.max_per_class:
            order = order[: args.max_per_class]
        n_test, n_val = round(0.2 * len(order)), round(0.1 * len(order))
        for k, i in enumerate(order):
            split = "test" if k < n_test else "val" if k < n_test + n_val else "train"
            splits[split] += list(members[i].items())
    several = sum(len(g) > 1 for g in texts)
    print(f"{len(texts):,} distinct texts in {len(keep)} specialties; {repeats:,} repeated copies dropped; "
          f"{several:,} texts filed under two or more of the specialties (each copy in one split)")
    if args.overwrite:
        remove_outputs(args.out, OUTPUTS)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, members in splits.items():
        tmp = args.out / f".{split}.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, quoting=csv.QUOTE_ALL)
            w.writerow(["id", "text", "label"])
            for cls, r in sorted(members, key=lambda m: str(m[1]["note_id"])):
                w.writerow([r["note_id"], r["transcription"], cls])
        os.replace(tmp, args.out / f"{split}.csv")
    tmp = args.out / ".dapt_notes.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        seen = set()
        for _, r in splits["train"]:  # each training text once
            if r["transcription"] not in seen:
                seen.add(r["transcription"])
                fh.write(json.dumps({"note_id": r["note_id"], "text": r["transcription"]}) + "\n")
    os.replace(tmp, args.out / "dapt_notes.jsonl")
    sizes = ", ".join(f"{s} {len(m)}" for s, m in splits.items())
    print(f"{len(keep)} specialties (>= {args.min_count} notes): {sizes}; DAPT notes = the training notes -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
