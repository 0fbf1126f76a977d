"""Data: clinical-note readers and the token cache, packed/truncated LM datasets, the synthetic clinical corpus."""

from minilora.data.notes import NotesError, NoteStats, TokenCache, build_token_cache, clean_note, iter_notes
from minilora.data.packing import PackedDataset, TruncatedDataset, collate, epoch_order
from minilora.data.synthetic import (
    TASKS,
    Patient,
    generate_patients,
    render_note,
    task_spec,
    write_dapt_corpus,
    write_task_csvs,
)

__all__ = [
    "TASKS",
    "NoteStats",
    "NotesError",
    "PackedDataset",
    "Patient",
    "TokenCache",
    "TruncatedDataset",
    "build_token_cache",
    "clean_note",
    "collate",
    "epoch_order",
    "generate_patients",
    "iter_notes",
    "render_note",
    "task_spec",
    "write_dapt_corpus",
    "write_task_csvs",
]
