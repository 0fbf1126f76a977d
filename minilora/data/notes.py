"""Clinical-note ingestion: streaming readers, the paper's cleaning, and a tokenize-once memmap cache.

Readers never load a whole file (MIMIC-IV-Note ``discharge.csv.gz`` is gigabytes) and never print or log note
text: errors and statistics name files, lines, fields, ids and counts only.
"""

from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from minilora.tokenizer import BPETokenizer, SentencePieceTokenizer, Tokenizer

CLEANING_VERSION = 1  # bump when clean_note changes: it is part of every cache key
CACHE_FORMAT = 1
DEFAULT_TEXT_FIELD = "text"
ID_FIELD = "note_id"
SUFFIXES = (".csv", ".jsonl", ".ndjson", ".txt")  # each optionally followed by .gz; or a folder of .txt files
_DEID = re.compile(r"\[\*\*|\*\*\]")
_SPACE = re.compile(r"\s+")
_BLANK = re.compile(r"(?:\s|\[\*\*|\*\*\])*")  # exactly the texts that clean_note turns into ""


class NotesError(ValueError):
    """A one-line problem with a notes file: names the file, the line or field, and what was expected."""


@dataclass
class NoteStats:
    """Counts kept while reading: notes yielded, empty notes skipped, raw characters yielded, and
    undecodable bytes replaced (only with ``encoding_errors="replace"``)."""

    notes: int = 0
    empty: int = 0
    chars: int = 0
    replaced: int = 0


def clean_note(text: str) -> str:
    """The paper's cleaning: drop the de-identification brackets ``[**``/``**]`` (keeping what is inside),
    turn newlines/tabs into spaces, collapse runs of whitespace, strip."""
    return _SPACE.sub(" ", _DEID.sub("", text)).strip()


def iter_notes(
    path: str | Path,
    text_field: str | None = None,
    encoding_errors: str = "strict",
    stats: NoteStats | None = None,
) -> Iterator[tuple[str, str]]:
    """Stream ``(note_id, raw text)`` from a CSV(.gz), JSONL(.gz), ``.txt`` (one note per line) or a folder of
    ``.txt`` files (one note per file). Notes that are empty after cleaning are skipped and counted in ``stats``.

    ``text_field`` defaults to ``text``; the id is the ``note_id`` column/field when present, else
    ``<file name>:<row or line number>`` (the file name for a folder). ``encoding_errors="replace"`` substitutes
    undecodable bytes (counted in ``stats.replaced``) instead of raising.
    """
    path = Path(path)
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
    stats = stats if stats is not None else NoteStats()
    field = text_field or DEFAULT_TEXT_FIELD
    if path.is_dir():
        raw = _read_folder(path, encoding_errors, stats)
    elif not path.exists():
        raise NotesError(f"{path}: no such file or directory")
    else:
        if path.stat().st_size == 0:
            raise NotesError(f"{path}: empty file, expected notes")
        kind = _kind(path)
        lines = _decoded_lines(path, encoding_errors, stats)
        raw = {"csv": _read_csv, "jsonl": _read_jsonl, "txt": _read_txt}[kind](path, lines, field)
    for note_id, text in raw:
        if _BLANK.fullmatch(text):
            stats.empty += 1
            continue
        stats.notes += 1
        stats.chars += len(text)
        yield note_id, text


def _kind(path: Path) -> str:
    """Reader for a file name: csv, jsonl or txt (a trailing ``.gz`` is ignored)."""
    name = path.name.lower().removesuffix(".gz")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return {".ndjson": "jsonl"}.get(suffix, suffix[1:])
    raise NotesError(
        f"{path}: unsupported notes file; expected one of {', '.join(SUFFIXES)} (optionally .gz) or a folder"
    )


_FIELD_NAME = re.compile(r"[A-Za-z_](?:[\w.-]{0,38}[\w-])?")  # a sentence's final full stop is not a name's


# Column names that show a CSV's first row to be a header (besides the columns asked for and snake_case names)
HEADER_WORDS = {"id", "note_id", "row_id", "hadm_id", "subject_id", "text", "label", "labels", "note_type", "note",
                "body", "report", "content", "class", "category", "code", "codes", "target"}
