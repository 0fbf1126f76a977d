"""Task and notes files as users' tools write them: byte-order marks, header-less files, ragged rows, JSON lists.

Errors name the file, line and expectation and never echo note text.
"""

from __future__ import annotations

import json

import pytest

from minilora.data.notes import NotesError, NoteStats, iter_notes
from minilora.data.tasks import TaskDataError, load_task_files

SECRET = "Patient John Smith has HIV"


def _files(tmp_path, train: str, name: str = "t.csv") -> dict:
    path = tmp_path / name
    path.write_bytes(train.encode("utf-8"))
    return {"train": path, "val": path, "test": path}


def test_byte_order_mark_before_a_quoted_header_keeps_the_ids(tmp_path):
    """Excel's "CSV UTF-8" puts a BOM before the first (quoted) header field: the id column is still found."""
    data = load_task_files(_files(tmp_path, '\ufeff"id","text","label"\n"17","chest pain","1"\n"18","fever","0"\n'),
                           "t", "binary")
    assert data.splits["test"].ids == ["17", "18"]
    lines = [json.dumps({"id": str(i), "text": "cough", "label": str(i % 2)}) for i in (5, 6)]
    jsonl = _files(tmp_path, "\ufeff" + "\n".join(lines) + "\n", "t.jsonl")
    assert load_task_files(jsonl, "t", "binary").splits["train"].ids == ["5", "6"]
    notes = tmp_path / "n.csv"
    notes.write_bytes('\ufeff"note_id","text"\n"10-DS-1","chest pain"\n'.encode("utf-8"))
    assert list(iter_notes(notes, stats=NoteStats())) == [("10-DS-1", "chest pain")]


def test_header_less_files_are_errors_that_do_not_echo_their_first_row(tmp_path):
    with pytest.raises(TaskDataError) as e:
        load_task_files(_files(tmp_path, f'1,"{SECRET}, PHI here",0\n2,"fever",1\n'), "t", "binary")
    assert "missing column 'text'" in str(e.value) and SECRET not in str(e.value) and "not shown" in str(e.value)
    notes = tmp_path / "n.csv"
    notes.write_text(f'1,"{SECRET}"\n2,"fever"\n')
    with pytest.raises(NotesError) as e:
        list(iter_notes(notes, stats=NoteStats()))
    assert "no column 'text'" in str(e.value) and SECRET not in str(e.value)
    named = _files(tmp_path, "id,body,label\n1,x,0\n")  # real column names are still listed
    with pytest.raises(TaskDataError, match=r"missing column 'text' \(columns: id, body, label\)"):
        load_task_files(named, "t", "binary")


def test_ragged_task_rows_are_errors_naming_the_line(tmp_path):
    """An unquoted comma in the text (5 fields for a 3-column header) or a short row is not read silently."""
    files = _files(tmp_path, f"id,text,short_codes\n1,fever,401\n2,{SECRET}, and more,401,250\n")
    with pytest.raises(TaskDataError) as e:
        load_task_files(files, "t", "multilabel", label_col="short_codes")
    assert "t.csv: line 3: row has 5 fields, expected 3" in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(TaskDataError, match="line 3: row has 2 fields, expected 3"):
        load_task_files(_files(tmp_path, "id,text,label\n1,fever,0\n2,cough\n"), "t", "binary")


def test_json_list_labels_use_the_label_separator(tmp_path):
    rows = [{"text": "a", "codes": ["401", "250"]}, {"text": "b", "codes": ["428"]}]
    files = _files(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), "t.jsonl")
    data = load_task_files(files, "t", "multilabel", label_col="codes", id_col=None, label_sep=";")
    assert data.labels == ["250", "401", "428"]
    assert data.splits["train"].targets.tolist() == [[1, 1, 0], [0, 0, 1]]


def test_gzipped_van_aken_files_and_ndjson(tmp_path):
    import gzip

    from minilora.data.synthetic import write_task_csvs
    from minilora.data.tasks import load_named_task

    plain = tmp_path / "plain"
    write_task_csvs(plain, "mortality", 60, seed=1)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for f in plain.iterdir():
        (zipped / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    a, b = load_named_task("mortality", plain), load_named_task("mortality", zipped)
    assert a.splits["test"].ids == b.splits["test"].ids and (a.splits["test"].targets == b.splits["test"].targets).all()
    rows = [{"id": str(i), "text": f"note {i}", "label": str(i % 2)} for i in range(4)]
    files = _files(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), "t.ndjson")
    assert load_task_files(files, "t", "binary").splits["train"].ids == ["0", "1", "2", "3"]
