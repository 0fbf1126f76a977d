"""Note readers, cleaning, errors, the token cache, the by-note split, packed/truncated datasets and collate.

The oracle tokenizer is a byte-level BPE with no merges: a document's ids are BOS, the UTF-8 bytes of the cleaned
note, EOS, so expected token streams are written down independently of the code under test.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path
from minilora.data import (
    NotesError,
    NoteStats,
    PackedDataset,
    TruncatedDataset,
    build_token_cache,
    clean_note,
    collate,
    epoch_order,
    iter_notes,
)
from minilora.data.notes import validation_mask
from minilora.tokenizer import BYTE_TO_UNICODE, GPT2_PATTERN, BPETokenizer, SentencePieceTokenizer

BOS, EOS = 256, 257
MIMIC_NOTES = [
    (
        "10000032-DS-21",
        'Name: [**Known lastname 123**]\nAdmission Date: [**2180-5-6**]\n\nChief Complaint:\tchest pain, "bad"',
    ),
    ("10000032-DS-22", "  \n  "),
    ("10000084-DS-17", "Service: MEDICINE\r\nAllergies: NKDA,  penicillin\n"),
    ("10000117-DS-1", "[** **]"),
    ("10000117-DS-2", "Short note."),
]


def byte_tokenizer(vocab_size: int = 258) -> BPETokenizer:
    """Byte-level BPE without merges: id of byte b is b; BOS 256, EOS 257 (extra dummy ids pad the vocabulary)."""
    tokens = [*BYTE_TO_UNICODE, "<s>", "</s>", *(f"<extra_{i}>" for i in range(vocab_size - 258))]
    return BPETokenizer(tokens, [], [GPT2_PATTERN], {"<s>": True, "</s>": True}, bos_id=BOS, eos_id=EOS, add_bos=True)


def expected_ids(text: str) -> list[int]:
    return [BOS, *clean_note(text).encode("utf-8"), EOS]


def write_mimic_csv(path: Path, notes=MIMIC_NOTES) -> Path:
    """A MIMIC-IV-Note style discharge.csv(.gz): note_id, subject_id, note_type, text; all text quoted."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["note_id", "subject_id", "note_type", "text"])
        for note_id, text in notes:
            writer.writerow([note_id, note_id.split("-")[0], "DS", text])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


# ------------------------------------------------------------------------------------------------ readers


def test_clean_note():
    text = "Admission Date:  [**2151-7-16**]\n\nName:\t[**Known lastname 12**]  ,  ok \r\n "
    assert clean_note(text) == "Admission Date: 2151-7-16 Name: Known lastname 12 , ok"
    assert clean_note(" [** **] \n\t") == ""


def test_mimic_csv_gz_multiline_and_empty(tmp_path):
    path = write_mimic_csv(tmp_path / "discharge.csv.gz")
    stats = NoteStats()
    notes = list(iter_notes(path, stats=stats))
    kept = [(i, t) for i, t in MIMIC_NOTES if clean_note(t)]
    assert notes == kept  # raw text, line breaks and quotes inside quoted fields preserved
    assert (stats.notes, stats.empty, stats.chars) == (3, 2, sum(len(t) for _, t in kept))