_SNAKE_CASE = re.compile(r"[A-Za-z0-9]_[A-Za-z0-9]")  # icd_code, NOTE_BODY; not a de-identified note's "___"


def describe_fields(names: Iterable[object], expected: Iterable[str] | None = None) -> str:
    """Field names for an error message, or only how many there are when one of them does not look like a name
    (a header-less file's first row is data: note text is never printed). ``expected``: for a CSV's first row, the
    columns asked for; the names are shown only when one of them, a common column name or a snake_case name is
    among them, since a header-less file whose first note is one word would otherwise show it."""
    names = list(names)
    looks = all(isinstance(n, str) and _FIELD_NAME.fullmatch(n) for n in names)
    if looks and expected is not None:
        known = {e.lower() for e in expected} | HEADER_WORDS
        looks = any(n.lower() in known or _SNAKE_CASE.search(n) for n in names)
    if looks:
        return ", ".join(names) if names else "none"
    return f"{len(names)} fields, not shown: the first row does not look like a header"


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decoded_lines(path: Path, encoding_errors: str, stats: NoteStats) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each physical line (endings kept), decoded as UTF-8 line by line so that an
    error can name its line; gzip damage becomes a NotesError."""
    number = 0
    try:
        with _open_binary(path) as fh:
            for number, data in enumerate(fh, 1):
                if number == 1 and data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Excel's UTF-8)
                    data = data[3:]
                try:
                    yield number, data.decode("utf-8")
                except UnicodeDecodeError as e:
                    if encoding_errors == "strict":
                        raise NotesError(
                            f"{path}: line {number}: byte {e.start} is not valid UTF-8; expected UTF-8 text "
                            "(pass encoding_errors='replace' to substitute bad bytes)"
                        ) from None
                    text = data.decode("utf-8", errors="replace")
                    stats.replaced += text.count("\ufffd") - data.count("\ufffd".encode())
                    yield number, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        why = {gzip.BadGzipFile: "not gzip data", EOFError: "truncated"}.get(type(e), str(e))  # no file bytes echoed
        raise NotesError(
            f"{path}: corrupt gzip stream after line {number} ({why}); expected a complete .gz file"
        ) from None
    if number == 0:
        raise NotesError(f"{path}: empty file, expected notes")


def csv_error_line(path: Path, error: csv.Error, row_start: int, line: int) -> str:
    """One line for a malformed CSV row that starts on line ``row_start`` and failed on line ``line`` (strict
    reader); an unclosed quote is named as such, since a lenient reader would swallow the rest of the file."""
    if str(error) == "unexpected end of data":
        return (f"{path}: line {row_start}: a quoted field is not closed before the end of the file (a stray double "
                "quote?); expected every quote doubled inside quoted text")
    where = f"line {line}" if line <= row_start else f"line {line} (row starting on line {row_start})"
    return f"{path}: {where}: malformed CSV ({error})"


def _read_csv(path: Path, lines: Iterator[tuple[int, str]], field: str) -> Iterator[tuple[str, str]]:
    """Rows of a CSV with a header; the text column is ``field``, the id column ``note_id`` when present."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # discharge summaries exceed the 128 KiB default
    line_no = [0]

    def text_lines() -> Iterator[str]:
        for number, text in lines:
            line_no[0] = number
            yield text

    reader = csv.reader(text_lines(), strict=True)  # strict: an unclosed quote is an error, not one huge note
    try:
        header = next(reader)
    except StopIteration:
        raise NotesError(f"{path}: empty file, expected a CSV header") from None
    except csv.Error as e:
        raise NotesError(csv_error_line(path, e, 1, line_no[0])) from None
    header = [h.strip() for h in header]  # a byte-order mark went with line 1 (_decoded_lines)
    if field not in header:
        raise NotesError(f"{path}: no column {field!r} (available: {describe_fields(header, [field])}); choose one "
                         "with --text-field (text_field=)")
    if header.count(field) > 1:
        raise NotesError(f"{path}: column {field!r} appears {header.count(field)} times in the header; expected it once")
    text_col = header.index(field)
    id_col = header.index(ID_FIELD) if ID_FIELD in header else None
    row_no = 0
    while True:
        row_start = line_no[0] + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise NotesError(csv_error_line(path, e, row_start, line_no[0])) from None
        row_no += 1
        if not row:
            continue
        if len(row) != len(header):
            raise NotesError(
                f"{path}: line {line_no[0]}: row has {len(row)} fields, expected {len(header)} as in the header"
            )
        yield (row[id_col] if id_col is not None else f"{path.name}:{row_no}"), row[text_col]


def _read_jsonl(path: Path, lines: Iterator[tuple[int, str]], field: str) -> Iterator[tuple[str, str]]:
    """One JSON object per line; ``null`` text counts as an empty note; blank lines are ignored."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise NotesError(
                f"{path}: line {number}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); expected "
                "one object per line"
            ) from None
        if not isinstance(obj, dict):
            raise NotesError(f"{path}: line {number}: a JSON {type(obj).__name__}, expected an object")
        if field not in obj:
            raise NotesError(
                f"{path}: line {number}: no field {field!r} (available: {describe_fields(obj)}); choose one with "
                "--text-field (text_field=)"
            )
        text = obj[field]
        if text is not None and not isinstance(text, str):
            raise NotesError(f"{path}: line {number}: field {field!r} is a {type(text).__name__}, expected a string")
        note_id = obj.get(ID_FIELD)
        yield (str(note_id) if note_id is not None else f"{path.name}:{number}"), text or ""


def _read_txt(path: Path, lines: Iterator[tuple[int, str]], field: str) -> Iterator[tuple[str, str]]:
    """One note per line (the text field does not apply)."""
    for number, line in lines:
        yield f"{path.name}:{number}", line


def _folder_notes(path: Path) -> list[Path]:
    """The note files of a folder, in name order: every ``.txt`` (any case) file. The reader and the token cache's
    fingerprint both use this list, so that a change to any file the reader reads is a new cache."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")


def _read_folder(path: Path, encoding_errors: str, stats: NoteStats) -> Iterator[tuple[str, str]]:
    """One note per ``*.txt`` file, in name order; the id is the file name."""
    files = _folder_notes(path)
    if not files:
        raise NotesError(f"{path}: folder has no .txt files, expected one note per .txt file")
    for file in files:
        data = file.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if encoding_errors == "strict":
                line = data[: e.start].count(b"\n") + 1
                raise NotesError(
                    f"{file}: line {line}: byte {e.start} is not valid UTF-8; expected UTF-8 text "
                    "(pass encoding_errors='replace' to substitute bad bytes)"
                ) from None
            text = data.decode("utf-8", errors="replace")
            stats.replaced += text.count("\ufffd") - data.count("\ufffd".encode())
        yield file.name, text


# ---------------------------------------------------------------------------------------------- token cache


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What makes two tokenizers produce the same ids: class, sizes, special ids and a hash of the vocabulary."""
    h = hashlib.sha256()
    if isinstance(tokenizer, SentencePieceTokenizer):
        h.update(tokenizer.sp.serialized_model_proto())
    elif isinstance(tokenizer, BPETokenizer):
        for part in (
            tokenizer.tokens,
            [f"{a} {b}" for a, b in tokenizer.ranks],
            [p.pattern for p in tokenizer.patterns],
            sorted(tokenizer.literals),
            [str(tokenizer.ignore_merges), str(tokenizer.nfc)],
        ):
            h.update("\n".join(part).encode("utf-8") + b"\0")
    else:
        h.update("\n".join(tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)).encode("utf-8"))
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "add_bos": tokenizer.add_bos,
        "sha256": h.hexdigest(),
    }


def source_fingerprint(path: Path) -> dict[str, Any]:
    """Absolute path, size and mtime of a notes file (for a folder: of each of its ``.txt`` files, hashed)."""
    path = Path(path).resolve()
    if not path.exists():
        raise NotesError(f"{path}: no such file or directory")
    if not path.is_dir():
        st = path.stat()
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h, size = hashlib.sha256(), 0
    for p in _folder_notes(path):
        st = p.stat()
        size += st.st_size
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(path), "size": size, "listing_sha256": h.hexdigest()}


def validation_mask(note_ids: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """True for validation notes: blake2b(seed, note_id) read as a number in [0, 1) is below ``val_fraction``.
    Each note's side depends only on its own id, so it is stable across runs and when files are added."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    prefix = f"{seed}\0".encode()
    limit = int(val_fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest(), "little") < limit
            for i in note_ids
        ),
        dtype=bool,
        count=len(note_ids),
    )