def test_csv_other_text_column_uses_row_numbers(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text('id,report\n7,"first\nreport"\n8,second\n', encoding="utf-8")
    assert list(iter_notes(path, text_field="report")) == [
        ("reports.csv:1", "first\nreport"),
        ("reports.csv:2", "second"),
    ]


@pytest.mark.parametrize("name", ["mts.jsonl", "mts.jsonl.gz"])
def test_jsonl_with_text_field(tmp_path, name):
    rows = [
        {"note_id": 1, "transcription": "SUBJECTIVE:,  A 23-year-old."},
        {"note_id": 2, "transcription": None},
        {"note_id": 3, "transcription": "PLAN: rest."},
    ]
    path = write_jsonl(tmp_path / name, rows)
    stats = NoteStats()
    assert list(iter_notes(path, text_field="transcription", stats=stats)) == [
        ("1", "SUBJECTIVE:,  A 23-year-old."),
        ("3", "PLAN: rest."),
    ]
    assert (stats.notes, stats.empty) == (2, 1)


def test_txt_lines_and_folder(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first note\n\nsecond [**x**] note\n", encoding="utf-8")
    stats = NoteStats()
    assert list(iter_notes(txt, stats=stats)) == [
        ("notes.txt:1", "first note\n"),
        ("notes.txt:3", "second [**x**] note\n"),
    ]
    assert stats.empty == 1
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("note b\nline 2", encoding="utf-8")
    (folder / "a.txt").write_text("note a", encoding="utf-8")
    (folder / "empty.txt").write_text("\n", encoding="utf-8")
    (folder / "skip.md").write_text("not a note", encoding="utf-8")
    stats = NoteStats()
    assert list(iter_notes(folder, stats=stats)) == [("a.txt", "note a"), ("b.txt", "note b\nline 2")]
    assert stats.empty == 1


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(NotesError) as info:
        list(iter_notes(path, **kwargs))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_errors_are_one_line_and_name_file_and_field(tmp_path):
    assert "no such file" in _error(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    assert "empty.csv: empty file" in _error(tmp_path / "empty.csv")
    with gzip.open(tmp_path / "empty.csv.gz", "wb"):
        pass
    assert "empty.csv.gz: empty file" in _error(tmp_path / "empty.csv.gz")
    good = write_mimic_csv(tmp_path / "good.csv.gz").read_bytes()
    (tmp_path / "truncated.csv.gz").write_bytes(good[: len(good) // 2])
    assert "truncated.csv.gz: corrupt gzip" in _error(tmp_path / "truncated.csv.gz")
    (tmp_path / "notgz.csv.gz").write_bytes(b"note_id,text\n1,abc\n")
    assert "notgz.csv.gz: corrupt gzip" in _error(tmp_path / "notgz.csv.gz")

    message = _error(tmp_path / "good.csv.gz", text_field="body")
    assert "good.csv.gz" in message and "'body'" in message and "note_id, subject_id, note_type, text" in message
    write_jsonl(tmp_path / "m.jsonl", [{"note_id": 1, "transcription": "x"}])
    message = _error(tmp_path / "m.jsonl")
    assert "m.jsonl: line 1" in message and "'text'" in message and "note_id, transcription" in message
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    assert "bad.jsonl: line 2: not valid JSON" in _error(tmp_path / "bad.jsonl")
    (tmp_path / "notes.xml").write_text("<x/>", encoding="utf-8")
    assert "notes.xml: unsupported" in _error(tmp_path / "notes.xml")
    (tmp_path / "ragged.csv").write_text("note_id,text\n1,a,extra\n", encoding="utf-8")
    assert "ragged.csv: line 2: row has 3 fields, expected 2" in _error(tmp_path / "ragged.csv")


def test_non_utf8_strict_names_line_and_replace_counts(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b'note_id,text\n1,"fine"\n2,"caf\xe9 SECRET"\n')
    message = _error(path)
    assert "latin.csv: line 3" in message and "UTF-8" in message and "SECRET" not in message
    stats = NoteStats()
    assert list(iter_notes(path, encoding_errors="replace", stats=stats))[1] == ("2", "caf\ufffd SECRET")
    assert stats.replaced == 1


# ------------------------------------------------------------------------------------------------- cache


def test_cache_tokens_offsets_ids_and_meta(tmp_path, capsys):
    source = write_mimic_csv(tmp_path / "discharge.csv.gz")
    cache = build_token_cache([source], byte_tokenizer(), tmp_path / "cache", workers=2, chunk_size=2)
    kept = [(i, t) for i, t in MIMIC_NOTES if clean_note(t)]
    assert cache.note_ids == [i for i, _ in kept]
    assert cache.tokens.dtype == np.uint16 and isinstance(cache.tokens, np.memmap)
    for k, (_, text) in enumerate(kept):
        assert cache.doc(k).tolist() == expected_ids(text)
    assert cache.num_tokens == sum(len(expected_ids(t)) for _, t in kept) == cache.offsets[-1]
    assert cache.stats["notes"] == 3 and cache.stats["empty"] == 2
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["sources"][0]["path"] == str(source.resolve()) and meta["tokenizer"]["class"] == "BPETokenizer"
    assert meta["cleaning"] >= 1 and meta["sources"][0]["size"] == source.stat().st_size
    out = capsys.readouterr()
    assert "chest pain" not in out.out + out.err  # never print note text
    assert pickle.loads(pickle.dumps(cache)).doc(2).tolist() == cache.doc(2).tolist()


def test_cache_uses_uint32_for_large_vocabularies(tmp_path):
    source = write_mimic_csv(tmp_path / "d.csv")
    cache = build_token_cache([source], byte_tokenizer(70_000), tmp_path / "cache", workers=1)
    assert cache.tokens.dtype == np.uint32 and cache.doc(0).tolist() == expected_ids(MIMIC_NOTES[0][1])


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    source = write_mimic_csv(tmp_path / "d.csv")
    tok = byte_tokenizer()
    first = build_token_cache([source], tok, tmp_path / "cache", workers=1)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(BPETokenizer, "encode_batch", fail)
    again = build_token_cache([source], tok, tmp_path / "cache", workers=1, val_fraction=0.5, seed=3)
    assert again.path == first.path and np.array_equal(again.split, validation_mask(again.note_ids, 0.5, seed=3))
    monkeypatch.undo()

    write_mimic_csv(source, [*MIMIC_NOTES, ("1-DS-9", "another note")])
    os.utime(source, ns=(1, 1))
    changed = build_token_cache([source], tok, tmp_path / "cache", workers=1)
    assert changed.path != first.path and changed.note_ids[-1] == "1-DS-9"
    no_eos = build_token_cache([source], tok, tmp_path / "cache", workers=1, add_eos=False)
    assert no_eos.path not in (first.path, changed.path) and no_eos.doc(0).tolist()[-1] != EOS
    names = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(names) == 3 and not any(n.startswith(".") for n in names)  # no temporary folders left


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    source = write_mimic_csv(tmp_path / "d.csv")
    calls = []

    def fail_second(self, texts, bos=False, eos=False, workers=1):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [self.encode(t, bos, eos) for t in texts]

    monkeypatch.setattr(BPETokenizer, "encode_batch", fail_second)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache([source], byte_tokenizer(), tmp_path / "cache", workers=1, chunk_size=1)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert len(build_token_cache([source], byte_tokenizer(), tmp_path / "cache", workers=1)) == 3


def test_split_is_by_note_deterministic_and_stable():
    ids = [f"{i}-DS-1" for i in range(4000)]
    mask = validation_mask(ids, 0.1, seed=0)
    assert abs(mask.mean() - 0.1) < 0.02  # 4000 Bernoulli(0.1): sd 0.0047
    assert np.array_equal(mask, validation_mask(ids, 0.1, seed=0))
    assert np.array_equal(mask[:1000], validation_mask(ids[:1000], 0.1, seed=0))  # independent of the other notes
    assert np.array_equal(mask[::-1], validation_mask(ids[::-1], 0.1, seed=0))
    assert not np.array_equal(mask, validation_mask(ids, 0.1, seed=1))
    assert not validation_mask(ids, 0.0, seed=0).any()


# ---------------------------------------------------------------------------------------------- datasets


@pytest.fixture
def marked_cache(tmp_path):
    """Notes whose text marks their side: validation notes are all 'V', training notes all 'T'."""
    ids = [f"n{i}" for i in range(60)]
    val = validation_mask(ids, 0.3, seed=0)
    rows = [{"note_id": i, "text": ("V" if v else "T") * (5 + 7 * k % 23)} for k, (i, v) in enumerate(zip(ids, val))]
    path = write_jsonl(tmp_path / "marked.jsonl", rows)
    return build_token_cache([path], byte_tokenizer(), tmp_path / "cache", val_fraction=0.3, workers=1), rows


def test_packing_keeps_validation_out_of_training(marked_cache):
    cache, rows = marked_cache
    streams = {}
    for side, letter in (("train", "T"), ("val", "V")):
        streams[side] = [t for r in rows if r["text"][0] == letter for t in expected_ids(r["text"])]
    train = PackedDataset(cache, "train", max_seq_len=16)
    assert len(train) == len(streams["train"]) // 16
    got = [t for i in range(len(train)) for t in train[i]["input_ids"].tolist()]
    assert got == streams["train"][: len(train) * 16]
    assert ord("V") not in got and ord("T") in got
    val = PackedDataset(cache, "val", max_seq_len=16)
    items = [val[i] for i in range(len(val))]
    assert [t for it in items for t in it["input_ids"].tolist()] == streams["val"]  # last partial block kept
    assert all(len(it["input_ids"]) == 16 for it in items[:-1]) and 0 < len(items[-1]["input_ids"]) <= 16
    assert ord("T") not in streams["val"]
    item = train[1]
    assert item["input_ids"].dtype == torch.int64 and torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(IndexError):
        train[len(train)]


def test_truncated_is_first_tokens_of_each_note(marked_cache):
    cache, rows = marked_cache
    ds = TruncatedDataset(cache, "train", max_seq_len=10)
    train_rows = [r for r in rows if r["text"][0] == "T"]
    assert len(ds) == len(train_rows)
    for i, row in enumerate(train_rows):
        assert ds[i]["input_ids"].tolist() == expected_ids(row["text"])[:10]


def test_collate_pads_right_with_masks():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in out.values())
    full = collate([batch[0], {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])}], pad_id=0)
    assert set(full) == {"input_ids", "labels"}  # no padding, no mask
    assert full["input_ids"].tolist() == [[5, 6, 7], [1, 2, 3]]


def test_epoch_order_is_a_deterministic_permutation():
    a = epoch_order(100, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=2, epoch=0))


# --------------------------------------------------------------------------------------------- real text


def test_mtsamples_with_tok512(tmp_path):
    source = shared_path("mtsamples", "mtsamples.jsonl.gz")
    tok = SentencePieceTokenizer(shared_path("tinyllamas", "tok512.model"))
    cache = build_token_cache([source], tok, tmp_path / "cache", text_field="transcription", workers=2)
    assert (cache.stats["notes"], cache.stats["empty"]) == (4966, 33)  # 33 empty transcriptions in the README
    assert 0.08 < cache.split.mean() < 0.12 and cache.tokens.dtype == np.uint16
    first = next(iter_notes(source, text_field="transcription"))
    assert cache.note_ids[0] == first[0] == "1"
    assert cache.doc(0).tolist() == tok.encode(clean_note(first[1]), bos=True, eos=True)
    block = PackedDataset(cache, "train", 128)[0]["input_ids"]
    assert block[0] == tok.bos_id and len(block) == 128


def test_folder_cache_follows_every_file_the_reader_reads(tmp_path):
    """A notes folder is read as every .txt file in any case, and a change to any of them is a new cache."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("first note")
    (folder / "B.TXT").write_text("second note")
    tok = byte_tokenizer()
    first = build_token_cache([folder], tok, tmp_path / "cache", workers=1)
    assert first.note_ids == ["B.TXT", "a.txt"]
    (folder / "B.TXT").write_text("second note, now longer")
    os.utime(folder / "B.TXT", ns=(1, 1))
    changed = build_token_cache([folder], tok, tmp_path / "cache", workers=1)
    assert changed.path != first.path and changed.doc(0).tolist() == expected_ids("second note, now longer")