class TokenCache:
    """A built cache: ``tokens`` (memmap of all documents back to back), ``offsets`` (int64, documents + 1),
    ``note_ids``, ``split`` (True = validation) and ``meta`` (counts, tokenizer, sources)."""

    def __init__(self, path: str | Path, val_fraction: float = 0.1, seed: int = 0):
        self.path = Path(path)
        self.val_fraction, self.seed = val_fraction, seed
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise NotesError(f"{self.path}: not a token cache (no meta.json)")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("format") != CACHE_FORMAT:
            raise NotesError(
                f"{meta_file}: cache format {self.meta.get('format')!r}, expected {CACHE_FORMAT}; delete the folder"
            )
        self.offsets: np.ndarray = np.load(self.path / "offsets.npy")
        self.note_ids: list[str] = json.loads((self.path / "note_ids.json").read_text(encoding="utf-8"))
        n_tokens, n_docs = self.meta["num_tokens"], self.meta["num_docs"]
        if len(self.offsets) != n_docs + 1 or len(self.note_ids) != n_docs or self.offsets[-1] != n_tokens:
            raise NotesError(
                f"{self.path}: offsets/ids disagree with meta.json ({n_docs} documents); delete the folder"
            )
        dtype = np.dtype(self.meta["dtype"])
        if (self.path / "tokens.bin").stat().st_size != n_tokens * dtype.itemsize:
            raise NotesError(
                f"{self.path / 'tokens.bin'}: size disagrees with meta.json ({n_tokens} tokens); delete the folder"
            )
        self.tokens: np.memmap = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(n_tokens,))
        self.split: np.ndarray = validation_mask(self.note_ids, val_fraction, seed)

    def __len__(self) -> int:
        return len(self.note_ids)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle by path (DataLoader workers with spawn), never the token data."""
        return {"path": self.path, "val_fraction": self.val_fraction, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["val_fraction"], state["seed"])

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a read-only view into the memmap)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents, both splits."""
        return int(self.offsets[-1])

    def doc_indices(self, split: str) -> np.ndarray:
        """Indices of the ``"train"`` or ``"val"`` documents, in cache order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return np.flatnonzero(self.split if split == "val" else ~self.split)

    @property
    def stats(self) -> dict[str, Any]:
        """Build counts from meta.json plus this split's note and token counts."""
        lengths = np.diff(self.offsets)
        return {
            **self.meta["stats"],
            "num_docs": len(self),
            "num_tokens": self.num_tokens,
            "val_docs": int(self.split.sum()),
            "val_tokens": int(lengths[self.split].sum()),
        }


def cache_key(
    sources: Sequence[Path], tokenizer: Tokenizer, text_field: str | None, add_eos: bool, encoding_errors: str
) -> tuple[str, dict[str, Any]]:
    """A short hash of everything that determines the token stream, and the dict it hashes."""
    spec = {
        "format": CACHE_FORMAT,
        "cleaning": CLEANING_VERSION,
        "tokenizer": tokenizer_identity(tokenizer),
        "sources": [source_fingerprint(Path(s)) for s in sources],
        "text_field": text_field or DEFAULT_TEXT_FIELD,
        "add_bos": tokenizer.add_bos,
        "add_eos": add_eos,
        "encoding_errors": encoding_errors,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20], spec


def build_token_cache(
    sources: Sequence[str | Path],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    text_field: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 2,
    add_eos: bool = True,
    encoding_errors: str = "strict",
    chunk_size: int = 1000,
    progress: bool = True,
) -> TokenCache:
    """Clean and tokenize every note of ``sources`` once into ``cache_dir/<key>/`` and open it.

    The key hashes the tokenizer identity, the sources (absolute path, size, mtime), ``text_field`` and the
    options that change tokens, so a repeated call returns the existing cache at once and any change builds a
    new one. ``val_fraction``/``seed`` only choose the by-note split, computed on opening (no rebuild).
    The build is written to a temporary folder and renamed, so an interrupted build leaves no half cache.
    """
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("build_token_cache needs at least one source")
    key, spec = cache_key(sources, tokenizer, text_field, add_eos, encoding_errors)
    final = Path(cache_dir) / key
    if (final / "meta.json").is_file():
        return TokenCache(final, val_fraction, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    try:
        meta = _write_cache(tmp, sources, tokenizer, spec, workers, chunk_size, progress)
        if [source_fingerprint(s) for s in sources] != spec["sources"]:
            raise NotesError(
                f"a source changed while the cache was being built ({', '.join(map(str, sources))}); rerun"
            )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # lost a race only if a complete cache is already there
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCache(final, val_fraction, seed)


def _write_cache(
    folder: Path,
    sources: list[Path],
    tokenizer: Tokenizer,
    spec: dict[str, Any],
    workers: int,
    chunk_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Stream notes -> clean -> tokenize (in worker processes) -> ``tokens.bin``; write offsets and ids."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    stats = NoteStats()
    lengths: list[int] = []
    note_ids: list[str] = []
    clean_chars = 0

    def chunks() -> Iterator[list[str]]:
        nonlocal clean_chars
        batch: list[str] = []
        for source in sources:
            for note_id, text in iter_notes(source, spec["text_field"], spec["encoding_errors"], stats):
                text = clean_note(text)
                clean_chars += len(text)
                note_ids.append(note_id)
                batch.append(text)
                if len(batch) == chunk_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    bar = tqdm(unit=" notes", desc="tokenizing notes", file=sys.stderr, disable=None if progress else True)
    with open(folder / "tokens.bin", "wb") as out, bar:
        for ids in _encode_stream(chunks(), tokenizer, spec["add_eos"], workers):
            lengths.extend(map(len, ids))
            out.write(np.concatenate([np.asarray(doc, dtype=dtype) for doc in ids]).tobytes())
            bar.update(len(ids))
    if not lengths:
        raise NotesError(f"no non-empty notes in {', '.join(map(str, sources))} ({stats.empty} empty skipped)")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(folder / "offsets.npy", offsets)
    (folder / "note_ids.json").write_text(json.dumps(note_ids), encoding="utf-8")
    return {
        **spec,
        "dtype": dtype.name,
        "num_docs": len(lengths),
        "num_tokens": int(offsets[-1]),
        "stats": {**asdict(stats), "chars_clean": clean_chars},
    }


def _encode_stream(
    chunks: Iterable[list[str]], tokenizer: Tokenizer, add_eos: bool, workers: int
) -> Iterator[list[list[int]]]:
    """Token ids chunk by chunk, in order. SentencePiece batches use its own native threads; other tokenizers
    with ``workers > 1`` use a persistent process pool (each worker keeps its tokenizer and word cache) that
    encodes up to ``2 * workers`` chunks ahead of the reader."""
    bos = tokenizer.add_bos
    if workers <= 1 or isinstance(tokenizer, SentencePieceTokenizer):
        for chunk in chunks:
            yield tokenizer.encode_batch(chunk, bos=bos, eos=add_eos, workers=workers)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_encoder, initargs=(tokenizer, bos, add_eos)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_encoder: tuple[Tokenizer, bool, bool] | None = None


def _init_encoder(tokenizer: Tokenizer, bos: bool, eos: bool) -> None:
    """Pool initializer: keep the tokenizer for the worker's lifetime."""
    global _encoder
    _encoder = (tokenizer, bos, eos)


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    """Pool task: ``encode_batch`` one chunk in this worker."""
    assert _encoder is not None
    tokenizer, bos, eos = _encoder
    return tokenizer.encode_batch(texts, bos=bos, eos=eos)
